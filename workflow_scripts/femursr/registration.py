"""Rigid registration of the clinical CT (LR, moving) to the HR-pQCT (HR, fixed), and resampling.

This replaces the paper's manual pre-alignment in 3D Slicer and its BRAINSFit rigid step
(section 2.1):

1. **Femur of the HR.** The HR is box-averaged to a working grid (about 0.5 mm); bone is
   thresholded, closed and hole-filled into a solid femur mask. Flat ends of the mask along a
   grid axis are saw cuts (:func:`cut_faces`): there the in-situ femur of the LR goes on while
   the HR holds water, so no mask used below reaches past them.
2. **Automatic initial alignment** (in place of the manual one). The femur is located in the LR
   by masked normalized cross-correlation (NCC) of the HR, blurred to clinical resolution, with
   the LR: for every translation at once (FFT), for each rotation of a grid around a few base
   orientations: the scans' own axes and, with ``init_flips``, the 180 degree turns about the
   principal axes of the HR femur (the sign ambiguities of a principal-axes alignment). The
   template is the femur with a shell of soft tissue around it, which the pelvis, touching the
   femoral head across the joint gap, does not resemble. Each base's best rotation is refined on
   a finer grid; the best of all wins.
3. **Mattes mutual information**, multi-resolution, Euler 6 degrees of freedom, on the HR femur
   dilated by ``roi_margin_mm`` (the equivalent of BRAINSFit ``--transformType Rigid`` with a
   fixed-image mask).
4. **QC figures** (:func:`qc_measures`): the Mattes MI at the result (all samples of the finest
   level), the femur *Dice* of bone masks thresholded in both scans at the same clinical
   resolution (the HR blurred like the LR, each scan's threshold halfway between its own bone and
   soft-tissue medians), and the *structure NCC*: the correlation of the band-passed HR and LR
   inside the femur, away from its surface. The trabecular pattern of another subject does not
   correlate, so this catches an LR/HR pair of different subjects, whose femurs, alike in shape,
   reach nearly the same Dice. :func:`check_registration` raises :class:`RegistrationError` when
   either is below its threshold.

The transform follows ITK: it maps points of the fixed HR space to the moving LR space (LPS mm),
as ``truth/pose.tfm`` of the synthetic cohort does, and is stored as a ``.tfm`` (Euler3DTransform)
that SimpleITK and 3D Slicer read. :func:`resample_onto` puts the LR on the HR grid itself (cubic
B-spline), so the HR is never resampled.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import scipy.fft as sfft
import SimpleITK as sitk
from scipy import ndimage as ndi

from .atomic import atomic_file
from .volume import Volume, read_slab, slab_ranges, slab_thickness, take_plane

log = logging.getLogger(__name__)

# QC thresholds of check_registration, from the synthetic cohort (16 matched and 16 mismatched
# pairs at demo and test scale, LR noise 150 HU and SNR 0.93): matched pairs gave femur Dice
# 0.78-0.86 and structure NCC 0.20-0.52; pairs of different subjects, whose femurs are alike in
# shape, Dice 0.65-0.81 but structure NCC -0.03-0.05.
MIN_DICE = 0.70
MIN_STRUCTURE_NCC = 0.12


class RegistrationError(RuntimeError):
    """A registration that cannot be trusted (the message names the subject and the QC figures)."""


@dataclass
class RigidParams:
    """Parameters of :func:`register_rigid` (lengths in mm, angles in degrees, intensities in HU)."""

    # working grid and HR femur mask
    work_spacing_mm: float = 0.5  # the HR is box-averaged to about this spacing
    hr_bone_hu: float = 300.0  # bone threshold on the box-averaged HR
    mask_closing_mm: float = 1.0
    cut_area_ratio: float = 0.8  # an end of the mask is a cut where its cross-section is at least this
    # share of the cross-section cut_depth_mm further in (a flat face, not a rounded end)
    cut_depth_mm: float = 1.5
    cut_clearance_mm: float = 1.5  # the metric's mask stops this far before a cut (the smoothed cut face)
    # initial alignment: NCC over all translations (FFT), over a rotation grid
    init_spacing_mm: float = 4.0
    init_margin_mm: float = 6.0  # shell of soft tissue around the femur in the NCC template
    init_rotation_range_deg: float = 20.0
    init_rotation_step_deg: float = 10.0
    init_flips: bool = True
    init_refine_spacing_mm: float = 2.0
    init_refine_step_deg: float = 5.0
    lr_psf_sigma_mm: float = 0.6  # the HR is blurred by this to look like the LR (PSF and voxel)
    clip_hu: tuple = (-100.0, 1500.0)  # both scans are clipped to this range for the NCC
    # Mattes mutual information, multi-resolution (levels: shrink factors of the working grid)
    roi_margin_mm: float = 1.0  # metric mask: the HR femur dilated by this; less than the joint gap,
    # since the acetabulum, absent from the HR, would pull the femoral head away from it
    histogram_bins: int = 32
    shrink_factors: tuple = (4, 2, 1)
    smoothing_sigmas_mm: tuple = (2.0, 1.0, 0.5)
    sampling_fractions: tuple = (0.5, 0.25, 0.1)
    iterations: int = 200
    learning_rate: float = 1.0  # first step, in mm of the largest displacement (physical-shift scales)
    min_step: float = 1e-3
    seed: int = 20260101
    # QC figures
    qc_sigma_mm: float = 1.5  # smoothing of both scans before thresholding the Dice masks
    qc_margin_mm: float = 2.0  # the Dice is taken within the HR femur dilated by this
    structure_band_mm: float = 1.0  # structure NCC: detail below this scale (high-pass Gaussian sigma)
    structure_depth_mm: float = 4.0  # structure NCC: only this far inside the femur surface, where the
    # trabecular pattern, not the shape, is what the two scans share
    structure_min_voxels: int = 2000  # a femur too small for this depth is sampled less deep

    def __post_init__(self):
        n = len(self.shrink_factors)
        if len(self.smoothing_sigmas_mm) != n or len(self.sampling_fractions) != n:
            raise ValueError("shrink_factors, smoothing_sigmas_mm and sampling_fractions need one entry per level")
        self.clip_hu = tuple(float(v) for v in self.clip_hu)
        self.shrink_factors = tuple(int(v) for v in self.shrink_factors)
        self.smoothing_sigmas_mm = tuple(float(v) for v in self.smoothing_sigmas_mm)
        self.sampling_fractions = tuple(float(v) for v in self.sampling_fractions)


@dataclass
class RegistrationResult:
    """Outcome of :func:`register_rigid`.

    ``transform``: HR (fixed) point -> LR (moving) point, LPS mm. ``metric``: Mattes mutual
    information at the result (negative; lower is better). ``dice``: femur Dice of LR and HR
    bone masks above the saw cut. ``initial``: the initial alignment (transform, NCC, scores of
    each base orientation). ``qc``: the QC record (what :func:`write_registration_outputs` writes
    as JSON). ``structure_ncc``: correlation of the trabecular detail inside the femur.
    ``hr_femur``: the HR femur mask on the working grid (for figures).
    """

    transform: sitk.Euler3DTransform
    metric: float
    dice: float
    initial: dict
    qc: dict
    structure_ncc: float = float("nan")
    hr_femur: Volume | None = field(default=None, repr=False)


# ------------------------------------------------------------------------------- helpers
def _image(vol: Volume) -> sitk.Image:
    img = vol.to_sitk()
    return img if img.GetPixelID() == sitk.sitkFloat32 else sitk.Cast(img, sitk.sitkFloat32)


def _dilate(mask: np.ndarray, spacing_zyx, radius_mm: float) -> np.ndarray:
    """Voxels within ``radius_mm`` of ``mask`` (Euclidean, in mm)."""
    if radius_mm <= 0 or not mask.any():
        return mask.copy()
    return ndi.distance_transform_edt(~mask, sampling=spacing_zyx) <= radius_mm


def _erode(mask: np.ndarray, spacing_zyx, radius_mm: float) -> np.ndarray:
    """Voxels of ``mask`` farther than ``radius_mm`` from its outside (the grid border counts as inside)."""
    if radius_mm <= 0:
        return mask.copy()
    return ndi.distance_transform_edt(mask, sampling=spacing_zyx) > radius_mm


def _spacing_zyx(img: sitk.Image) -> np.ndarray:
    return np.asarray(img.GetSpacing(), float)[::-1]


def _close(mask: np.ndarray, spacing_zyx, radius_mm: float) -> np.ndarray:
    """Morphological closing by a ball of ``radius_mm``, padded so that the border does not erode."""
    pad = int(np.ceil(radius_mm / np.min(spacing_zyx))) + 1
    m = _erode(_dilate(np.pad(mask, pad), spacing_zyx, radius_mm), spacing_zyx, radius_mm)
    return m[pad:-pad, pad:-pad, pad:-pad]


def _fill_with_lids(mask: np.ndarray) -> np.ndarray:
    """Fill the holes of ``mask``, first closing a tube that ends open on its bounding box (a saw
    cut) with a lid: the hole-filled end slice."""
    if not mask.any():
        return mask
    sl = ndi.find_objects(mask.astype(np.uint8))[0]
    box = mask[sl]
    padded = np.pad(box, 1)
    for ax in range(3):
        for end, src in ((0, 1), (-1, -2)):
            lid = ndi.binary_fill_holes(np.take(padded, src, axis=ax))
            idx = [slice(None)] * 3
            idx[ax] = end
            padded[tuple(idx)] |= lid
    filled = ndi.binary_fill_holes(padded)[1:-1, 1:-1, 1:-1]
    out = mask.copy()
    out[sl] = filled | box
    return out


def _largest_component(mask: np.ndarray) -> np.ndarray:
    lab, n = ndi.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(np.argmax(sizes))


def cut_faces(mask: np.ndarray, spacing_zyx=(1.0, 1.0, 1.0), ratio: float = 0.8, depth_mm: float = 1.5) -> dict:
    """Ends of ``mask`` (z, y, x) that are saw cuts, as ``{axis: (first, last)}`` slice indices
    (``None`` for an end that is not cut); axes without a cut are absent.

    A cut leaves a flat face: the mask's cross-section at its last slice along a grid axis is
    about as large as ``depth_mm`` further in (at least ``ratio`` of it). A rounded end (the top
    of the femoral head, the side of the shaft) grows from a small cap or a thin strip instead.
    A femur clipped by the edge of the HR field of view counts as cut there too.
    """
    limits = {}
    for ax in range(3):
        area = mask.sum(axis=tuple(a for a in range(3) if a != ax))
        occ = np.flatnonzero(area)
        k = int(np.ceil(depth_mm / float(spacing_zyx[ax]))) + 1
        if occ.size < 2 * k + 2:
            continue
        lo, hi = int(occ[0]), int(occ[-1])
        # the first two slices: a partial-volume sliver of the face may lead
        lo_cut = max(area[lo], area[lo + 1]) >= ratio * area[lo + k]
        hi_cut = max(area[hi], area[hi - 1]) >= ratio * area[hi - k]
        if lo_cut or hi_cut:
            limits[ax] = (lo if lo_cut else None, hi if hi_cut else None)
    return limits


def _slab(shape, limits: dict, inset: int = 0) -> np.ndarray:
    """Boolean array that is False beyond the cut faces ``limits`` (see :func:`cut_faces`) and
    within ``inset`` slices before them."""
    keep = np.ones(shape, bool)
    for ax, (lo, hi) in limits.items():
        idx = np.arange(shape[ax])
        ok = np.ones(shape[ax], bool)
        if lo is not None:
            ok &= idx >= lo + inset
        if hi is not None:
            ok &= idx <= hi - inset
        keep &= ok.reshape([-1 if a == ax else 1 for a in range(3)])
    return keep


def _with_array(ref: sitk.Image, array: np.ndarray) -> sitk.Image:
    img = sitk.GetImageFromArray(array)
    img.CopyInformation(ref)
    return img


def _resample(img: sitk.Image, ref: sitk.Image, transform=None, interp=sitk.sitkLinear, default=0.0) -> sitk.Image:
    return sitk.Resample(img, ref, transform or sitk.Transform(3, sitk.sitkIdentity), interp, float(default), img.GetPixelID())


def _grid_like(img: sitk.Image, spacing_mm: float) -> sitk.Image:
    """An empty image covering ``img``'s extent with isotropic ``spacing_mm`` and the same axes."""
    size = [max(1, int(np.ceil(n * s / spacing_mm))) for n, s in zip(img.GetSize(), img.GetSpacing())]
    # keep the physical centre
    d = np.reshape(img.GetDirection(), (3, 3))
    c = np.asarray(img.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in img.GetSize()]))
    origin = c - d @ ((np.asarray(size) - 1) / 2 * spacing_mm)
    ref = sitk.Image([int(v) for v in size], sitk.sitkUInt8)
    ref.SetSpacing([float(spacing_mm)] * 3)
    ref.SetOrigin([float(v) for v in origin])
    ref.SetDirection(img.GetDirection())
    return ref


