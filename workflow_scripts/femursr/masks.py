"""Femur masks from a clinical CT: the classical ``threshold`` backend.

As in the study, the mask is computed from the clinical CT at about 1 mm and brought back to the
HR grid. The input is the LR (HU) already resampled onto the HR grid, i.e. the box of the HR
specimen: the whole proximal femur down to the saw cut, where the in-situ femur leaves the box
through its inferior face, and around the femoral head part of the pelvis (the acetabulum across
the joint space, maybe ischium or pubis), soft tissue, fat and air.

1. **Work grid.** Block means down to ``work_mm`` voxels, Gaussian smoothing (``smooth_mm``).
2. **Bone.** A local threshold halfway (``edge_fraction``) between the soft-tissue level (mode
   of the histogram) and the local peak (grey dilation over ``peak_radius_mm``), and at least
   ``min_contrast_hu`` above soft tissue: the half-maximum of a blurred edge, so the thin cortex
   of the head and neck (a few hundred HU after the point-spread function) and the thick shaft
   cortex are both found.
3. **Candidate.** The largest bone component that reaches the inferior face of the box (the
   sawn shaft; which face is inferior comes from the direction cosines). It still holds
   whatever part of the pelvis touches the femur.
4. **Femoral head.** The largest ball inscribed in the candidate (distance transform), refined
   by a sphere fitted to where rays from its centre leave the bone.
5. **Acetabulum.** Along rays from the head centre, a direction is *covered* when the ray leaves
   the head near its surface, crosses at most ``joint_space_max_mm`` of non-bone (the joint
   space) and meets bone again. The covered cap is closed and opened on the sphere and widened at
   its rim, where the acetabular rim may touch the femoral neck with no joint space between.
   Bone beyond the middle of the joint space in covered directions is pelvis and is removed;
   what is then no longer connected to the shaft or to the head (ischium, pubis) goes with it.
6. **Solid femur.** Closing (``closing_mm``) of the femur alone, so that holes where the thin
   cortex fell below the threshold are bridged; voxels the femur encloses from nearly all of the
   26 lattice directions (the interior behind a wider hole, e.g. where the acetabular rim was
   cut off the neck) are added; then holes are filled with the sawn shaft end treated as closed:
   marrow and the sparse trabecular interior become femur.
7. **Boundary.** On the outermost layer (``band_mm``) the edge is re-placed with less smoothing
   (``boundary_smooth_mm``) at ``boundary_fraction`` of the local contrast, as a signed level
   that is interpolated linearly onto the HR grid (sub-voxel). The HR-grid mask is smoothed
   (``final_smooth_mm``) and thresholded at one half, in slabs so that large grids fit in memory.

Known limits: the mask reaches the inferior face of the box, where the in-situ femur of the
clinical CT goes on below the saw cut of the HR specimen (2.5 mm at demo scale, about 1.2 % of
Dice against the specimen); only the HR volume can tell where the specimen ends. Where the
acetabular rim touches the neck, the split follows the widened rim of the cap, to within about
a millimetre.

The nnU-Net backend lives in :mod:`femursr.nnunet`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage as ndi
from scipy import sparse
from scipy.spatial import cKDTree

from .volume import Volume

log = logging.getLogger(__name__)


class MaskError(RuntimeError):
    """No usable femur found; the message names the subject, the figures and the fix."""


@dataclass
class ThresholdParams:
    """Parameters of the threshold backend (lengths in mm, intensities in HU)."""

    work_mm: float = 0.8  # grid on which the mask is computed (the paper: about 1 mm)
    smooth_mm: float = 0.6  # Gaussian sigma against the clinical CT's noise
    peak_radius_mm: float = 1.5  # neighbourhood of the local peak (cortex) an edge is measured to
    edge_fraction: float = 0.5  # bone: above this fraction of the way from soft tissue to the peak
    min_contrast_hu: float = 200.0  # and at least this far above soft tissue
    joint_space_max_mm: float = 4.0  # widest joint space between femoral head and acetabulum
    rim_widen_mm: float = 2.4  # the acetabular cap is widened by this arc at its rim
    closing_mm: float = 3.0  # bridges holes in the thin cortex before filling the marrow
    band_mm: float = 0.8  # outer layer (at least one work voxel) whose edge the data re-place
    boundary_smooth_mm: float = 0.3  # Gaussian sigma for that edge
    boundary_fraction: float = 0.55  # fraction of the local contrast at which the edge is placed
    final_smooth_mm: float = 1.0  # smoothing of the HR-grid mask before thresholding at 0.5
    min_volume_ml: float = 2.0  # a femur (even a small one) is at least this large
    min_head_radius_mm: float = 3.0  # smaller "heads" are not a femoral head


# fixed choices of the acetabulum search, in mm (not worth a config key each)
_RAY_STEP_MM = 0.2
_HEAD_EXIT_TOL_MM = (0.7, 1.2)  # the ray must leave the head between R - 0.7 and R + 1.2
_MIN_JOINT_SPACE_MM = 0.4
_MIN_ACETABULUM_MM = 0.6  # bone beyond the joint space: at least this deep (not a noise speck)
_CAP_CLOSE_MM = 1.2  # arc lengths at the joint space for the closing / opening of the cap
_CAP_OPEN_MM = 1.2
_RIM_OFFSET_MM = 0.5  # at the widened rim, pelvis starts this far beyond the joint space middle
_MIN_ENCLOSED_DIRECTIONS = 22  # of 26: interior of the femur even behind a hole in its cortex


def threshold_femur_mask(
    lr_on_grid: Volume, params: ThresholdParams | None = None, label: str = ""
) -> tuple[Volume, dict]:
    """Femur mask on the grid of ``lr_on_grid`` (clinical CT in HU resampled onto the HR grid).

    Returns the mask (uint8 0/1, same geometry as the input) and a report (JSON-serialisable:
    soft-tissue level, femoral head centre (LPS mm) and radius, acetabulum coverage, volumes in
    ml, seconds). Raises :class:`MaskError` when no plausible femur is found; an empty or tiny
    mask is never returned.
    """
    p = params or ThresholdParams()
    who = label or "LR on the HR grid"
    t0 = time.perf_counter()
    arr, to_input = _shaft_end_first(lr_on_grid)
    sp = np.asarray(lr_on_grid.spacing[::-1], float)[list(to_input.axes)]  # (axis 0, 1, 2) of arr
    f = np.array([max(1, int(round(p.work_mm / s))) for s in sp])
    csp = sp * f
    coarse = _block_mean(arr, f)
    if not np.isfinite(coarse).all():
        raise MaskError(f"{who}: the LR holds NaN or infinite values; check the import and the resampling")
    sm = ndi.gaussian_filter(coarse, p.smooth_mm / csp)
    soft = _soft_tissue_level(sm)
    fval = _edge_level(sm, soft, p.edge_fraction, p, csp)
    vox_ml = float(np.prod(csp)) / 1000.0
    report = {
        "params": asdict(p),
        "work_spacing_mm": [float(v) for v in csp[list(to_input.inverse)][::-1]],
        "soft_tissue_hu": soft,
    }

    # the candidate: the largest bone component that leaves the box through the sawn shaft end
    bone = fval > 0
    lab, n = ndi.label(bone)
    sizes = np.bincount(lab.ravel(), minlength=n + 1)[1:] * vox_ml
    at_end = np.unique(lab[0][lab[0] > 0])
    if at_end.size == 0:
        top = float(sizes.max()) if n else 0.0
        raise MaskError(
            f"{who}: no bone reaches the inferior face of the box (the sawn shaft); {n} bone components "
            f"above {soft + p.min_contrast_hu:.0f} HU (soft tissue {soft:.0f} HU), largest {top:.2f} ml. "
            "Is the femur in the field of view and the LR in HU? (check the import and the registration)"
        )
    best = int(at_end[np.argmax(sizes[at_end - 1])])
    report["candidate_ml"] = float(sizes[best - 1])
    if sizes[best - 1] < p.min_volume_ml:
        raise MaskError(
            f"{who}: the bone reaching the shaft end is {sizes[best - 1]:.2f} ml, below min_volume_ml = "
            f"{p.min_volume_ml:g} ml; the femur is not in the field of view or min_contrast_hu "
            f"({p.min_contrast_hu:g} HU above {soft:.0f} HU) is too high for this scanner"
        )
    cand = lab == best
    del lab

    centre, radius, n_fit = _fit_head(cand, fval, csp)
    if radius < p.min_head_radius_mm or n_fit < 20:
        raise MaskError(
            f"{who}: no femoral head found (best sphere {radius:.1f} mm from {n_fit} surface points; "
            f"min_head_radius_mm = {p.min_head_radius_mm:g}); the box must hold the whole proximal femur "
            "(check the HR field of view and the registration)"
        )
    pelvis, cover = _acetabulum(cand, fval, centre, radius, csp, p)
    femur = cand & ~pelvis
    lab, _ = ndi.label(femur)
    keep = np.union1d(np.unique(lab[0]), np.unique(lab[_ball_mask(lab.shape, centre, radius - 1.0, csp)]))
    femur = np.isin(lab, keep[keep > 0])
    del lab
    head_mm = np.asarray(lr_on_grid.index_to_physical(to_input.point((centre + 0.5) * f - 0.5)[::-1]))
    report.update(
        head_centre_mm=[float(v) for v in head_mm],
        head_radius_mm=radius,
        acetabulum_cover=cover,
        pelvis_removed_ml=float(np.count_nonzero(cand & ~femur)) * vox_ml,
    )

    solid = _solid(femur, p.closing_mm, csp)
    fb = _edge_level(ndi.gaussian_filter(coarse, p.boundary_smooth_mm / csp), soft, p.boundary_fraction, p, csp)
    depth = ndi.distance_transform_edt(np.pad(solid, 1, mode="edge"), sampling=csp)[1:-1, 1:-1, 1:-1]
    # deep inside: femur whatever the intensity (marrow); outer layer (at least one voxel): the
    # data place the edge; outside the solid femur: never femur (pelvis, soft tissue)
    eps = np.float32(1.0)
    band = max(p.band_mm, float(csp.max()))
    phi = np.where(solid, np.where(depth > band, np.maximum(fb, eps), fb), np.minimum(fb, -eps))
    mask = _upsample_mask(phi.astype(np.float32), f, arr.shape, p.final_smooth_mm / sp)
    femur_ml = float(np.count_nonzero(mask)) * float(np.prod(sp)) / 1000.0
    report["femur_ml"] = femur_ml
    report["seconds"] = time.perf_counter() - t0
    if femur_ml < p.min_volume_ml:
        raise MaskError(
            f"{who}: the femur mask is {femur_ml:.2f} ml after removing the pelvis ({report['pelvis_removed_ml']:.2f} "
            f"ml) and filling, below min_volume_ml = {p.min_volume_ml:g} ml; check the LR window and the "
            "registration (the femoral head was found at "
            f"{', '.join(f'{v:.1f}' for v in head_mm)} mm, radius {radius:.1f} mm)"
        )
    log.info(
        "%s: femur %.2f ml, head r = %.1f mm, acetabulum over %.0f %% of directions, %.2f ml pelvis removed, %.1f s",
        who, femur_ml, radius, 100 * cover, report["pelvis_removed_ml"], report["seconds"],
    )  # fmt: skip
    return lr_on_grid.with_array(to_input.array(mask)), report


# ----------------------------------------------------------------------------- orientation
class _Reorient:
    """How the working view relates to the input array: its axis k is input axis ``axes[k]``,
    and axis 0 (of length ``n0``) is reversed when ``flip``."""

    def __init__(self, axes, flip: bool, n0: int):
        self.axes = tuple(axes)
        self.inverse = tuple(int(i) for i in np.argsort(axes))
        self.flip = bool(flip)
        self.n0 = int(n0)

    def array(self, a: np.ndarray) -> np.ndarray:
        if self.flip:
            a = a[::-1]
        return np.ascontiguousarray(np.transpose(a, self.inverse))

    def point(self, idx) -> np.ndarray:
        """Input (z, y, x) indices of the working view's indices ``idx``."""
        idx = np.array(idx, float)
        if self.flip:
            idx[0] = self.n0 - 1 - idx[0]
        return idx[list(self.inverse)]


