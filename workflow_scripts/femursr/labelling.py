"""Automatic geometric labelling of a proximal femur mask into head, neck, trochanter and shaft.

Where no label map is given for a template subject (``evaluation.template_labels: auto``, or a
cohort sheet without label maps), the template's regions come from the geometry of its femur
mask alone. The labels follow :data:`femursr.geometry.REGION_NAMES` (1 head, 2 neck,
3 trochanter, 4 shaft, 0 outside) and are written on the mask's own grid, with a QC figure
(:func:`labels_figure`) for a person to check.

Method (all lengths in mm from the spacing; nothing assumes an orientation or a side, so left
and right femora, and any pose of the scan, are labelled alike):

1. **Work grid.** The mask is averaged over blocks of about ``work_mm`` (slab by slab) and taken
   at one half; holes are filled and the largest component kept.
2. **Femoral head.** Candidates are the centres of the largest balls inscribed in the mask
   (maxima of the distance transform, each suppressing the others within two of its radii). For
   each, the sphere fit of the femur-mask backend (:func:`femursr.masks._fit_head`: least
   squares to where rays from the centre leave the mask near the current radius) is run, then
   refitted to the exits within ``sphere_tolerance`` of the sphere only (the backend's looser
   window lets the flare of the neck pull the centre towards it). The *coverage* is the
   fraction of 400 ray directions from the centre that leave the mask on the sphere (within
   that tolerance): a femoral head is a sphere pierced only by the neck (about 0.9); an
   inscribed ball of the trochanter or the shaft touches the surface along a band (a cylinder:
   about 0.5). The candidate with the largest coverage is the head; below
   ``min_head_coverage`` the mask has no head and a :class:`LabellingError` says so.
3. **Shaft axis.** The normals of a cylinder's surface all lie on the great circle perpendicular
   to its axis. The surface normals (gradient of the smoothed work mask) of the part of the mask
   beyond 0.6 of its largest distance from the head vote for the axis (the direction
   perpendicular to most of them; the flat cut end and the trochanteric bumps are outvoted),
   refined by least squares over the nearly perpendicular ones. Then, three times: the sections
   perpendicular to the axis (slabs one work voxel thick) are taken from the distal end; the
   *distal run* is the sections (the first two, partial, skipped) whose area stays within
   ``shaft_area_tolerance`` of the first millimetre's; the axis is refitted to the normals of the
   run alone and passes through the run's centroid. The axis points proximally.
4. **Neck axis.** The line from the head centre through the centre of the narrowest cross-section
   of the neck (the anatomical definition): starting from the direction towards the centroid of
   the mask in a shell just outside the head, the area of the sections perpendicular to the
   current axis (within 1.2 head radii of it) is profiled from half a head radius to nine tenths
   of the way to the shaft axis, and the axis is turned through the centroid of the smallest
   section until it settles. The narrowest section gives the neck radius ``r_n`` (equal-area
   circle); the closest approach of the neck axis to the shaft axis gives the neck length ``L``;
   the angle between the axes is the neck-shaft angle.
5. **Lesser trochanter level.** Along the shaft axis, from the distal end up, the first level
   where the mask's largest distance from the shaft axis exceeds the distal run's (median) by
   ``shaft_widening`` and stays so for ``widening_run_mm``: there the shaft widens into the
   lesser trochanter and the trochanteric region.
6. **Regions.** With ``t`` the position along the neck axis from the head centre towards the
   shaft and ``rho`` the distance from the neck axis: *head* = ``t < head_plane * R`` (the
   head-neck plane) and within ``1 + head_margin`` head radii of the centre; *neck* = from the
   head-neck plane to ``neck_end * L``, within ``neck_radius_factor * r_n`` of the neck axis;
   *shaft* = the rest below the lesser-trochanter level; *trochanter* = the rest above it
   (greater and lesser trochanter, intertrochanteric region). Every mask voxel gets one label.
   The defaults draw the regions as the synthetic cohort's truth does
   (:meth:`femursr.geometry.FemurShape.region_masks`: head-neck plane at 0.62 head radii, which is
   a little inside the sphere's junction with the neck, neck base at 0.7 of the neck length,
   neck radius about 1.6 narrowest-neck radii).

Errors name the mask (``where``) and the measurement that failed: no spherical end (a cylinder,
a head cut off), no shaft below the trochanters, or an empty region.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import ndimage as ndi

from .geometry import REGION_IDS, REGION_NAMES
from .masks import _fibonacci_sphere, _fit_head, _rays
from .pointcloud import _block_mean
from .volume import Volume, read_slab, slab_ranges, slab_thickness

log = logging.getLogger(__name__)


class LabellingError(ValueError):
    """The mask cannot be labelled automatically; the message names the mask, the measurement
    that failed and what to do."""


@dataclass
class LabellingParams:
    """Settings of :func:`label_femur` (lengths in mm, the rest relative)."""

    work_mm: float = 0.5  # the geometry is measured on blocks of about this size
    min_head_coverage: float = 0.7  # a head: this fraction of directions leave the mask on its sphere
    sphere_tolerance: float = 0.08  # of the head radius (at least one work voxel)
    max_head_candidates: int = 6  # inscribed balls tried as the head
    shaft_area_tolerance: float = 0.04  # distal run: sections within 1 +- this of the first ones
    shaft_widening: float = 0.12  # lesser trochanter: largest radius this much above the shaft's
    widening_run_mm: float = 1.0  # ... over at least this length along the shaft
    head_plane: float = 0.62  # head-neck plane: this many head radii from the head centre along the neck
    head_margin: float = 0.15  # head: within (1 + this) head radii of the centre
    neck_end: float = 0.7  # neck: up to this fraction of the head-centre-to-shaft-axis distance
    neck_radius_factor: float = 1.6  # neck: within this many narrowest-neck radii of the neck axis


@dataclass
class FemurGeometry:
    """What :func:`label_femur` measured, in LPS mm of the mask's physical space.

    ``neck_axis`` runs from the head centre towards the shaft, ``shaft_axis`` proximally; both
    unit vectors. ``shaft_point`` is the point of the shaft axis closest to the neck axis,
    ``lesser_trochanter_mm`` the point of the shaft axis at the shaft/trochanter boundary."""

    head_centre_mm: list
    head_radius_mm: float
    head_coverage: float
    neck_axis: list
    neck_centre_mm: list  # centre of the narrowest neck section
    neck_radius_mm: float
    neck_length_mm: float  # head centre to the closest approach of the shaft axis
    neck_shaft_angle_deg: float
    neck_to_shaft_axis_mm: float  # gap between the two axes where they pass closest
    junction_mm: float  # head-neck plane, from the head centre along the neck axis
    shaft_axis: list
    shaft_point_mm: list
    lesser_trochanter_mm: list
    shaft_radius_mm: float
    region_ml: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path) -> None:
        from .atomic import atomic_file

        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2))


# ------------------------------------------------------------------------------ the work grid
@dataclass
class _Work:
    """The mask on the work grid. Positions are in a local orthonormal frame ``q`` (mm, (z, y, x)
    order): fine voxel index ``k`` (z, y, x) sits at ``q = k * sp``; the LPS position is
    ``mask.index_to_physical((q / sp)[::-1])``."""

    solid: np.ndarray  # bool, work grid
    fval: np.ndarray  # float32: block fraction - 1/2 (> 0 inside), for sub-voxel ray exits
    f: np.ndarray  # block factor (z, y, x)
    sp: np.ndarray  # fine spacing (z, y, x) mm
    csp: np.ndarray  # work spacing (z, y, x) mm
    off: np.ndarray  # q of work voxel (0, 0, 0)

    def q_of(self, idx) -> np.ndarray:
        return np.asarray(idx, float) * self.csp + self.off

    def idx_of(self, q) -> np.ndarray:
        return (np.asarray(q, float) - self.off) / self.csp


def _work_grid(mask: Volume, work_mm: float, where: str) -> _Work:
    arr = mask.array
    sp = np.asarray(mask.spacing[::-1], float)
    f = np.array([max(1, int(round(work_mm / s))) for s in sp])
    thick = slab_thickness(arr.shape, multiple=int(f[0]))
    frac = np.concatenate(
        [_block_mean(read_slab(arr, z0, z1) > 0, tuple(f)) for z0, z1 in slab_ranges(arr.shape[0], thick)]
    )
    solid = ndi.binary_fill_holes(frac >= 0.5)
    lab, n = ndi.label(solid)
    if n == 0:
        raise LabellingError(f"{where}: the femur mask is empty")
    sizes = np.bincount(lab.ravel())[1:]
    solid = lab == 1 + int(np.argmax(sizes))
    fval = np.where(solid, np.maximum(frac, 0.5 + 1e-3), np.minimum(frac, 0.5)) - np.float32(0.5)
    return _Work(solid, fval.astype(np.float32), f, sp, sp * f, (f - 1) / 2.0 * sp)


# ------------------------------------------------------------------------------ femoral head
def _ray_exits(w: _Work, centre_idx, radius: float, dirs: np.ndarray) -> np.ndarray:
    """Distance (mm) from ``centre_idx`` (work-grid index) at which each ray first leaves the mask
    beyond half the ``radius`` (NaN when it does not within twice the radius)."""
    step = 0.25 * float(w.csp.min())
    radii = np.arange(0.5 * radius, 2.0 * radius, step)
    v = _rays(w.fval, np.asarray(centre_idx, float), dirs, radii, w.csp)
    out = v <= 0
    k = out.argmax(1)
    rows = np.arange(len(dirs))
    v0, v1 = v[rows, np.maximum(k - 1, 0)], v[rows, k]
    r = radii[np.maximum(k - 1, 0)] + step * v0 / np.maximum(v0 - v1, 1e-6)
    r[k == 0] = radii[0]
    r[~out.any(1)] = np.nan
    return r


def _coverage(w: _Work, centre_idx, radius: float, tolerance: float, dirs) -> float:
    tol = max(tolerance * radius, float(w.csp.max()))
    r = _ray_exits(w, centre_idx, radius, dirs)
    return float(np.mean(np.abs(np.nan_to_num(r, nan=np.inf) - radius) < tol))


def _head_candidates(w: _Work, n: int) -> list[tuple[np.ndarray, float]]:
    """Centres (work index) and radii (mm) of up to ``n`` large inscribed balls, far apart."""
    dt = ndi.distance_transform_edt(np.pad(w.solid, 1), sampling=w.csp)[1:-1, 1:-1, 1:-1]
    top = float(dt.max())
    out = []
    work = dt.copy()
    for _ in range(n):
        i = np.unravel_index(int(np.argmax(work)), work.shape)
        r = float(dt[i])
        if r < 0.35 * top or r <= 0:
            break
        out.append((np.array(i, float), r))
        # suppress everything within two radii
        h = np.ceil(2.0 * r / w.csp).astype(int)
        lo = np.maximum(np.array(i) - h, 0)
        hi = np.minimum(np.array(i) + h + 1, work.shape)
        g = np.ogrid[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        ball = sum(((g[k] - i[k]) * w.csp[k]) ** 2 for k in range(3)) < (2.0 * r) ** 2
        work[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]][ball] = 0
    return out


def _fit_sphere_at(w: _Work, centre_idx: np.ndarray, r0: float) -> tuple[np.ndarray, float]:
    """The mask backend's head fit (:func:`femursr.masks._fit_head`) started at an inscribed ball:
    on a crop around it, with the candidate limited to 1.25 of its radius so that the fit starts
    there."""
    h = np.ceil(2.7 * r0 / w.csp).astype(int) + 2
    c = np.round(centre_idx).astype(int)
    lo = np.maximum(c - h, 0)
    hi = np.minimum(c + h + 1, w.solid.shape)
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    g = np.ogrid[sl]
    ball = sum(((g[k] - centre_idx[k]) * w.csp[k]) ** 2 for k in range(3)) < (1.25 * r0) ** 2
    centre, radius, _ = _fit_head(w.solid[sl] & ball, w.fval[sl], w.csp)
    return centre + lo, radius


def _tighten_sphere(w: _Work, centre_idx, radius: float, tolerance: float, dirs, rounds: int = 3):
    """The sphere refitted (least squares) to the ray exits within ``tolerance`` of it only: the
    backend's fit accepts exits within a quarter of the radius, which lets the neck's flare pull
    the centre towards the neck."""
    for _ in range(rounds):
        tol = max(tolerance * radius, float(w.csp.max()))
        r = _ray_exits(w, centre_idx, radius, dirs)
        ok = np.abs(np.nan_to_num(r, nan=np.inf) - radius) < tol
        if ok.sum() < 20:
            break
        pts = w.q_of(centre_idx) + dirs[ok] * r[ok, None]
        # |p|^2 = 2 c.p + (r^2 - |c|^2), linear in (c, r^2 - |c|^2)
        sol, *_ = np.linalg.lstsq(np.c_[2 * pts, np.ones(len(pts))], (pts**2).sum(1), rcond=None)
        radius = float(np.sqrt(max(sol[3] + sol[:3] @ sol[:3], 0.0)))
        centre_idx = w.idx_of(sol[:3])
    return centre_idx, radius


def _find_head(w: _Work, p: LabellingParams, where: str) -> tuple[np.ndarray, float, float, list]:
    """Head centre (q mm), radius (mm), coverage, and what every candidate scored."""
    dirs = _fibonacci_sphere(400)
    tried = []
    best = None
    for idx, r0 in _head_candidates(w, p.max_head_candidates):
        centre, radius = _fit_sphere_at(w, idx, r0)
        if not np.isfinite(radius) or radius <= 0 or np.linalg.norm((centre - idx) * w.csp) > r0:
            centre, radius = idx, r0  # the fit ran away: score the inscribed ball itself
        centre, radius = _tighten_sphere(w, centre, radius, p.sphere_tolerance, dirs)
        cov = _coverage(w, centre, radius, p.sphere_tolerance, dirs)
        tried.append({"centre_q_mm": w.q_of(centre).round(2).tolist(), "radius_mm": round(radius, 2), "coverage": round(cov, 3)})
        if best is None or cov > best[2]:
            best = (w.q_of(centre), radius, cov)
    if best is None or best[2] < p.min_head_coverage:
        found = (
            f"the most spherical end (radius {best[1]:.1f} mm) leaves the mask on its sphere in only "
            f"{100 * best[2]:.0f} % of the directions from its centre"
            if best
            else "it holds no inscribed ball"
        )
        raise LabellingError(
            f"{where}: no femoral head found: {found}, below min_head_coverage = "
            f"{100 * p.min_head_coverage:.0f} % ({len(tried)} candidate(s) tried). The mask must hold the "
            "proximal femur with its whole head; check that this is the right femur mask, or give a region "
            "label map for this subject in evaluation.template_labels"
        )
    return best[0], best[1], best[2], tried


# ------------------------------------------------------------------------------ axes
def _surface_normals(w: _Work) -> tuple[np.ndarray, np.ndarray]:
    """Positions (q mm) and outward unit normals of the surface voxels of the work grid."""
    edge = w.solid & ~ndi.binary_erosion(w.solid, border_value=0)
    idx = np.argwhere(edge)
    sm = ndi.gaussian_filter(np.pad(w.fval, 2, constant_values=-0.5), 1.0)[2:-2, 2:-2, 2:-2]
    g = np.stack([np.gradient(sm, axis=k)[tuple(idx.T)] / w.csp[k] for k in range(3)], 1)
    norm = np.linalg.norm(g, axis=1)
    ok = norm > 0
    return w.q_of(idx[ok]), -g[ok] / norm[ok, None]


def _lateral_pole(nrm: np.ndarray, a: np.ndarray, rounds: int = 3) -> np.ndarray:
    """Refine the axis ``a`` of a cylinder from its surface normals: the direction most nearly
    perpendicular (least squares) to the normals within 20 degrees of perpendicular to ``a``."""
    for _ in range(rounds):
        lateral = nrm[np.abs(nrm @ a) < np.sin(np.radians(20))]
        if len(lateral) < 10:
            break
        a = np.linalg.eigh(lateral.T @ lateral)[1][:, 0]
    return a


def _cylinder_direction(nrm: np.ndarray) -> np.ndarray:
    """Direction of a cylinder from (some of) its surface normals, which all lie on the great
    circle perpendicular to its axis: the pole of the great circle that most normals lie within
    10 degrees of (a flat cut end and a few bumps are outvoted), then :func:`_lateral_pole`."""
    dirs = _fibonacci_sphere(4000)
    dirs = dirs[dirs[:, 0] >= 0]
    votes = np.zeros(len(dirs))
    for k in range(0, len(nrm), 4096):
        votes += (np.abs(nrm[k : k + 4096] @ dirs.T) < np.sin(np.radians(10))).sum(0)
    return _lateral_pole(nrm, dirs[int(np.argmax(votes))])


def _shaft_axis(q: np.ndarray, head: np.ndarray, w: _Work, p: LabellingParams, where: str):
    """The shaft: a point on its axis, the unit direction (proximal), the position of every voxel
    along it (``s``, mm from that point), and the straight distal run (start, length in mm) and
    its radius (equal-area circle).

    The direction comes from the surface normals (:func:`_cylinder_direction`), first of the part
    of the mask beyond 0.6 of the largest distance from the head, then of the distal run only:
    the sections from the distal end (the first two partial ones skipped) whose area stays within
    ``shaft_area_tolerance`` of the first millimetre's; the point is the run's centroid."""
    h = float(w.csp.max())
    vol = float(np.prod(w.csp))
    pos, nrm = _surface_normals(w)
    d = np.linalg.norm(q - head, axis=1)
    far = d >= 0.6 * d.max()
    u = _cylinder_direction(nrm[np.linalg.norm(pos - head, axis=1) >= 0.6 * d.max()])
    o = q[far].mean(0)
    first = 2  # the distal end's slabs are partial where the cut is not square to the axis
    ref_bins = max(3, int(np.ceil(1.0 / h)))  # about a millimetre beyond them
    run_lo, run_len, a_ref = 0.0, 0.0, 0.0
    for _ in range(3):
        if (head - o) @ u < 0:
            u = -u
        s = (q - o) @ u
        lo = float(s.min())
        b = np.floor((s - lo) / h).astype(np.int64)
        area = np.bincount(b) * vol / h
        if len(area) < first + ref_bins + 2:
            break
        a_ref = float(np.median(area[first : first + ref_bins]))
        ok = np.abs(area[first:] / a_ref - 1.0) <= p.shaft_area_tolerance
        n_run = int(np.argmin(ok)) if not ok.all() else len(ok)
        run_lo, run_len = lo + first * h, n_run * h
        if n_run < ref_bins:
            break
        in_run = (b >= first) & (b < first + n_run)
        sp = (pos - o) @ u
        u = _lateral_pole(nrm[(sp >= run_lo) & (sp < run_lo + run_len)], u)
        o = q[in_run].mean(0)
    if (head - o) @ u < 0:
        u = -u
    s = (q - o) @ u
    shaft_r = float(np.sqrt(a_ref / np.pi))
    if run_len < max(3 * h, 0.5 * shaft_r):
        raise LabellingError(
            f"{where}: no shaft found: the cross-sections of the mask's end farthest from the head change from "
            f"the start (a straight run of {run_len:.1f} mm); the mask must hold some shaft below the lesser "
            "trochanter, or give a region label map for this subject in evaluation.template_labels"
        )
    return o, u, s, float(s.min()), run_len, shaft_r


def _closest_points(c1, d1, c2, d2):
    """Parameters (t1, t2) of the closest points of the lines c1 + t1 d1 and c2 + t2 d2."""
    w0 = c1 - c2
    b = d1 @ d2
    den = 1.0 - b * b
    if den < 1e-9:
        return 0.0, float(w0 @ d2)
    t1 = (b * (w0 @ d2) - (w0 @ d1)) / den
    t2 = ((w0 @ d2) - b * (w0 @ d1)) / den
    return float(t1), float(t2)


def _neck_axis(q, head, radius, o, u, w: _Work, where: str):
    """Unit neck axis (head -> shaft), the centre and equal-area radius of the narrowest section,
    and the neck length (to the closest approach of the shaft axis)."""
    h = float(w.csp.max())
    vol = float(np.prod(w.csp))
    rel = q - head
    dist = np.linalg.norm(rel, axis=1)
    shell = (dist > radius) & (dist < 1.5 * radius)
    if not shell.any():
        raise LabellingError(f"{where}: nothing of the mask joins the femoral head (radius {radius:.1f} mm): no neck")
    n = rel[shell].mean(0)
    n /= np.linalg.norm(n)
    centre, r_n, length = None, 0.0, 0.0
    for _ in range(8):
        length, _ = _closest_points(head, n, o, u)
        t = rel @ n
        rho2 = dist**2 - t**2
        t_lo, t_hi = 0.5 * radius, 0.9 * length
        if t_hi <= t_lo + 3 * h:
            raise LabellingError(
                f"{where}: the femoral head (radius {radius:.1f} mm) sits {length:.1f} mm from the shaft axis "
                "along the neck: no room for a neck; is this a proximal femur mask?"
            )
        sel = (t >= t_lo) & (t < t_hi) & (rho2 < (1.2 * radius) ** 2)
        b = np.floor((t[sel] - t_lo) / h).astype(np.int64)
        nb = int(np.ceil((t_hi - t_lo) / h))
        counts = np.bincount(b, minlength=nb)[:nb].astype(float)
        smooth = np.convolve(counts, np.ones(3) / 3.0, mode="same")
        smooth[[0, -1]] = np.inf  # half windows at the ends
        k = int(np.argmin(smooth))
        in_k = sel.copy()
        in_k[sel] = np.abs(b - k) <= 1
        centre_new = q[in_k].mean(0)
        r_n = float(np.sqrt(smooth[k] * vol / h / np.pi))
        n_new = centre_new - head
        n_new /= np.linalg.norm(n_new)
        moved = np.degrees(np.arccos(np.clip(n_new @ n, -1, 1)))
        n, centre = n_new, centre_new
        if moved < 0.05:
            break
    length, t_shaft = _closest_points(head, n, o, u)
    gap = float(np.linalg.norm(head + length * n - (o + t_shaft * u)))
    return n, centre, r_n, length, o + t_shaft * u, gap


def _lesser_trochanter(q, o, u, s, lo, run_len, w: _Work, p: LabellingParams, where: str) -> float:
    """Level (shaft-axis coordinate from ``o``) where the shaft widens into the trochanters: the
    first section above the distal run's start whose largest distance from the axis exceeds the
    run's (median) by ``shaft_widening``, and the sections over the next ``widening_run_mm`` too."""
    h = float(w.csp.max())
    b = np.floor((s - lo) / h).astype(np.int64)
    rad = np.linalg.norm((q - o) - s[:, None] * u, axis=1)
    rmax = np.zeros(int(b.max()) + 1)
    np.maximum.at(rmax, b, rad)
    first = 2
    base = float(np.median(rmax[first : first + max(3, int(round(run_len / h)))]))
    wide = rmax > (1.0 + p.shaft_widening) * base
    need = max(2, int(np.ceil(p.widening_run_mm / h)))
    for k in range(first, len(rmax) - need + 1):
        if wide[k : k + need].all():
            return lo + k * h
    raise LabellingError(
        f"{where}: the shaft never widens into the trochanters along its axis (largest radius {rmax.max():.1f} mm, "
        f"shaft {base:.1f} mm); is this a proximal femur mask?"
    )