def _smooth_to(img: sitk.Image, spacing_mm: float, sigma_mm: float) -> sitk.Image:
    """``img`` smoothed (Gaussian, ``sigma_mm``) and resampled to an isotropic grid."""
    if sigma_mm > 0:
        img = sitk.SmoothingRecursiveGaussian(img, float(sigma_mm))
    return _resample(img, _grid_like(img, spacing_mm))


# --------------------------------------------------------------------------- HR femur
@dataclass
class _Fixed:
    image: sitk.Image  # HR box-averaged to the working grid, float32
    femur: np.ndarray  # solid femur (z, y, x) on that grid
    roi: np.ndarray  # femur dilated, not past the cut faces
    keep: np.ndarray  # the slab between the cut faces
    cuts: dict
    centre: np.ndarray  # centroid of the femur, LPS mm
    axes: np.ndarray  # principal axes (columns), LPS


def _work_image(hr: Volume, spacing_mm: float, slab_voxels: int | None = None) -> sitk.Image:
    """The HR box-averaged by whole voxels (``sitk.BinShrink``) to about ``spacing_mm``, float32.

    An HR larger than a slab (``slab_voxels``, default :data:`femursr.volume.SLAB_VOXELS`) is
    shrunk slab by slab along z, each slab a whole number of bins thick, so that it is never whole
    in memory; every bin lies in one slab, so the result is that of one BinShrink of the whole.
    """
    k = [max(1, int(round(spacing_mm / s))) for s in hr.spacing]
    if max(k) == 1:
        return _image(hr)
    thick = slab_thickness(hr.shape, slab_voxels, multiple=k[2])
    if thick >= hr.shape[0]:
        return sitk.BinShrink(_image(hr), k)
    z_end = hr.shape[0] // k[2] * k[2]  # BinShrink drops the slices of an incomplete last bin
    parts, first = [], None
    for z0, z1 in slab_ranges(z_end, thick):
        slab = Volume(read_slab(hr.array, z0, z1), hr.spacing, hr.index_to_physical([0, 0, z0]), hr.direction)
        shrunk = sitk.BinShrink(_image(slab), k)
        if first is None:
            first = shrunk  # slab 0 starts at the HR's origin: its geometry is the result's
        parts.append(sitk.GetArrayFromImage(shrunk))
    work = sitk.GetImageFromArray(np.concatenate(parts, axis=0))
    work.SetSpacing(first.GetSpacing())
    work.SetOrigin(first.GetOrigin())
    work.SetDirection(first.GetDirection())
    return work


