"""Accuracy of the preprocessing against the synthetic cohort's truth.

Target registration error (TRE): for points of the true femur (HR frame), the distance in mm
between where the estimated transform and the true transform send them. Mask Dice: the femur
mask on the HR grid against the truth femur mask.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from .masks import dice
from .registration import target_registration_error, transform_points  # noqa: F401 (re-exported)
from .volume import read_volume


def registration_error(estimated: sitk.Transform, true: sitk.Transform, femur_mask_path, n_points: int = 20000, seed: int = 0) -> dict:
    """TRE (mm) over points sampled uniformly in the true femur: mean, max and 95th percentile."""
    mask = read_volume(femur_mask_path, mmap=False)
    idx = np.argwhere(np.asarray(mask.array) > 0)[:, ::-1]  # (x, y, z)
    if len(idx) == 0:
        raise ValueError(f"{femur_mask_path}: empty truth mask")
    rng = np.random.default_rng(seed)
    idx = idx[rng.choice(len(idx), size=min(n_points, len(idx)), replace=False)]
    pts = mask.index_to_physical(idx)
    d = target_registration_error(estimated, true, pts)
    return {"tre_mean_mm": float(d.mean()), "tre_p95_mm": float(np.percentile(d, 95)), "tre_max_mm": float(d.max())}


def mask_dice(mask_path, truth_path) -> float:
    a = np.asarray(read_volume(mask_path, mmap=False).array) > 0
    b = np.asarray(read_volume(truth_path, mmap=False).array) > 0
    if a.shape != b.shape:
        raise ValueError(f"{mask_path} and {truth_path} are not on the same grid ({a.shape} vs {b.shape})")
    return dice(a, b)


def preprocessing_accuracy(subjects, transforms, masks, truth_dirs, qc_files) -> pd.DataFrame:
    """One row per subject: TRE of the registration and Dice of the femur mask against the truth."""
    rows = []
    for s, tfm_path, mask_path, truth, qc in zip(subjects, transforms, masks, truth_dirs, qc_files):
        truth = Path(truth)
        est = sitk.ReadTransform(str(tfm_path))
        true = sitk.ReadTransform(str(truth / "pose.tfm"))
        row = {"subject": s, **registration_error(est, true, truth / "femur_mask.nii.gz")}
        row["mask_dice"] = mask_dice(mask_path, truth / "femur_mask.nii.gz")
        q = json.loads(Path(qc).read_text())
        row["registration_dice"] = q.get("femur_dice", np.nan)
        row["structure_ncc"] = q.get("structure_ncc", np.nan)
        rows.append(row)
    return pd.DataFrame(rows)