# ------------------------------------------------------------------------------ labelling
def label_femur(mask: Volume, params: LabellingParams | None = None, where: str = "femur mask") -> tuple[Volume, FemurGeometry]:
    """Region labels (uint8: 1 head, 2 neck, 3 trochanter, 4 shaft, 0 outside) of ``mask``
    (nonzero = femur) on its own grid, and the measured geometry (see the module docstring).
    Raises :class:`LabellingError`, naming ``where``, when the mask has no femoral head, no shaft
    or no neck, or a region comes out empty."""
    p = params or LabellingParams()
    w = _work_grid(mask, p.work_mm, where)
    q = w.q_of(np.argwhere(w.solid))
    head, radius, coverage, tried = _find_head(w, p, where)
    log.info("%s: head r = %.2f mm, coverage %.2f (candidates %s)", where, radius, coverage, tried)
    o, u, s, lo, run_len, shaft_r = _shaft_axis(q, head, w, p, where)
    n, neck_c, r_n, length, shaft_pt, gap = _neck_axis(q, head, radius, o, u, w, where)
    s_lt = _lesser_trochanter(q, o, u, s, lo, run_len, w, p, where)
    if (head - o) @ u <= s_lt:
        raise LabellingError(
            f"{where}: the femoral head centre lies below the lesser-trochanter level found along the shaft "
            "axis; the end taken as the shaft is not one (a mask cut close below the lesser trochanter?)"
        )
    nsa = float(np.degrees(np.arccos(np.clip(n @ u, -1, 1))))
    if not 95.0 < nsa < 170.0:
        raise LabellingError(
            f"{where}: the neck axis meets the shaft axis at {nsa:.0f} degrees (a femur: about 115 to 145); "
            "the mask's head, neck and shaft were not recognized"
        )
    t_j = p.head_plane * radius
    geom = _Regions(head, radius * (1 + p.head_margin), n, t_j, p.neck_end * length, p.neck_radius_factor * r_n, o, u, s_lt)

    # every voxel of the fine grid, slab by slab
    arr = mask.array
    out = np.zeros(arr.shape, np.uint8)
    for z0, z1 in slab_ranges(arr.shape[0], slab_thickness(arr.shape)):
        idx = np.argwhere(read_slab(arr, z0, z1) > 0)
        if idx.size == 0:
            continue
        idx[:, 0] += z0
        out[tuple(idx.T)] = geom.label(idx * w.sp)
    vox_ml = float(np.prod(w.sp)) / 1000.0
    region_ml = {name: float(np.count_nonzero(out == k)) * vox_ml for k, name in REGION_NAMES.items()}
    empty = [name for name, v in region_ml.items() if v == 0 and name != "shaft"]
    if empty:
        raise LabellingError(f"{where}: the automatic labels leave {', '.join(empty)} empty ({region_ml} mL)")

    def lps(qv):
        return [float(v) for v in mask.index_to_physical((np.asarray(qv) / w.sp)[::-1])]

    def lps_dir(dv):
        return [float(v) for v in mask.direction_matrix @ np.asarray(dv)[::-1]]

    result = FemurGeometry(
        head_centre_mm=lps(head),
        head_radius_mm=float(radius),
        head_coverage=coverage,
        neck_axis=lps_dir(n),
        neck_centre_mm=lps(neck_c),
        neck_radius_mm=r_n,
        neck_length_mm=float(length),
        neck_shaft_angle_deg=nsa,
        neck_to_shaft_axis_mm=gap,
        junction_mm=t_j,
        shaft_axis=lps_dir(u),
        shaft_point_mm=lps(shaft_pt),
        lesser_trochanter_mm=lps(o + s_lt * u),
        shaft_radius_mm=shaft_r,
        region_ml=region_ml,
        params=asdict(p),
    )
    log.info(
        "%s: head r %.2f mm, neck r %.2f mm, neck length %.1f mm, neck-shaft angle %.1f deg, regions (mL) %s",
        where, radius, r_n, length, result.neck_shaft_angle_deg, {k: round(v, 3) for k, v in region_ml.items()},
    )  # fmt: skip
    return mask.with_array(out), result


