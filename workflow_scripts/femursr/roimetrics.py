"""Bone microstructure in one ROI (paper section 3.1, step 4).

:func:`roi_morphometry`: :func:`femursr.morphometry.morphometry` on the cube with a
margin of ``context_mm`` of the full volume around it (so balls near the cube's faces see the
structure beyond them; the margin's own outer faces are open, ``black_border=False``), averaged
over the cube's voxels: BV/TV, Tb.Th and Tb.Sp (mm, mean local thickness of the bone and of the
marrow inside the femur mask), Tb.N = 1 / (Tb.Th + Tb.Sp) (1/mm), the study's convention.

A module of its own, apart from the ROI placement (:mod:`femursr.rois`), so that editing the
morphometry reruns the morphometry of the ROIs and not their placement (see
:mod:`femursr.provenance`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .morphometry import morphometry
from .rois import Roi
from .volume import Volume

METRIC_ROWS = (
    ("bv_tv", "1", "bone voxels / femur voxels in the ROI"),
    ("tb_th_mm", "mm", "mean Hildebrand local thickness of the bone voxels in the ROI"),
    ("tb_sp_mm", "mm", "mean Hildebrand local thickness of the marrow (femur, not bone) voxels in the ROI"),
    ("tb_n_per_mm", "1/mm", "1 / (tb_th_mm + tb_sp_mm), the study's convention"),
)


def roi_morphometry(bone: Volume, femur: Volume, roi: Roi, context_mm: float):
    """:class:`femursr.morphometry.Morphometry` of the cube ``roi`` (see the module docstring)."""
    sp_zyx = bone.spacing[::-1]
    margin = [int(np.ceil(context_mm / s)) for s in sp_zyx]
    ext, core = [], []
    for a, m, n in zip(roi.start_zyx, margin, bone.shape):
        lo, hi = max(0, a - m), min(n, a + roi.edge_vox + m)
        ext.append(slice(lo, max(lo, hi)))
        c0, c1 = max(0, a), min(n, a + roi.edge_vox)
        core.append(slice(c0 - lo, max(c0, c1) - lo))
    ext = tuple(ext)
    b = np.asarray(bone.array[ext]) > 0
    v = np.asarray(femur.array[ext]) > 0
    regions = np.zeros(b.shape, np.uint8)
    regions[tuple(core)] = 1
    return morphometry(b, v, sp_zyx, regions, {1: roi.region})[roi.region]


def tidy_rows(subject: str, method: str, results: dict) -> pd.DataFrame:
    """The per-volume table: subject, method, region, metric, value, unit, definition."""
    rows = []
    for region, m in results.items():
        for metric, unit, definition in METRIC_ROWS:
            rows.append((subject, method, region, metric, float(getattr(m, metric)), unit, definition))
    return pd.DataFrame(rows, columns=["subject", "method", "region", "metric", "value", "unit", "definition"])