def _shaft_end_first(vol: Volume):
    """A view (no copy) of the array whose axis 0 runs from the inferior face of the box (where
    the sawn shaft leaves it) upwards, and the :class:`_Reorient` that leads back."""
    d = vol.direction_matrix  # columns: LPS directions of the x, y, z grid axes
    grid_axis = int(np.argmax(np.abs(d[2])))  # the grid axis (x, y, z) closest to superior
    ax0 = 2 - grid_axis  # as an array axis (z, y, x)
    axes = [ax0] + [a for a in range(3) if a != ax0]
    arr = np.transpose(vol.array, axes)
    flip = bool(d[2, grid_axis] < 0)  # index 0 is the superior end
    if flip:
        arr = arr[::-1]
    return arr, _Reorient(axes, flip, arr.shape[0])


# ----------------------------------------------------------------------------- work grid
def _block_mean(a: np.ndarray, f) -> np.ndarray:
    """Mean over blocks of ``f`` voxels (float32); the last, partial blocks repeat the edge.

    Slab by slab along axis 0, so a memory-mapped input is read once and never copied whole.
    """
    f = [int(v) for v in f]
    n = [-(-s // k) for s, k in zip(a.shape, f)]
    out = np.empty(n, np.float32)
    rows = max(1, (1 << 24) // max(1, a.shape[1] * a.shape[2] * f[0])) * f[0]
    for z0 in range(0, a.shape[0], rows):
        slab = np.asarray(a[z0 : z0 + rows], np.float32)
        pad = [(0, (-s) % k) for s, k in zip(slab.shape, f)]
        slab = np.pad(slab, pad, mode="edge")
        s = slab.shape
        out[z0 // f[0] : z0 // f[0] + s[0] // f[0]] = slab.reshape(
            s[0] // f[0], f[0], s[1] // f[1], f[1], s[2] // f[2], f[2]
        ).mean(axis=(1, 3, 5))
    return out


def _soft_tissue_level(sm: np.ndarray) -> float:
    """The most frequent value between -300 and 300 HU: muscle and other soft tissue (HU)."""
    v = sm[(sm > -300) & (sm < 300)]
    if v.size < 100:
        return 0.0
    h, e = np.histogram(v, bins=60, range=(-300, 300))
    i = int(np.argmax(ndi.gaussian_filter1d(h.astype(float), 2)))
    return float(0.5 * (e[i] + e[i + 1]))


def _ball(radius_vox) -> np.ndarray:
    """Ellipsoidal structuring element with per-axis radii in voxels."""
    r = np.maximum(np.asarray(radius_vox, float), 0.5)
    n = np.floor(r + 1e-6).astype(int)
    g = np.ogrid[-n[0] : n[0] + 1, -n[1] : n[1] + 1, -n[2] : n[2] + 1]
    return ((g[0] / r[0]) ** 2 + (g[1] / r[1]) ** 2 + (g[2] / r[2]) ** 2) <= 1.0 + 1e-6


def _edge_level(sm, soft, fraction, p, csp) -> np.ndarray:
    """Signed distance (HU) of ``sm`` above the local edge level: ``fraction`` of the way from soft
    tissue to the local peak, and at least ``min_contrast_hu`` above soft tissue."""
    peak = ndi.grey_dilation(sm, footprint=_ball(p.peak_radius_mm / csp))
    return (sm - (soft + np.maximum(fraction * (peak - soft), p.min_contrast_hu))).astype(np.float32)


def _ball_mask(shape, centre, radius_mm, csp) -> np.ndarray:
    g = np.ogrid[: shape[0], : shape[1], : shape[2]]
    return sum(((g[k] - centre[k]) * csp[k]) ** 2 for k in range(3)) < radius_mm**2


# ----------------------------------------------------------------------------- head and acetabulum
def _fibonacci_sphere(n: int) -> np.ndarray:
    """``n`` nearly uniform unit vectors (axis 0, 1, 2 components)."""
    i = np.arange(n) + 0.5
    polar = np.arccos(1 - 2 * i / n)
    az = np.pi * (1 + 5**0.5) * i
    return np.stack([np.cos(polar), np.sin(polar) * np.sin(az), np.sin(polar) * np.cos(az)], 1)


def _rays(vol, centre, dirs, radii_mm, csp) -> np.ndarray:
    """``vol`` (linear interpolation) at ``centre`` + ``dirs`` * ``radii_mm``: (n_dirs, n_radii)."""
    pts = centre[None, None, :] + dirs[:, None, :] * np.asarray(radii_mm)[..., None] / csp
    out = ndi.map_coordinates(vol, pts.reshape(-1, 3).T, order=1, mode="nearest")
    return out.reshape(pts.shape[:2])


def _fit_head(cand, fval, csp, n_dirs=400, iters=4):
    """Femoral head: centre (work-grid indices) and radius (mm), and the surface points used.

    The largest inscribed ball of the hole-filled candidate lies in the head, but the neck's
    sparse interior truncates the bright part of the head at about 0.6 radii from the centre:
    that ball has about 0.8 of the head's radius. A sphere is then fitted (least squares) to
    where rays from the centre first leave the bone, near the current radius.
    """
    dt = ndi.distance_transform_edt(ndi.binary_fill_holes(cand), sampling=csp)
    centre = np.array(np.unravel_index(np.argmax(dt), dt.shape), float)
    radius = float(dt.max()) / 0.81
    dirs = _fibonacci_sphere(n_dirs)
    n_fit = 0
    for _ in range(iters):
        radii = np.arange(0.3 * radius, 2.0 * radius, _RAY_STEP_MM)
        v = _rays(fval, centre, dirs, radii, csp)
        out = (v <= 0) & (radii >= 0.5 * radius)[None, :]
        k = out.argmax(1)
        rows = np.arange(len(dirs))
        v0, v1 = v[rows, np.maximum(k - 1, 0)], v[rows, k]
        r_exit = radii[np.maximum(k - 1, 0)] + _RAY_STEP_MM * v0 / np.maximum(v0 - v1, 1e-6)
        ok = out.any(1) & (np.abs(r_exit - radius) < max(0.25 * radius, 1.5))
        n_fit = int(ok.sum())
        if n_fit < 20:
            break
        pts = centre * csp + dirs[ok] * r_exit[ok, None]  # mm
        # |p|^2 = 2 c.p + (r^2 - |c|^2), linear in (c, r^2 - |c|^2)
        sol, *_ = np.linalg.lstsq(np.c_[2 * pts, np.ones(n_fit)], (pts**2).sum(1), rcond=None)
        c_mm = sol[:3]
        radius = float(np.sqrt(max(sol[3] + c_mm @ c_mm, 0.0)))
        centre = c_mm / csp
    return centre, radius, n_fit


def _sphere_neighbours(tree: cKDTree, dirs: np.ndarray, angle: float) -> sparse.csr_matrix:
    """Directions within ``angle`` (rad) of each other, as a 0/1 matrix (itself included)."""
    nb = tree.query_ball_point(dirs, 2.0 * np.sin(min(angle, np.pi) / 2.0))
    rows = np.repeat(np.arange(len(nb)), [len(x) for x in nb])
    cols = np.concatenate([np.asarray(x, int) for x in nb])
    return sparse.csr_matrix((np.ones(rows.size, np.float32), (rows, cols)), shape=(len(dirs), len(dirs)))


def _acetabulum(cand, fval, centre, radius, csp, p):
    """Voxels of ``cand`` that are pelvis: beyond the joint space as seen from the head centre.

    Returns the pelvis mask and the fraction of directions in which the acetabulum covers the head.
    """
    vox = float(csp.max())
    r_gap = radius + 1.25  # about the middle of a typical (2-3 mm) joint space
    n = int(np.clip(4 * np.pi * (radius + 2.0) ** 2 / float(csp.min()) ** 2, 500, 60000))
    dirs = _fibonacci_sphere(n)
    radii = np.arange(radius - 1.5, radius + p.joint_space_max_mm + 2.5, _RAY_STEP_MM)
    bright = _rays(fval, centre, dirs, radii, csp) > 0
    nr = radii.size
    head = bright[:, radii < radius - _HEAD_EXIT_TOL_MM[0]].all(1)
    dark = ~bright & (radii >= radius - _HEAD_EXIT_TOL_MM[0])[None, :]
    k1 = np.where(dark.any(1), dark.argmax(1), nr - 1)  # leaves the head
    again = bright & (np.arange(nr)[None, :] > k1[:, None])
    k2 = np.where(again.any(1), again.argmax(1), nr - 1)  # meets bone again
    r1, r2 = radii[k1], radii[k2]
    m = int(round(_MIN_ACETABULUM_MM / _RAY_STEP_MM))
    deep = np.take_along_axis(bright, np.minimum(k2[:, None] + np.arange(m)[None, :], nr - 1), 1).all(1)
    covered = (
        head & dark.any(1) & again.any(1) & deep
        & (r1 <= radius + _HEAD_EXIT_TOL_MM[1])
        & (r2 - r1 >= _MIN_JOINT_SPACE_MM) & (r2 - r1 <= p.joint_space_max_mm)
    )  # fmt: skip

    # the covered cap on the sphere: closed (bridges and noise in the joint space leave holes),
    # opened (grazing rays into the concave head-neck junction), widened at the rim
    tree = cKDTree(dirs)
    a_close = _sphere_neighbours(tree, dirs, max(_CAP_CLOSE_MM, 2 * vox) / r_gap)
    deg = np.asarray(a_close.sum(1)).ravel()
    cov = (a_close @ ((a_close @ covered.astype(np.float32)) > 0).astype(np.float32)) >= deg - 0.5
    a_open = _sphere_neighbours(tree, dirs, max(_CAP_OPEN_MM, 2 * vox) / r_gap)
    deg_o = np.asarray(a_open.sum(1)).ravel()
    eroded = (a_open @ cov.astype(np.float32)) >= deg_o - 0.5
    cov = (a_open @ eroded.astype(np.float32)) > 0
    # middle of the joint space, averaged over the covered neighbours
    n_cov = a_close @ covered.astype(np.float32)
    mid = np.where(n_cov > 0, (a_close @ (0.5 * (r1 + r2) * covered)) / np.maximum(n_cov, 1), r_gap)
    a_rim = _sphere_neighbours(tree, dirs, max(p.rim_widen_mm, vox) / r_gap)
    n_rim = a_rim @ cov.astype(np.float32)
    rim = (n_rim > 0) & ~cov
    mid_rim = (a_rim @ (mid * cov)) / np.maximum(n_rim, 1) + _RIM_OFFSET_MM
    start = np.where(cov, mid, np.where(rim, mid_rim, np.inf))

    idx = np.argwhere(cand)
    d = (idx - centre) * csp
    rho = np.linalg.norm(d, axis=1)
    _, nearest = tree.query(d / np.maximum(rho, 1e-9)[:, None])
    pelvis = np.zeros(cand.shape, bool)
    pelvis[tuple(idx[rho > start[nearest]].T)] = True
    return pelvis, float(cov.mean())


# ----------------------------------------------------------------------------- filling, boundary
def _solid(femur: np.ndarray, closing_mm: float, csp) -> np.ndarray:
    """The femur with its interior: closing by ``closing_mm``, voxels enclosed by the femur from
    nearly all sides, then holes filled; the sawn shaft end (axis 0, index 0) counts as closed.

    The enclosure test catches the interior behind a hole in the cortex wider than the closing
    bridges (e.g. where the acetabular rim was cut from the neck), which plain hole filling lets
    leak out, while leaving the concave outside of the femur alone.
    """
    small = _closing(femur, closing_mm, csp)
    return _fill_capped(small | _enclosed(small, _MIN_ENCLOSED_DIRECTIONS))


def _enclosed(mask: np.ndarray, min_hits: int) -> np.ndarray:
    """Voxels from which at least ``min_hits`` of the 26 lattice directions meet ``mask`` (the
    lower end of axis 0 counts as mask: the sawn shaft)."""
    m = np.pad(mask, 1)
    m[0] = True
    hits = np.zeros(m.shape, np.uint8)

    def shifted(d, s, ahead):
        # slices of x + s d (ahead) and of x (not ahead), for every x where both are in the array
        out = []
        for n, k in zip(m.shape, d):
            fwd, back = slice(s, None), slice(0, n - s)
            out.append(slice(None) if k == 0 else (fwd if (k > 0) == ahead else back))
        return tuple(out)

    for d in np.ndindex(3, 3, 3):
        d = np.array(d) - 1
        if not d.any():
            continue
        h = m.copy()
        s = 1
        reach = min(n for n, k in zip(m.shape, d) if k)
        while s < reach:  # doubling: h(x) = any mask at x + k d, 0 <= k < 2 s
            h[shifted(d, s, False)] |= h[shifted(d, s, True)]
            s *= 2
        hits += h
    return (hits >= min_hits)[1:-1, 1:-1, 1:-1]


def _closing(mask: np.ndarray, r_mm: float, csp) -> np.ndarray:
    """Closing by a ball of ``r_mm`` (Euclidean, via distance transforms); the box faces are
    continued outwards (edge padding) so the closing does not open at them."""
    pad = [int(np.ceil(r_mm / s)) + 1 for s in csp]
    m = np.pad(mask, [(k, k) for k in pad], mode="edge")
    grown = ndi.distance_transform_edt(~m, sampling=csp) <= r_mm
    closed = ndi.distance_transform_edt(grown, sampling=csp) > r_mm
    return closed[tuple(slice(k, -k) for k in pad)] | mask


def _fill_capped(mask: np.ndarray) -> np.ndarray:
    capped = np.concatenate([np.ones_like(mask[:1]), mask], axis=0)
    return ndi.binary_fill_holes(capped)[1:]


def _upsample_mask(phi, f, shape, sigma_vox, slab_voxels=1 << 24) -> np.ndarray:
    """Threshold at 0 of ``phi`` interpolated onto the fine grid, smoothed by ``sigma_vox`` and
    thresholded at 0.5 (uint8); slab by slab along axis 0 with a halo for the smoothing."""
    out = np.zeros(shape, np.uint8)
    coords = [(np.arange(n) + 0.5) / k - 0.5 for n, k in zip(shape, f)]
    halo = int(np.ceil(4.0 * sigma_vox[0])) if sigma_vox[0] > 0 else 0
    rows = max(1, slab_voxels // (shape[1] * shape[2]))
    for z0 in range(0, shape[0], rows):
        z1 = min(shape[0], z0 + rows)
        a, b = max(0, z0 - halo), min(shape[0], z1 + halo)
        fine = _separable_linear(phi, [coords[0][a:b], coords[1], coords[2]]) > 0
        if np.any(np.asarray(sigma_vox) > 0):
            fine = ndi.gaussian_filter(fine.astype(np.float32), sigma_vox, mode="nearest") >= 0.5
        out[z0:z1] = fine[z0 - a : z0 - a + (z1 - z0)]
    return out


def _separable_linear(a: np.ndarray, coords: list[np.ndarray]) -> np.ndarray:
    """Linear interpolation of ``a`` at the outer product of per-axis coordinates (edge-clamped)."""
    out = a
    for ax, c in enumerate(coords):
        c = np.clip(c, 0, a.shape[ax] - 1)
        i0 = np.floor(c).astype(int)
        i1 = np.minimum(i0 + 1, a.shape[ax] - 1)
        w = (c - i0).astype(np.float32)
        shape = [1, 1, 1]
        shape[ax] = -1
        w = w.reshape(shape)
        out = np.take(out, i0, axis=ax) * (1 - w) + np.take(out, i1, axis=ax) * w
    return out


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient of two masks (1.0 when both are empty)."""
    a = np.asarray(a, bool)
    b = np.asarray(b, bool)
    s = np.count_nonzero(a) + np.count_nonzero(b)
    return float(2.0 * np.count_nonzero(a & b) / s) if s else 1.0