@dataclass
class _Regions:
    """The region predicates in the local frame ``q`` (mm, (z, y, x))."""

    head: np.ndarray
    head_reach: float
    neck_axis: np.ndarray
    junction: float
    neck_end: float
    neck_reach: float
    shaft_origin: np.ndarray
    shaft_axis: np.ndarray
    shaft_level: float

    def label(self, q: np.ndarray) -> np.ndarray:
        rel = q - self.head
        t = rel @ self.neck_axis
        d2 = np.einsum("ij,ij->i", rel, rel)
        head = (t < self.junction) & (d2 < self.head_reach**2)
        neck = ~head & (t >= self.junction) & (t < self.neck_end) & (d2 - t * t < self.neck_reach**2)
        below = (q - self.shaft_origin) @ self.shaft_axis < self.shaft_level
        out = np.full(len(q), REGION_IDS["trochanter"], np.uint8)
        out[below] = REGION_IDS["shaft"]
        out[neck] = REGION_IDS["neck"]
        out[head] = REGION_IDS["head"]
        return out


# ------------------------------------------------------------------------------ QC figure
def _plane_frames(g: FemurGeometry) -> list[tuple[str, np.ndarray, np.ndarray, tuple[str, str]]]:
    """The three orthogonal planes through the head centre: (title, horizontal and vertical unit
    vectors in LPS, axis names)."""
    n = np.asarray(g.neck_axis, float)
    u = np.asarray(g.shaft_axis, float)
    v = n - (n @ u) * u  # lateral, perpendicular to the shaft, in the neck-shaft plane
    v /= np.linalg.norm(v)
    e3 = np.cross(n, u)
    e3 /= np.linalg.norm(e3)
    e2 = u - (u @ n) * n  # proximal, perpendicular to the neck
    e2 /= np.linalg.norm(e2)
    return [
        ("neck-shaft plane", v, u, ("lateral (mm)", "proximal, along the shaft (mm)")),
        ("along the neck, across the neck-shaft plane", n, e3, ("along the neck axis (mm)", "normal of the neck-shaft plane (mm)")),
        ("across the neck, through the head centre", e3, e2, ("normal of the neck-shaft plane (mm)", "proximal, across the neck (mm)")),
    ]