def _prepare_fixed(hr: Volume, p: RigidParams, label: str) -> _Fixed:
    work = _work_image(hr, p.work_spacing_mm)
    a = sitk.GetArrayViewFromImage(work)
    sp = _spacing_zyx(work)
    bone = a > p.hr_bone_hu
    if bone.sum() < 100:
        raise RegistrationError(f"{label}: no bone above {p.hr_bone_hu:g} HU in the HR (is it an HR-pQCT of a femur?)")
    femur = _largest_component(_fill_with_lids(_close(bone, sp, p.mask_closing_mm)))
    cuts = cut_faces(femur, sp, p.cut_area_ratio, p.cut_depth_mm)
    keep = _slab(femur.shape, cuts)
    # the cut face, smoothed, darkens the HR next to it while the LR femur goes on: keep clear
    inset = int(np.ceil(p.cut_clearance_mm / min(work.GetSpacing())))
    roi = _dilate(femur, sp, p.roi_margin_mm) & _slab(femur.shape, cuts, inset)
    pts = _index_to_point(work, np.argwhere(femur)[:, ::-1])
    centre = pts.mean(0)
    w, v = np.linalg.eigh(np.cov((pts - centre).T))
    axes = v[:, np.argsort(w)[::-1]]
    if np.linalg.det(axes) < 0:
        axes[:, 2] *= -1
    return _Fixed(work, femur, roi, keep, cuts, centre, axes)


# ------------------------------------------------------------------- initial alignment
def _euler(rot: np.ndarray, centre, translation) -> sitk.Euler3DTransform:
    t = sitk.Euler3DTransform()
    t.SetCenter([float(v) for v in centre])
    t.SetMatrix([float(v) for v in np.asarray(rot).ravel()], 1e-6)
    t.SetTranslation([float(v) for v in translation])
    return t


def _matrix(t) -> np.ndarray:
    return np.reshape(t.GetMatrix(), (3, 3))


def _rot_xyz(ax, ay, az) -> np.ndarray:
    ax, ay, az = np.deg2rad([ax, ay, az])
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _rotation_grid(range_deg: float, step_deg: float) -> list:
    """Rotations on a lattice of Euler angles (``step_deg`` apart) within a ball of ``range_deg``
    plus half a step, so that any rotation up to ``range_deg`` has a lattice point close by."""
    n = int(np.floor(range_deg / step_deg + 1e-9)) + 1 if step_deg > 0 else 0
    angles = np.arange(-n, n + 1) * step_deg
    limit = range_deg + 0.5 * step_deg + 1e-9
    return [_rot_xyz(a, b, c) for a in angles for b in angles for c in angles if np.sqrt(a * a + b * b + c * c) <= limit]


def rotation_angle_deg(rot: np.ndarray) -> float:
    return float(np.rad2deg(np.arccos(np.clip((np.trace(rot) - 1) / 2, -1, 1))))


