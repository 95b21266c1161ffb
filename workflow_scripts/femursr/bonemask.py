"""Bone-structure masks of the evaluated volumes (LR on the HR grid, SR, HR), and the femur outline
each volume's own bone mask gives (paper section 3.1, step 1).

Two backends (config ``evaluation.bone_mask.backend``), both kept inside the femur mask; a
function for either comes from :func:`bone_segmenter`.

Backend ``nnunet`` (the paper's: "a binary bone mask is then generated from a nnUNet trained on
HR-CTs"): an nnU-Net (``femursr.nnunet``, label ``bone``) trained on the training subjects' HR
volumes at their own voxel size, with the synthetic truth (trabecular bone and cortex) or the
HR's threshold mask (:func:`training_bone_label`) as labels; it predicts on the evaluated volume's
own grid, over the femur mask's bounding box (:func:`nnunet_bone_mask`).

Backend ``threshold``: Gaussian smoothing (``sigma_mm``) and one global threshold on the
normalized intensity ([0, 1], the window of ``preprocessing.normalize``), kept inside the femur
mask, as Scanco's and BoneJ's users segment HR-pQCT (Scanco's default smoothing, sigma 0.8 voxel
at 82 um, is 0.066 mm). The volume is smoothed slab by slab along z with a halo of slices, so a
paper-scale volume (memory-mapped) is never held whole as float.

:func:`bone_outline` is the solid femur that a bone mask outlines (closing, then holes filled in
axial, coronal and sagittal slices, inside the femur mask, largest component): the shape whose
surface places the ROIs when every volume places its own (``evaluation.roi_source: own``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import ndimage as ndi

from .volume import Volume, crop, nonzero_box, read_slab, slab_ranges, slab_thickness


@dataclass
class BoneThreshold:
    """Settings of the threshold backend: ``sigma_mm`` (Gaussian, 0 = none) and ``threshold`` on
    the normalized intensity (0.45 is 700 HU in the demo's window of -200 to 1800 HU)."""

    sigma_mm: float = 0.066
    threshold: float = 0.45

    def __post_init__(self):
        if self.sigma_mm < 0:
            raise ValueError(f"bone mask: sigma_mm must be >= 0, got {self.sigma_mm}")
        if not 0 < self.threshold < 1:
            raise ValueError(f"bone mask: threshold is on the normalized intensity and must lie in (0, 1), got {self.threshold}")


def threshold_bone_mask(vol: Volume, femur: Volume, params: BoneThreshold, label: str = "volume") -> Volume:
    """Bone (1) where the smoothed ``vol`` exceeds ``params.threshold`` inside ``femur``; uint8 on
    the grid of ``vol``. ``femur`` must be on the same grid (``label`` names the volume in errors).
    """
    if not vol.same_grid(femur):
        raise ValueError(
            f"{label}: the volume {vol.shape} at {vol.spacing} mm and the femur mask {femur.shape} at "
            f"{femur.spacing} mm are not on the same grid; both must be on the HR grid"
        )
    sigma_zyx = [params.sigma_mm / s for s in vol.spacing[::-1]]
    halo = int(4.0 * max(sigma_zyx) + 0.5) if params.sigma_mm > 0 else 0  # gaussian_filter's reach
    out = np.zeros(vol.shape, np.uint8)
    f = np.asarray(femur.array)
    nz = vol.shape[0]
    for z0, z1 in slab_ranges(nz, slab_thickness(vol.shape)):
        a0, a1 = max(0, z0 - halo), min(nz, z1 + halo)
        slab = read_slab(vol.array, a0, a1).astype(np.float32, copy=False)
        if not np.isfinite(slab).all():
            raise ValueError(f"{label}: the volume holds NaN or infinite values (slices {a0} to {a1 - 1})")
        if params.sigma_mm > 0:
            # mode nearest: the femur never touches the edge of a normalized volume except at a
            # saw cut, where continuing the last slice is the best guess
            slab = ndi.gaussian_filter(slab, sigma_zyx, mode="nearest")
        out[z0:z1] = (slab[z0 - a0 : z1 - a0] > params.threshold) & (f[z0:z1] > 0)
    return femur.with_array(out)


def nnunet_bone_mask(predictor, vol: Volume, femur: Volume, *, threshold: float = 0.5, label: str = "volume") -> Volume:
    """Bone (uint8 0/1) predicted by an nnU-Net bone model (``femursr.nnunet.load_model``) on
    ``vol``'s own grid, inside ``femur`` (same grid).

    Only the femur mask's bounding box is given to nnU-Net (the rest is outside the femur); the
    bone probability (label ``bone``) is thresholded at ``threshold``. The model must have been
    trained on volumes normalized like ``vol`` and at about its voxel size.
    """
    from .nnunet import predict_probability

    if not vol.same_grid(femur):
        raise ValueError(
            f"{label}: the volume {vol.shape} at {vol.spacing} mm and the femur mask {femur.shape} at "
            f"{femur.spacing} mm are not on the same grid; both must be on the HR grid"
        )
    out = np.zeros(vol.shape, np.uint8)
    box = nonzero_box(femur.array, 2)  # the femur's bounding box and 2 voxels
    if box is None:
        return femur.with_array(out)
    part = crop(vol, box)
    a = np.asarray(part.array, np.float32)
    if not np.isfinite(a).all():
        raise ValueError(f"{label}: the volume holds NaN or infinite values inside the femur's bounding box")
    prob = predict_probability(predictor, part.with_array(a), "bone")
    out[box] = (np.asarray(prob.array) >= threshold) & (np.asarray(femur.array)[box] > 0)
    return femur.with_array(out)


def training_bone_label(source: str, hr: Volume, femur: Volume, tissue: Volume | None = None,
                        params: BoneThreshold | None = None, label: str = "volume") -> Volume:  # fmt: skip
    """The bone label (uint8 0/1, inside ``femur``) an nnU-Net bone model is trained on, for one
    training subject's normalized ``hr``: ``truth`` (the synthetic cohort: tissue classes 2,
    trabecular bone, and 3, cortex, of ``tissue`` on the HR grid) or ``threshold`` (the HR's own
    threshold mask with ``params``: the nnU-Net then learns the threshold segmentation of the HR
    and applies it to the LR and SR volumes, which differ from the HR in blur and noise)."""
    if source == "truth":
        if tissue is None:
            raise ValueError(f"{label}: truth labels need the synthetic tissue map")
        if not tissue.same_grid(hr):
            raise ValueError(f"{label}: the tissue map {tissue.shape} at {tissue.spacing} mm is not on the HR grid {hr.shape}")
        bone = (np.asarray(tissue.array) >= 2) & (np.asarray(femur.array) > 0)
        return femur.with_array(bone.astype(np.uint8))
    if source == "threshold":
        return threshold_bone_mask(hr, femur, params or BoneThreshold(), label=label)
    raise ValueError(f"{label}: unknown bone label source {source!r} (truth or threshold)")


def bone_segmenter(options: dict, model_folder=None) -> Callable[[Volume, Volume, str], Volume]:
    """A function ``(volume, femur, label) -> bone mask`` for config ``evaluation.bone_mask``
    (``options``): the threshold backend, or the nnunet backend with the model in
    ``model_folder`` (loaded once; fold, device and mirroring from ``options["nnunet"]``)."""
    backend = options["backend"]
    if backend == "threshold":
        params = BoneThreshold(sigma_mm=options["sigma_mm"], threshold=options["threshold"])
        return lambda vol, femur, label="volume": threshold_bone_mask(vol, femur, params, label=label)
    if backend == "nnunet":
        from .nnunet import load_model

        if model_folder is None:
            raise ValueError("bone mask: the nnunet backend needs the folder of a trained bone model")
        nn = options["nnunet"]
        predictor = load_model(model_folder, folds=[nn["fold"]], device=nn["device"], mirroring=nn["mirroring"])
        if "bone" not in predictor.dataset_json["labels"]:
            raise ValueError(
                f"nnU-Net model {model_folder} has no label 'bone' (its labels: {', '.join(predictor.dataset_json['labels'])}): "
                "evaluation.bone_mask.nnunet.model_folder must be a bone-structure model, not the femur model"
            )
        return lambda vol, femur, label="volume": nnunet_bone_mask(predictor, vol, femur, label=label)
    raise ValueError(f"unknown bone-mask backend {backend!r} (threshold or nnunet)")


def _closing(mask: np.ndarray, r_mm: float, sp_zyx) -> np.ndarray:
    """Closing by a ball of ``r_mm`` (Euclidean, by distance transforms), not opened by the box
    faces (edge padding)."""
    import edt

    if r_mm <= 0:
        return mask
    pad = [int(np.ceil(r_mm / s)) + 1 for s in sp_zyx]
    m = np.pad(mask, [(k, k) for k in pad], mode="edge")
    grown = edt.edtsq(~m, anisotropy=tuple(sp_zyx), black_border=False) <= r_mm**2
    closed = edt.edtsq(grown, anisotropy=tuple(sp_zyx), black_border=False) > r_mm**2
    return closed[tuple(slice(k, -k) for k in pad)] | mask


def _fill_slices(mask: np.ndarray) -> np.ndarray:
    """Holes filled in every axial, coronal and sagittal slice (union over the three axes): the
    marrow inside a cortical ring is enclosed in some slice even where the shaft is sawn open."""
    out = mask.copy()
    for axis in range(3):
        for k in range(mask.shape[axis]):
            sl = [slice(None)] * 3
            sl[axis] = k
            sl = tuple(sl)
            out[sl] |= ndi.binary_fill_holes(mask[sl])
    return out


def _block_any(a: np.ndarray, f) -> np.ndarray:
    """True where any voxel of a block of ``f`` voxels is set (edge blocks padded with False)."""
    pad = [(0, -n % k) for n, k in zip(a.shape, f)]
    a = np.pad(a, pad)
    s = a.shape
    return a.reshape(s[0] // f[0], f[0], s[1] // f[1], f[1], s[2] // f[2], f[2]).any(axis=(1, 3, 5))


def bone_outline(bone: Volume, femur: Volume, closing_mm: float = 1.0, voxel_mm: float = 0.0) -> Volume:
    """The solid femur outlined by a bone mask (uint8, grid of ``bone``): the bone closed by a
    ball of ``closing_mm``, holes filled slice-wise, largest component, kept inside ``femur``.

    The closing and filling run on blocks of about ``voxel_mm`` (0: the voxels themselves; a block
    counts as bone when any of its voxels is bone), which is plenty for a surface sampled by
    10,000 points and keeps a paper-scale volume cheap; the result is intersected with the
    full-resolution femur mask. Empty when the bone mask is empty."""
    b = np.asarray(bone.array) > 0
    out = np.zeros(bone.shape, np.uint8)
    if not b.any():
        return bone.with_array(out)
    sp_zyx = np.asarray(bone.spacing[::-1], float)
    f = tuple(max(1, int(round(voxel_mm / s))) if voxel_mm else 1 for s in sp_zyx)
    # crop to the bone's bounding box plus the closing radius, on whole blocks
    grown = nonzero_box(b, [int(np.ceil(closing_mm / sp_zyx[ax])) + f[ax] for ax in range(3)])
    lo = [g.start - g.start % f[ax] for ax, g in enumerate(grown)]
    hi = [g.stop for g in grown]
    box = tuple(slice(a, c) for a, c in zip(lo, hi))
    coarse = _block_any(b[box], f)
    solid = _fill_slices(_closing(coarse, closing_mm, sp_zyx * np.asarray(f)))
    lab, n = ndi.label(solid)
    if n > 1:
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        solid = lab == int(np.argmax(sizes))
    fine = solid
    for ax in range(3):
        fine = np.repeat(fine, f[ax], axis=ax)
    shape = tuple(c - a for a, c in zip(lo, hi))
    out[box] = fine[: shape[0], : shape[1], : shape[2]] & (np.asarray(femur.array)[box] > 0)
    return bone.with_array(out)


def volume_ml(mask: Volume) -> float:
    """Volume (mL) of the nonzero voxels of ``mask``."""
    return float(np.count_nonzero(mask.array)) * float(np.prod(mask.spacing)) / 1000.0