def _sample_plane(labels: Volume, centre, a, b, extent, pixel):
    """Labels (nearest voxel) on the plane ``centre + x a + y b``, x and y over ``extent``."""
    (x0, x1), (y0, y1) = extent
    xs = np.arange(x0, x1, pixel)
    ys = np.arange(y0, y1, pixel)
    xx, yy = np.meshgrid(xs, ys)
    pts = np.asarray(centre)[None, None, :] + xx[..., None] * a + yy[..., None] * b
    ijk = np.rint(labels.physical_to_index(pts)).astype(np.int64)  # (x, y, z)
    shape_xyz = np.asarray(labels.shape[::-1])
    inside = np.all((ijk >= 0) & (ijk < shape_xyz), axis=-1)
    out = np.zeros(xx.shape, np.uint8)
    k = ijk[inside]
    out[inside] = np.asarray(labels.array)[k[:, 2], k[:, 1], k[:, 0]]
    return out, (xs[0] - pixel / 2, xs[-1] + pixel / 2, ys[0] - pixel / 2, ys[-1] + pixel / 2)


def labels_figure(labels: Volume, g: FemurGeometry, path, title: str = "") -> None:
    """QC of the automatic labels: three orthogonal slices through the femoral head centre (the
    neck-shaft plane, the plane along the neck across it, the section across the neck), the
    labels coloured, the fitted head sphere (its great circle), the neck axis (to where it passes
    the shaft axis), the head-neck plane and the end of the neck, the shaft axis and the
    lesser-trochanter level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .atomic import atomic_file
    from .templates import REGION_COLOURS

    c = np.asarray(g.head_centre_mm, float)
    n = np.asarray(g.neck_axis, float)
    u = np.asarray(g.shaft_axis, float)
    lt = np.asarray(g.lesser_trochanter_mm, float)
    shaft_pt = np.asarray(g.shaft_point_mm, float)
    # extent of the femur, from a subsample of its voxels
    arr = np.asarray(labels.array)
    step = max(1, int(round(np.cbrt(np.count_nonzero(arr) / 2e5)))) if arr.size else 1
    idx = np.argwhere(arr[::step, ::step, ::step] > 0) * step
    pos = labels.index_to_physical(idx[:, ::-1].astype(float)) - c
    pixel = max(min(labels.spacing), float(np.ptp(pos, axis=0).max()) / 450.0)
    colours = np.array([matplotlib.colors.to_rgb(REGION_COLOURS.get(k, "#000000")) for k in range(5)])
    colours[0] = (1.0, 1.0, 1.0)
    frames = _plane_frames(g)
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.6))
    t_end = g.params.get("neck_end", 0.7) * g.neck_length_mm
    for ax, (name, a, b, (xl, yl)) in zip(axes, frames):
        margin = 3.0
        px, py = pos @ a, pos @ b
        ext = ((px.min() - margin, px.max() + margin), (py.min() - margin, py.max() + margin))
        img, bounds = _sample_plane(labels, c, a, b, ext, pixel)
        # crop to what the slice holds (and the sphere)
        rows, cols = np.flatnonzero(img.any(1)), np.flatnonzero(img.any(0))
        if rows.size:
            r_ = g.head_radius_mm + margin
            ext = (
                (min(bounds[0] + cols[0] * pixel - margin, -r_), max(bounds[0] + (cols[-1] + 1) * pixel + margin, r_)),
                (min(bounds[2] + rows[0] * pixel - margin, -r_), max(bounds[2] + (rows[-1] + 1) * pixel + margin, r_)),
            )
        ax.imshow(colours[np.minimum(img, 4)], origin="lower", extent=bounds, interpolation="nearest")
        ang = np.linspace(0, 2 * np.pi, 200)
        r = g.head_radius_mm
        ax.plot(r * np.cos(ang), r * np.sin(ang), color="k", lw=1.2, label="head sphere")
        ax.plot(0, 0, "k+", ms=10)

        def proj(p):
            return np.array([(p - c) @ a, (p - c) @ b])

        if abs(n @ a) > 0.5 or abs(n @ b) > 0.5:  # the neck axis lies in this plane
            p0, p1 = proj(c - 1.3 * r * n), proj(c + g.neck_length_mm * n)
            ax.plot([p0[0], p1[0]], [p0[1], p1[1]], color="k", ls="--", lw=1.2, label="neck axis")
            perp = np.array([-(p1 - p0)[1], (p1 - p0)[0]]) / np.linalg.norm(p1 - p0)
            for t, style in ((g.junction_mm, ":"), (t_end, "-.")):
                m = proj(c + t * n)
                w = g.params.get("neck_radius_factor", 1.6) * g.neck_radius_mm
                ax.plot([m[0] - w * perp[0], m[0] + w * perp[0]], [m[1] - w * perp[1], m[1] + w * perp[1]], color="k", ls=style, lw=1)
        else:
            ax.plot(0, 0, "ko", mfc="none", ms=8, label="neck axis (along the view)")
        if ax is axes[0]:  # the neck-shaft plane holds the shaft axis
            lo_s = (pos @ u).min() + (c - shaft_pt) @ u
            hi_s = max((lt - shaft_pt) @ u, 0.0) + 0.5 * g.head_radius_mm  # up past the neck axis
            p0, p1 = proj(shaft_pt + lo_s * u), proj(shaft_pt + hi_s * u)
            ax.plot([p0[0], p1[0]], [p0[1], p1[1]], color="0.3", ls="--", lw=1, label="shaft axis")
            # the lesser-trochanter level: the plane through lt perpendicular to u, in this view
            ua, ub = u @ a, u @ b
            k = (lt - c) @ u
            xs = np.array(ext[0])
            if abs(ub) > 1e-3:
                ax.plot(xs, (k - ua * xs) / ub, color="0.3", ls=":", lw=1.2, label="lesser-trochanter level")
        ax.set_xlim(*ext[0])
        ax.set_ylim(*ext[1])
        ax.set_aspect("equal")
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.set_title(name, fontsize=9)
    handles = [plt.Line2D([], [], ls="", marker="s", color=REGION_COLOURS[k], label=v) for k, v in REGION_NAMES.items()]
    handles += [
        plt.Line2D([], [], color="k", lw=1.2, label="head sphere"),
        plt.Line2D([], [], color="k", ls="--", lw=1.2, label="neck axis"),
        plt.Line2D([], [], color="k", ls=":", lw=1, label="head-neck plane"),
        plt.Line2D([], [], color="k", ls="-.", lw=1, label="end of the neck"),
        plt.Line2D([], [], color="0.3", ls="--", lw=1, label="shaft axis"),
        plt.Line2D([], [], color="0.3", ls=":", lw=1.2, label="lesser-trochanter level"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=5, fontsize=8)
    fig.suptitle(
        f"{title}\nhead r {g.head_radius_mm:.1f} mm (sphere covers {100 * g.head_coverage:.0f} % of directions), "
        f"neck r {g.neck_radius_mm:.1f} mm, neck length {g.neck_length_mm:.1f} mm, "
        f"neck-shaft angle {g.neck_shaft_angle_deg:.1f} deg",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