class _NCCSearch:
    """Masked NCC of a rotated HR template against the LR, for all translations at once (FFT).

    The template is the HR blurred to clinical resolution, its mask the femur with a shell of
    ``init_margin_mm`` around it (bone inside, soft tissue outside: the pelvis does not look like
    that). Only translations that put the whole mask inside the LR field of view are scored.
    """

    def __init__(self, lr: sitk.Image, fixed: _Fixed, p: RigidParams, spacing_mm: float):
        lo, hi = p.clip_hu
        self.clip = (lo, hi)
        self.spacing = float(spacing_mm)
        g = _smooth_to(lr, spacing_mm, 0.5 * spacing_mm)
        self.grid = g
        self.direction = np.reshape(g.GetDirection(), (3, 3))
        ga = np.clip(sitk.GetArrayFromImage(g).astype(np.float64), lo, hi)
        self.lr_shape = np.array(ga.shape)
        self.fft_shape = tuple(sfft.next_fast_len(int(a), real=True) for a in ga.shape)
        gp = np.zeros(self.fft_shape)
        gp[tuple(slice(0, a) for a in ga.shape)] = ga
        self.F_g = sfft.rfftn(gp)
        self.F_g2 = sfft.rfftn(gp * gp)
        sp = _spacing_zyx(fixed.image)
        mask = _dilate(fixed.femur, sp, p.init_margin_mm) & fixed.keep
        sigma = float(np.hypot(p.lr_psf_sigma_mm, 0.5 * spacing_mm))
        self.template = sitk.SmoothingRecursiveGaussian(fixed.image, sigma)
        self.mask = _with_array(fixed.image, mask.astype(np.float32))
        self.centre = fixed.centre
        # the template grid (LR axes) holds the mask's bounding sphere, so any rotation fits
        box = ndi.find_objects(mask.astype(np.uint8))[0]
        corners = np.array([[b.start if c else b.stop - 1 for b, c in zip(box, bits)] for bits in np.ndindex(2, 2, 2)])
        pts = _index_to_point(fixed.image, corners[:, ::-1])
        radius = float(np.linalg.norm(pts - fixed.centre, axis=1).max()) + spacing_mm
        n = int(np.ceil(2 * radius / spacing_mm)) + 1
        self.ref = sitk.Image([n, n, n], sitk.sitkFloat32)
        self.ref.SetSpacing([self.spacing] * 3)
        self.t_origin = fixed.centre - self.direction @ np.full(3, (n - 1) / 2 * spacing_mm)
        self.ref.SetOrigin([float(v) for v in self.t_origin])
        self.ref.SetDirection([float(v) for v in self.direction.ravel()])
        # one thread: for images this small, ITK's threading costs more than it saves
        self.resampler = sitk.ResampleImageFilter()
        self.resampler.SetReferenceImage(self.ref)
        self.resampler.SetInterpolator(sitk.sitkLinear)
        self.resampler.SetNumberOfThreads(1)

    def score(self, rot: np.ndarray):
        """Best NCC over translations for the HR -> LR rotation ``rot``, with its transform
        (HR -> LR; None when the mask cannot fit in the LR field of view)."""
        # template point y (rotated about the HR centroid) <- HR point c + R^T (y - c)
        back = sitk.AffineTransform(3)
        back.SetCenter([float(v) for v in self.centre])
        back.SetMatrix([float(v) for v in rot.T.ravel()])
        self.resampler.SetTransform(back)
        m = sitk.GetArrayFromImage(self.resampler.Execute(self.mask)) >= 0.5  # a copy: the image is a temporary
        box = ndi.find_objects(m.astype(np.uint8))
        if not box:
            return -np.inf, None
        box = box[0]
        m = m[box]
        b = np.array(m.shape)
        if (b > self.lr_shape).any():
            return -np.inf, None
        lo, hi = self.clip
        f = np.clip(sitk.GetArrayFromImage(self.resampler.Execute(self.template))[box].astype(np.float64), lo, hi)
        mf = np.where(m, f, 0.0)
        N = float(m.sum())
        Sf, Sff = float(mf.sum()), float((mf * mf).sum())
        vf = Sff - Sf * Sf / N
        if vf <= 0:
            return -np.inf, None
        pad = [(0, F - s) for F, s in zip(self.fft_shape, b)]
        F_m = np.conj(sfft.rfftn(np.pad(m.astype(np.float64), pad)))
        F_mf = np.conj(sfft.rfftn(np.pad(mf, pad)))
        # shifts u (z, y, x) with the whole box inside the LR: 0 <= u <= L - b (no wrap-around)
        valid = tuple(slice(0, int(v) + 1) for v in self.lr_shape - b)
        Sg = sfft.irfftn(F_m * self.F_g, s=self.fft_shape)[valid]
        Sgg = sfft.irfftn(F_m * self.F_g2, s=self.fft_shape)[valid]
        Sfg = sfft.irfftn(F_mf * self.F_g, s=self.fft_shape)[valid]
        vg = Sgg - Sg * Sg / N
        ok = vg > 1e-3 * N
        ncc = np.full(Sg.shape, -np.inf)
        ncc[ok] = (Sfg[ok] - Sf * Sg[ok] / N) / np.sqrt(vf * vg[ok])
        idx = np.unravel_index(int(np.argmax(ncc)), ncc.shape)
        best = float(ncc[idx])
        if not np.isfinite(best):
            return -np.inf, None
        u = np.array(idx, float)
        for ax in range(3):  # sub-voxel peak: a parabola through the neighbours
            if 0 < idx[ax] < ncc.shape[ax] - 1:
                a = list(idx)
                a[ax] -= 1
                v0 = ncc[tuple(a)]
                a[ax] += 2
                v1 = ncc[tuple(a)]
                den = v0 - 2 * best + v1
                if np.isfinite(den) and den < 0:
                    u[ax] += float(np.clip(0.5 * (v0 - v1) / den, -0.5, 0.5))
        # the box's voxel 0 sits at LR-grid voxel u: physical offset of the template grid
        start = np.array([s.start for s in box], float)
        t_box = self.t_origin + self.direction @ (start[::-1] * self.spacing)
        shift = np.asarray(self.grid.GetOrigin()) + self.direction @ (u[::-1] * self.spacing) - t_box
        return best, _euler(rot, self.centre, shift)


def _index_to_point(img: sitk.Image, ijk) -> np.ndarray:
    """LPS points (N, 3) of continuous indices ``ijk`` (N, 3; x, y, z order) of ``img``."""
    ijk = np.asarray(ijk, float)
    return np.asarray(img.GetOrigin()) + (ijk * np.asarray(img.GetSpacing())) @ np.reshape(img.GetDirection(), (3, 3)).T


