"""Normalization of prepared volumes: clip to an HU window, scale to [0, 1], apply the femur mask.

The prepared LR and HR are stored uncompressed (``.nii``) so that the training stage reads them
memory-mapped, patch by patch, without loading whole volumes. :func:`normalize_to_file` writes
them slab by slab from memory-mapped inputs, so a paper-scale pair (5.6 GB per volume) is never
whole in memory; it gives the same values as :func:`normalize`.
"""

from __future__ import annotations

import numpy as np

from .volume import Volume, VolumeWriter, read_slab, slab_ranges, slab_thickness, value_range


class NormalizationError(ValueError):
    pass


def normalize(vol: Volume, window_hu, mask: Volume | None = None, label: str = "") -> Volume:
    """``(clip(HU, lo, hi) - lo) / (hi - lo)`` as float32 in [0, 1]; 0 outside ``mask``.

    The mask must be on the same grid as the volume and must not be empty.
    """
    lo, hi = _check(vol, window_hu, mask, label)
    out = (np.clip(np.asarray(vol.array, np.float32), lo, hi) - np.float32(lo)) / np.float32(hi - lo)
    if mask is not None:
        m = np.asarray(mask.array) > 0
        if not m.any():
            raise NormalizationError(_EMPTY.format(label=label))
        out[~m] = 0.0
    res = vol.with_array(out.astype(np.float32))
    res.meta = {"window_hu": [lo, hi], "masked": mask is not None}
    return res


_EMPTY = "{label}: the femur mask is empty; nothing would be left of the volume (check the mask QC)"


def _check(vol: Volume, window_hu, mask: Volume | None, label: str) -> tuple[float, float]:
    lo, hi = (float(v) for v in window_hu)
    if not hi > lo:
        raise NormalizationError(f"{label}: HU window [{lo:g}, {hi:g}] is empty; the upper bound must exceed the lower")
    if mask is not None and not vol.same_grid(mask, atol=1e-3):
        raise NormalizationError(f"{label}: the mask is not on the volume's grid (shape {mask.shape} vs {vol.shape}); resample it first")
    return lo, hi


def normalize_to_file(vol: Volume, window_hu, mask: Volume | None, path, label: str = "", slab_voxels: int | None = None) -> Volume:
    """:func:`normalize`, written to ``path`` (``.nii``) slab by slab along z (``slab_voxels``,
    default :data:`femursr.volume.SLAB_VOXELS`); memory holds one slab of each input, not the
    volumes. Refusals (empty window, mask on another grid or empty) come before anything is
    written; the file appears only when complete. Returns the result, memory-mapped."""
    lo, hi = _check(vol, window_hu, mask, label)
    thick = slab_thickness(vol.shape, slab_voxels)
    if mask is not None and not value_range(mask.array, slab_voxels)[1] > 0:
        raise NormalizationError(_EMPTY.format(label=label))
    with VolumeWriter(path, vol.shape, np.float32, vol.spacing, vol.origin, vol.direction) as out:
        for z0, z1 in slab_ranges(vol.shape[0], thick):
            block = (np.clip(read_slab(vol.array, z0, z1).astype(np.float32, copy=False), lo, hi) - np.float32(lo)) / np.float32(hi - lo)
            if mask is not None:
                block[~(read_slab(mask.array, z0, z1) > 0)] = 0.0
            out[z0:z1] = block
    res = vol.with_array(out.array)
    res.meta = {"window_hu": [lo, hi], "masked": mask is not None}
    return res
