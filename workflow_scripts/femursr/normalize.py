"""Normalization of prepared volumes: clip to an HU window, scale to [0, 1], apply the femur mask.

The prepared LR and HR are stored uncompressed (``.nii``) so that the training stage reads them
memory-mapped, patch by patch, without loading whole volumes.
"""

from __future__ import annotations

import numpy as np

from .volume import Volume


class NormalizationError(ValueError):
    pass


def normalize(vol: Volume, window_hu, mask: Volume | None = None, label: str = "") -> Volume:
    """``(clip(HU, lo, hi) - lo) / (hi - lo)`` as float32 in [0, 1]; 0 outside ``mask``.

    The mask must be on the same grid as the volume and must not be empty.
    """
    lo, hi = (float(v) for v in window_hu)
    if not hi > lo:
        raise NormalizationError(f"{label}: HU window [{lo:g}, {hi:g}] is empty; the upper bound must exceed the lower")
    out = (np.clip(np.asarray(vol.array, np.float32), lo, hi) - np.float32(lo)) / np.float32(hi - lo)
    if mask is not None:
        if not vol.same_grid(mask, atol=1e-3):
            raise NormalizationError(f"{label}: the mask is not on the volume's grid (shape {mask.shape} vs {vol.shape}); resample it first")
        m = np.asarray(mask.array) > 0
        if not m.any():
            raise NormalizationError(f"{label}: the femur mask is empty; nothing would be left of the volume (check the mask QC)")
        out[~m] = 0.0
    res = vol.with_array(out.astype(np.float32))
    res.meta = {"window_hu": [lo, hi], "masked": mask is not None}
    return res