def _points(img: sitk.Image, mask: np.ndarray, n_max: int = 20000) -> np.ndarray:
    """LPS points of (at most about ``n_max`` of) the voxels of ``mask`` on the grid of ``img``."""
    kji = np.argwhere(mask)
    return _index_to_point(img, kji[:: max(1, len(kji) // n_max), ::-1])


def _base_orientations(fixed: _Fixed, flips: bool) -> list:
    """The scans' own axes and, with ``flips``, the 180 degree turns about the HR femur's principal
    axes (the sign ambiguities of a principal-axes alignment)."""
    bases = [("none", np.eye(3))]
    if flips:
        for i in range(3):
            turn = -np.ones(3)
            turn[i] = 1.0
            bases.append((f"turn about principal axis {i + 1}", fixed.axes @ np.diag(turn) @ fixed.axes.T))
    return bases


def initial_alignment(lr: sitk.Image, fixed: _Fixed, p: RigidParams, label: str = "") -> tuple:
    """Initial HR -> LR transform by the masked-NCC search; returns (transform, record).

    For each base orientation, the rotation grid is searched at ``init_spacing_mm``; the best
    rotation of each base is refined on a finer rotation grid at ``init_refine_spacing_mm``, and
    the best of those wins. The record holds each base's scores, so a close runner-up (an
    ambiguous pose) shows in the QC.
    """
    t_start = time.perf_counter()
    coarse = _NCCSearch(lr, fixed, p, p.init_spacing_mm)
    fine = _NCCSearch(lr, fixed, p, p.init_refine_spacing_mm) if p.init_refine_spacing_mm else coarse
    grid = _rotation_grid(p.init_rotation_range_deg, p.init_rotation_step_deg)
    local = _rotation_grid(p.init_refine_step_deg, p.init_refine_step_deg)
    per_base, n = [], 0
    for name, base in _base_orientations(fixed, p.init_flips):
        scored = [c for c in (coarse.score(r @ base) for r in grid) if c[1] is not None]
        n += len(grid)
        if not scored:
            continue
        s0, tf0 = max(scored, key=lambda c: c[0])
        r0 = _matrix(tf0)
        refined = [c for c in (fine.score(r @ r0) for r in local) if c[1] is not None] or [(s0, tf0)]
        n += len(local)
        s1, tf1 = max(refined, key=lambda c: c[0])
        per_base.append({"base": name, "coarse_ncc": float(s0), "ncc": float(s1), "transform": tf1})
    if not per_base:
        raise RegistrationError(
            f"{label}: the HR femur with {p.init_margin_mm:g} mm around it does not fit in the LR field of view at any pose"
        )
    per_base.sort(key=lambda c: -c["ncc"])
    best = per_base[0]
    t = best["transform"]
    record = {
        "method": "masked NCC over all translations (FFT) and a rotation grid per base orientation",
        "ncc": best["ncc"],
        "ncc_runner_up": per_base[1]["ncc"] if len(per_base) > 1 else None,
        "base_orientation": best["base"],
        "rotation_deg": rotation_angle_deg(_matrix(t)),
        "matrix": list(t.GetMatrix()),
        "translation_mm": list(t.GetTranslation()),
        "centre_mm": list(t.GetCenter()),
        "bases": [{k: v for k, v in c.items() if k != "transform"} for c in per_base],
        "rotations_tried": n,
        "seconds": time.perf_counter() - t_start,
    }
    runner = "none" if record["ncc_runner_up"] is None else f"{record['ncc_runner_up']:.3f}"
    log.info("%s: initial alignment NCC %.3f (%s; best other base %s), %d rotations, %.1f s", label, best["ncc"], best["base"],
             runner, n, record["seconds"])  # fmt: skip
    return t, record


# ------------------------------------------------------------------------ registration
def _metric_method(p: RigidParams, roi_img: sitk.Image) -> sitk.ImageRegistrationMethod:
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=int(p.histogram_bins))
    reg.SetMetricFixedMask(roi_img)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    return reg


def _mattes(fixed_img, roi_img, moving, init, p: RigidParams):
    """Multi-resolution Mattes MI from ``init``; returns (Euler3DTransform, stop condition, iterations)."""
    reg = _metric_method(p, roi_img)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentagePerLevel(list(p.sampling_fractions), int(p.seed))
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=float(p.learning_rate), minStep=float(p.min_step), numberOfIterations=int(p.iterations),
        relaxationFactor=0.5, gradientMagnitudeTolerance=1e-8,
    )  # fmt: skip
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(list(p.shrink_factors))
    reg.SetSmoothingSigmasPerLevel(list(p.smoothing_sigmas_mm))
    n_iter = [0]

    def count():
        n_iter[0] += 1

    reg.AddCommand(sitk.sitkIterationEvent, count)
    tfm = sitk.Euler3DTransform(init)
    reg.SetInitialTransform(tfm, inPlace=True)  # tfm holds the result
    reg.Execute(fixed_img, moving)
    return tfm, reg.GetOptimizerStopConditionDescription(), n_iter[0]


def _final_metric(fixed_img, roi_img, moving, transform, p: RigidParams) -> float:
    """Mattes MI at ``transform`` on every voxel of the mask at the finest level (deterministic)."""
    reg = _metric_method(p, roi_img)
    reg.SetMetricSamplingStrategy(reg.NONE)
    reg.SetShrinkFactorsPerLevel([int(p.shrink_factors[-1])])
    reg.SetSmoothingSigmasPerLevel([float(p.smoothing_sigmas_mm[-1])])
    reg.SetInitialTransform(sitk.Euler3DTransform(transform))
    return float(reg.MetricEvaluate(fixed_img, moving))


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 2.0 * float(np.logical_and(a, b).sum()) / s if s else 0.0


def _midpoint(a: np.ndarray, inside: np.ndarray, outside: np.ndarray) -> float:
    return 0.5 * (float(np.median(a[inside])) + float(np.median(a[outside])))


def qc_measures(lr: sitk.Image, fixed: _Fixed, transform, p: RigidParams) -> dict:
    """QC figures of the LR registered onto the HR's working grid, above the saw cut.

    ``dice``: Dice of bone masks thresholded in both scans at the same clinical resolution (the HR
    blurred like the LR, both smoothed by ``qc_sigma_mm``) within ``qc_margin_mm`` of the HR femur;
    each scan's threshold lies halfway between its medians inside and outside the HR femur, so the
    two scanners' calibrations need not agree. ``structure_ncc``: Pearson correlation of the HR
    (blurred like the LR) and the LR after removing detail coarser than ``structure_band_mm``,
    over the femur deeper than ``structure_depth_mm``.
    """
    sp = _spacing_zyx(fixed.image)
    region = _dilate(fixed.femur, sp, p.qc_margin_mm) & fixed.keep
    inside = fixed.femur & fixed.keep
    shell = region & ~fixed.femur
    s = float(p.qc_sigma_mm)
    lr_s = sitk.GetArrayFromImage(_resample(sitk.SmoothingRecursiveGaussian(lr, s), fixed.image, transform, default=-1000.0))
    hr_s = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(fixed.image, float(np.hypot(s, p.lr_psf_sigma_mm))))
    lr_bone = (lr_s > _midpoint(lr_s, inside, shell)) & region
    hr_bone = (hr_s > _midpoint(hr_s, inside, shell)) & region
    depth = float(p.structure_depth_mm)
    inner = ndi.distance_transform_edt(fixed.femur, sampling=sp)
    deep = (inner > depth) & fixed.keep
    while deep.sum() < p.structure_min_voxels and depth > 0.5:
        depth /= 2
        deep = (inner > depth) & fixed.keep
    out = {"dice": _dice(lr_bone, hr_bone), "structure_ncc": float("nan")}
    out.update(structure_voxels=int(deep.sum()), structure_depth_mm=depth)
    if deep.sum() > 10:
        band = float(p.structure_band_mm)
        lr_w = sitk.Cast(_resample(lr, fixed.image, transform, default=-1000.0), sitk.sitkFloat32)
        hr_w = sitk.SmoothingRecursiveGaussian(fixed.image, float(p.lr_psf_sigma_mm))
        detail = [sitk.GetArrayFromImage(img - sitk.SmoothingRecursiveGaussian(img, band))[deep].astype(np.float64) for img in (hr_w, lr_w)]
        if detail[0].std() > 0 and detail[1].std() > 0:
            out["structure_ncc"] = float(np.corrcoef(detail[0], detail[1])[0, 1])
    return out


