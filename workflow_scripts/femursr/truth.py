"""Truth morphometry of the synthetic phantoms: Hildebrand BV/TV, Tb.Th, Tb.Sp and Tb.N of the
known tissue map, per region (the yardstick the evaluated volumes are compared with).

Apart from the phantom rendering (:mod:`femursr.phantom`), so that editing the morphometry reruns
the truth tables and not the synthetic scans (see :mod:`femursr.provenance`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .geometry import REGION_NAMES
from .morphometry import morphometry
from .phantom import REGION_ORDER, blended_structure, draw_subject
from .volume import Volume


def truth_morphometry(subject_id: str, tissue: Volume, regions: Volume) -> pd.DataFrame:
    """Tidy table (subject, method=truth, region, metric, value, unit) on the HR truth."""
    t = tissue.array
    sp_zyx = tuple(tissue.spacing[::-1])
    res = morphometry(t == 2, (t == 1) | (t == 2), sp_zyx, regions.array, REGION_NAMES)
    rows = []
    for region, m in res.items():
        for metric, value, unit in (
            ("BV/TV", m.bv_tv, "1"),
            ("Tb.Th", m.tb_th_mm, "mm"),
            ("Tb.Sp", m.tb_sp_mm, "mm"),
            ("Tb.N", m.tb_n_per_mm, "1/mm"),
        ):
            rows.append((subject_id, "truth", region, metric, value, unit))
    return pd.DataFrame(rows, columns=["subject", "method", "region", "metric", "value", "unit"])


def region_block_morphometry(cfg: dict, seed: int, index: int, edge_mm: float = 8.0, voxel_mm: float | None = None) -> pd.DataFrame:
    """Truth morphometry of the trabecular network alone in a cube of ``edge_mm`` at the centre
    of each trabecular region (head, neck, trochanter), sampled at ``voxel_mm`` (default: the
    config's HR voxel).

    This checks the network parameters at the paper's 82 um without rendering a full-scale femur
    (about 1.3 G voxels). The cube is all trabecular compartment: no cortex, no outside.
    """
    subj = draw_subject(cfg, seed, index, f"block{index}")
    vox = float(voxel_mm or cfg["hr"]["voxel_mm"])
    sh = subj.shape
    centres = {
        "head": sh.head_center,
        "neck": 0.5 * (sh.neck_base + sh.neck_length + sh.head_plane) * sh.neck_axis,
        "trochanter": sh.troch_center,
    }
    n = int(round(edge_mm / vox))
    g = (np.arange(n) - (n - 1) / 2) * vox
    zz, yy, xx = np.meshgrid(g, g, g, indexing="ij")
    rows = []
    for region, c in centres.items():
        p = np.stack([xx.ravel() + c[0], yy.ravel() + c[1], zz.ravel() + c[2]], axis=1).astype(np.float32)
        w = np.zeros((p.shape[0], 4))
        w[:, REGION_ORDER.index(region)] = 1.0  # the region's own network, unblended
        bone = blended_structure(p, w, subj.networks).reshape(n, n, n)
        m = morphometry(bone, np.ones_like(bone), (vox, vox, vox))["all"]
        for metric, value in (("BV/TV", m.bv_tv), ("Tb.Th", m.tb_th_mm), ("Tb.Sp", m.tb_sp_mm), ("Tb.N", m.tb_n_per_mm)):
            rows.append((f"block{index}", region, metric, value))
    return pd.DataFrame(rows, columns=["subject", "region", "metric", "value"])