def register_rigid(hr: Volume, lr: Volume, *, label: str = "", **params) -> RegistrationResult:
    """Rigidly register the clinical CT ``lr`` (moving) to the HR-pQCT ``hr`` (fixed).

    Returns a :class:`RegistrationResult` whose ``transform`` maps HR points to LR points (LPS mm),
    with its QC figures. ``params`` are fields of :class:`RigidParams` (a misspelt one is a
    TypeError). Raises :class:`RegistrationError` only when no alignment can be attempted (no bone
    in the HR; the HR femur does not fit in the LR field of view); judging the result is
    :func:`check_registration`'s job.
    """
    p = RigidParams(**params)
    t0 = time.perf_counter()
    fixed = _prepare_fixed(hr, p, label)
    moving = _image(lr)
    t_fixed = time.perf_counter()
    init, initial = initial_alignment(moving, fixed, p, label)
    t_init = time.perf_counter()
    # the fixed image of the metric: the working grid cropped to the mask's bounding box
    box = ndi.find_objects(fixed.roi.astype(np.uint8))[0]
    index = [int(b.start) for b in box][::-1]
    size = [int(b.stop - b.start) for b in box][::-1]
    fixed_img = sitk.RegionOfInterest(fixed.image, size, index)
    roi_img = sitk.RegionOfInterest(_with_array(fixed.image, fixed.roi.astype(np.uint8)), size, index)
    final, stop, n_iter = _mattes(fixed_img, roi_img, moving, init, p)
    metric = _final_metric(fixed_img, roi_img, moving, final, p)
    t_mi = time.perf_counter()
    measures = qc_measures(moving, fixed, final, p)
    init_measures = qc_measures(moving, fixed, init, p)
    initial.update({k: init_measures[k] for k in ("dice", "structure_ncc")})
    seconds = {"hr_femur": t_fixed - t0, "initial": t_init - t_fixed, "mattes": t_mi - t_init}
    seconds["total"] = time.perf_counter() - t0
    qc = {
        "subject": label,
        "convention": "ITK: the transform maps HR (fixed) points to LR (moving) points, LPS mm",
        "metric": "Mattes mutual information at the result, all mask voxels of the finest level (lower is better)",
        "final_metric": metric,
        "femur_dice": measures["dice"],
        "structure_ncc": measures["structure_ncc"],
        "structure_voxels": measures["structure_voxels"],
        "structure_depth_mm": measures["structure_depth_mm"],
        "rotation_deg": rotation_angle_deg(_matrix(final)),
        "matrix": list(final.GetMatrix()),
        "translation_mm": list(final.GetTranslation()),
        "centre_mm": list(final.GetCenter()),
        "moved_from_initial_mm": float(target_registration_error(init, final, _points(fixed.image, fixed.femur, 5000)).max()),
        "optimizer_stop": stop,
        "iterations": n_iter,
        "initial": initial,
        "hr_femur_voxels": int(fixed.femur.sum()),
        "hr_cut_faces": {"zyx"[ax]: list(lim) for ax, lim in fixed.cuts.items()},
        "work_spacing_mm": list(fixed.image.GetSpacing()),
        "seconds": seconds,
        "params": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(p).items()},
    }
    log.info("%s: Mattes MI %.4f (%d iterations; %s); femur Dice %.3f, structure NCC %.3f; %.1f s", label, metric, n_iter,
             stop, measures["dice"], measures["structure_ncc"], seconds["total"])  # fmt: skip
    femur = Volume(fixed.femur.astype(np.uint8), fixed.image.GetSpacing(), fixed.image.GetOrigin(), fixed.image.GetDirection())
    return RegistrationResult(final, metric, measures["dice"], initial, qc, measures["structure_ncc"], femur)


def check_registration(
    result: RegistrationResult, *, min_dice: float = MIN_DICE, min_structure_ncc: float = MIN_STRUCTURE_NCC, label: str = ""
) -> None:
    """Raise :class:`RegistrationError` when the femur Dice is below ``min_dice`` or the structure
    NCC below ``min_structure_ncc``.

    The message names the subject and gives the QC figures (and the QC figure's path once
    :func:`write_registration_outputs` has written it), so that an LR and HR of different
    subjects, or a femur outside the LR field of view, stop the subject instead of flowing on.
    """
    label = label or result.qc.get("subject", "") or "registration"
    failed = []
    if not np.isfinite(result.dice) or result.dice < min_dice:
        failed.append(f"femur Dice {result.dice:.3f} < {min_dice:.3f}")
    if not np.isfinite(result.structure_ncc) or result.structure_ncc < min_structure_ncc:
        failed.append(f"structure NCC {result.structure_ncc:.3f} < {min_structure_ncc:.3f}")
    if failed:
        png = result.qc.get("files", {}).get("qc_png")
        raise RegistrationError(
            f"{label}: rigid registration LR -> HR failed QC: {' and '.join(failed)} "
            f"(femur Dice {result.dice:.3f}, structure NCC {result.structure_ncc:.3f}, Mattes MI {result.metric:.4f}, "
            f"initial NCC {result.initial.get('ncc', float('nan')):.3f}). Are the LR and HR scans of the same femur, "
            "and is the femur inside the LR field of view?" + (f" See {png}." if png else "")
        )


# ------------------------------------------------------------------------- resampling
INTERPOLATORS = {"bspline": sitk.sitkBSpline, "linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor}


# LR voxels kept around the part of the LR that a slab of the HR grid samples. The cubic
# B-spline's prefilter runs along whole lines, but the influence of a voxel decays by 0.268 per
# voxel (0.268^26 < 1e-14), and interpolation reaches 2 voxels: so cropping 28 voxels beyond the
# points leaves the interpolated values as on the whole LR.
_CROP_MARGIN_VOX = {"bspline": 28, "linear": 2, "nearest": 2}
_LINEAR_TRANSFORMS = (sitk.Euler3DTransform, sitk.VersorRigid3DTransform, sitk.AffineTransform, sitk.Similarity3DTransform,
                      sitk.TranslationTransform)  # fmt: skip


def _resample_grid(moving: sitk.Image, hr: Volume, start_xyz, size_xyz, transform, interpolator: str, default_hu: float) -> np.ndarray:
    """``moving`` resampled onto the block of the HR grid that starts at index ``start_xyz``
    (x, y, z) and has ``size_xyz`` voxels; (z, y, x) float32."""
    f = sitk.ResampleImageFilter()
    f.SetSize([int(v) for v in size_xyz])
    f.SetOutputSpacing(hr.spacing)
    f.SetOutputOrigin(hr.origin if not any(start_xyz) else [float(v) for v in hr.index_to_physical(start_xyz)])
    f.SetOutputDirection(hr.direction)
    f.SetTransform(transform)
    f.SetInterpolator(INTERPOLATORS[interpolator])
    f.SetDefaultPixelValue(float(default_hu))
    f.SetOutputPixelType(sitk.sitkFloat32)
    return sitk.GetArrayFromImage(f.Execute(moving))


def _lr_part(moving: sitk.Image, lr: Volume, hr: Volume, start_xyz, size_xyz, transform, interpolator: str):
    """The part of ``moving`` that the HR block (``start_xyz``, ``size_xyz``) samples, with
    :data:`_CROP_MARGIN_VOX` around it; None when the block lies wholly outside the LR; the whole
    LR when the transform is not linear (its image of the block is not bounded by the corners')."""
    t = transform.Downcast() if type(transform) is sitk.Transform else transform
    if not isinstance(t, _LINEAR_TRANSFORMS):
        return moving
    start, size = np.asarray(start_xyz), np.asarray(size_xyz)
    corners = np.array([start + (size - 1) * np.array(bits) for bits in np.ndindex(2, 2, 2)], float)
    ijk = lr.physical_to_index(transform_points(t, hr.index_to_physical(corners)))
    margin = _CROP_MARGIN_VOX[interpolator]
    n = np.asarray(lr.shape[::-1])
    lo = np.maximum(np.floor(ijk.min(0)).astype(int) - margin, 0)
    hi = np.minimum(np.ceil(ijk.max(0)).astype(int) + margin, n - 1)
    if (hi < lo).any():
        return None
    if (lo == 0).all() and (hi == n - 1).all():
        return moving
    return sitk.RegionOfInterest(moving, [int(v) for v in hi - lo + 1], [int(v) for v in lo])


def resample_onto(
    lr: Volume, hr: Volume, transform, *, interpolator: str = "bspline", default_hu: float = -1000.0, out=None, slab_voxels: int | None = None
) -> Volume:
    """The LR on the HR grid itself (same shape, spacing, origin, direction), float32 HU.

    ``transform`` maps HR points to LR points, as :func:`register_rigid` returns it. Interpolation
    is a cubic B-spline (``"bspline"``, SimpleITK's ``sitkBSpline``), ``"linear"`` or ``"nearest"``;
    HR voxels whose point falls outside the LR field of view get ``default_hu``. Only the HR's
    geometry is used: the HR itself is not resampled.

    An HR grid larger than a slab (``slab_voxels``, default :data:`femursr.volume.SLAB_VOXELS`) is
    filled slab by slab along z, each slab from the part of the LR its points fall in (with a
    margin that leaves the interpolated values as on the whole LR, to float rounding), so memory
    holds the output and one slab. ``out`` takes the result slab by slab: None (a new array in
    memory) or an array-like with slab assignment on the HR grid, such as a
    :class:`~femursr.volume.VolumeWriter` (the returned Volume then holds its ``array``), so that
    a paper-scale result (5.6 GB of float32) is never whole in memory.
    """
    if interpolator not in INTERPOLATORS:
        raise ValueError(f"interpolator {interpolator!r}: choose one of {', '.join(INTERPOLATORS)}")
    moving = _image(lr)
    nz, ny, nx = hr.shape
    meta = {"resampled_from": "LR", "interpolator": interpolator}
    thick = slab_thickness(hr.shape, slab_voxels)
    if thick >= nz and out is None:
        array = _resample_grid(moving, hr, (0, 0, 0), (nx, ny, nz), transform, interpolator, default_hu)
        return Volume(array, hr.spacing, hr.origin, hr.direction, meta)
    dest = np.empty(hr.shape, np.float32) if out is None else out
    for z0, z1 in slab_ranges(nz, thick):
        start, size = (0, 0, z0), (nx, ny, z1 - z0)
        part = _lr_part(moving, lr, hr, start, size, transform, interpolator) if thick < nz else moving
        if part is None:
            dest[z0:z1] = np.full((z1 - z0, ny, nx), default_hu, np.float32)
        else:
            dest[z0:z1] = _resample_grid(part, hr, start, size, transform, interpolator, default_hu)
    return Volume(dest if isinstance(dest, np.ndarray) else dest.array, hr.spacing, hr.origin, hr.direction, meta)


def in_fixed_frame(moving: Volume, transform) -> Volume:
    """``moving`` (the LR) with its voxels untouched and its geometry expressed in the fixed (HR) frame.

    ``transform`` maps fixed points to moving points, p_LR = A p_HR + b (as :func:`register_rigid`
    returns it), and must be rigid. A voxel at p_LR = o + D S i sits at p_HR = Aᵀ(p_LR - b), so the
    same array with origin Aᵀ(o - b) and direction AᵀD lies where the registration puts it: no
    interpolation, and resampling it onto the HR grid with the identity gives what
    :func:`resample_onto` gives.
    """
    t = transform.Downcast() if type(transform) is sitk.Transform else transform
    if not isinstance(t, (sitk.Euler3DTransform, sitk.VersorRigid3DTransform, sitk.AffineTransform, sitk.Similarity3DTransform)):
        raise ValueError(f"expected a rigid 3D transform, got {t.GetName()}")
    a = np.reshape(t.GetMatrix(), (3, 3))
    if not (np.allclose(a.T @ a, np.eye(3), atol=1e-6) and np.linalg.det(a) > 0):
        raise ValueError(f"{t.GetName()} is not a rotation (scaling, shear or reflection): its geometry cannot be folded into the moving volume's")
    c = np.asarray(t.GetCenter(), float)
    b = c + np.asarray(t.GetTranslation(), float) - a @ c
    origin = a.T @ (np.asarray(moving.origin, float) - b)
    direction = a.T @ moving.direction_matrix
    return Volume(moving.array, moving.spacing, tuple(origin), tuple(direction.ravel()), dict(moving.meta))


def transform_points(t, points_mm) -> np.ndarray:
    """Apply a SimpleITK transform to points (N, 3) in mm; linear transforms in one matrix product."""
    pts = np.asarray(points_mm, float).reshape(-1, 3)
    if type(t) is sitk.Transform:  # as sitk.ReadTransform returns it
        t = t.Downcast()
    if isinstance(t, (sitk.Euler3DTransform, sitk.VersorRigid3DTransform, sitk.AffineTransform, sitk.Similarity3DTransform)):
        c = np.asarray(t.GetCenter())
        return (pts - c) @ np.reshape(t.GetMatrix(), (3, 3)).T + c + np.asarray(t.GetTranslation())
    return np.array([t.TransformPoint([float(v) for v in q]) for q in pts])


def target_registration_error(transform_est, transform_true, points_mm) -> np.ndarray:
    """Distance (mm) between where the two transforms send each of ``points_mm`` (N, 3)."""
    return np.linalg.norm(transform_points(transform_est, points_mm) - transform_points(transform_true, points_mm), axis=1)


# ---------------------------------------------------------------------------- outputs
def _mask_on_slice(mask: Volume, hr: Volume, axis: int, index: int) -> np.ndarray:
    """``mask`` (any grid) sampled (nearest) on one slice of the HR grid; ``axis`` 0, 1, 2 = z, y, x."""
    shape = [n for a, n in enumerate(hr.shape) if a != axis]
    g = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    kji = [None, None, None]
    it = iter(g)
    for a in range(3):
        kji[a] = np.full(g[0].shape, index) if a == axis else next(it)
    ijk = np.stack([kji[2], kji[1], kji[0]], axis=-1).astype(float)
    m_ijk = np.rint(mask.physical_to_index(hr.index_to_physical(ijk))).astype(int)
    inside = np.all((m_ijk >= 0) & (m_ijk < np.asarray(mask.shape[::-1])), axis=-1)
    out = np.zeros(g[0].shape, bool)
    mi = m_ijk[inside]
    out[inside] = mask.array[mi[:, 2], mi[:, 1], mi[:, 0]] > 0
    return out


def qc_figure(result: RegistrationResult, hr: Volume, lr_resampled: Volume | None, path, title: str = "", *, lr: Volume | None = None) -> None:
    """PNG of three orthogonal slices through the HR femur's centroid: the resampled LR (top) and
    the HR (bottom), each with the HR femur's contour. Written atomically.

    ``lr_resampled`` is the LR on the HR grid (:func:`resample_onto`); or None, with ``lr`` the LR
    itself: then only the three slices shown are resampled (linear, ``result.transform``), which
    spares resampling a whole paper-scale grid (5.6 GB) for a figure.
    """
    from matplotlib.figure import Figure

    femur = result.hr_femur
    if femur is None:
        raise ValueError("the result carries no HR femur mask (hr_femur) to draw")
    c = femur.index_to_physical(np.argwhere(femur.array > 0).mean(0)[::-1])
    k = np.clip(np.rint(hr.physical_to_index(c)).astype(int), 0, np.asarray(hr.shape[::-1]) - 1)  # x, y, z
    planes = (("axial", 0, int(k[2])), ("coronal", 1, int(k[1])), ("sagittal", 2, int(k[0])))
    fig = Figure(figsize=(13, 8.4), constrained_layout=True)
    axes = fig.subplots(2, 3)
    moving = _image(lr) if lr_resampled is None else None
    for col, (name, axis, idx) in enumerate(planes):
        contour = _mask_on_slice(femur, hr, axis, idx)
        if moving is None:
            lr_plane = take_plane(lr_resampled.array, axis, idx)
        else:
            start = [0, 0, 0]
            start[2 - axis] = idx
            size = list(hr.shape[::-1])
            size[2 - axis] = 1
            lr_plane = np.take(_resample_grid(moving, hr, start, size, result.transform, "linear", -1000.0), 0, axis=axis)
        hr_plane = take_plane(hr.array, axis, idx)
        for row, (a, what, vmax) in enumerate(((lr_plane, "LR on the HR grid", 1500), (hr_plane, "HR", 1800))):
            ax = axes[row, col]
            origin = "upper" if axis == 0 else "lower"  # superior up in coronal and sagittal views
            ax.imshow(a, cmap="gray", vmin=-300, vmax=vmax, origin=origin, interpolation="nearest")
            if contour.any():
                ax.contour(contour.astype(float), levels=[0.5], colors="#ff5a1f", linewidths=0.9)
            ax.set_title(f"{what}, {name} slice {idx}")
            ax.set_xticks([])
            ax.set_yticks([])
    q = result.qc
    fig.suptitle(
        title
        or f"{q.get('subject', '')}: femur Dice {result.dice:.3f}, structure NCC {result.structure_ncc:.3f}, "
        f"Mattes MI {result.metric:.4f}, rotation {q.get('rotation_deg', float('nan')):.1f} deg (orange: HR femur)"
    )
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, float) and not np.isfinite(v):
        return None
    return v


def write_registration_outputs(
    result: RegistrationResult, tfm_path, qc_json_path, qc_png_path, hr: Volume, lr_resampled: Volume | None = None, *, lr: Volume | None = None
) -> None:
    """Write the transform (``.tfm``, HR -> LR, readable by SimpleITK and 3D Slicer), the QC record
    (JSON) and the QC figure (PNG). All three are built under temporary names and renamed only when
    all are complete, so a failure leaves none of them. The figure shows ``lr_resampled`` (the LR on
    the HR grid) or, given ``lr`` instead, the LR resampled on the figure's three slices only (see
    :func:`qc_figure`)."""
    if lr_resampled is None:
        if lr is None:
            raise ValueError("give lr_resampled (the LR on the HR grid) or lr (the LR itself) for the QC figure")
    elif not lr_resampled.same_grid(hr):
        raise ValueError("lr_resampled is not on the HR grid (use resample_onto)")
    result.qc["files"] = {"transform": str(tfm_path), "qc_json": str(qc_json_path), "qc_png": str(qc_png_path)}
    with atomic_file(tfm_path) as t_tfm, atomic_file(qc_json_path) as t_json, atomic_file(qc_png_path) as t_png:
        sitk.WriteTransform(result.transform, str(t_tfm))
        t_json.write_text(json.dumps(_jsonable(result.qc), indent=2))
        qc_figure(result, hr, lr_resampled, t_png, lr=lr)
