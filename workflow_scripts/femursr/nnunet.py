"""nnU-Net v2 for femursr: dataset, planning, training and prediction.

Two models use it: the femur mask of preprocessing (paper section 2.1, dataset 501, label
``femur``) and the bone-structure mask of the evaluation (section 3.1, dataset 502, label
``bone``, trained on HR volumes at their own voxel size; ``femursr.bonemask``). The text below
describes the femur model; the bone model differs only in its label, its cases and its spacing.

The paper masks the femur with a 3D nnU-Net trained on 1 mm femur crops of TotalSegmentator
CTs; the mask is predicted on the LR scan downsampled to 1 mm and brought back to the HR grid.
This module does the same with nnU-Net's own code (``nnunetv2``), in four steps that map onto
workflow rules:

1. :func:`assemble_dataset` writes an nnU-Net raw dataset from labelled CTs (case id, image in
   HU, binary femur mask), each resampled to ``spacing_mm`` (1 mm) isotropic;
2. :func:`plan_and_preprocess` runs nnU-Net's fingerprint, experiment planning and
   preprocessing (of the configurations asked for), and writes the cross-validation split;
3. :func:`train` trains one fold (trainer, configuration, fold and budget from the caller) and
   returns the model folder;
4. :func:`predict_mask` predicts the femur on a volume (LR on its native grid or already on the
   HR grid) resampled to 1 mm, and brings the femur probability back to a reference (HR) grid
   by linear interpolation, thresholded at 0.5. A model folder trained elsewhere works the same.

Folders follow nnU-Net's layout under one ``root`` given by the caller (e.g. ``results/nnunet``)::

    root/nnUNet_raw/Dataset501_Femur/{dataset.json, imagesTr/{case}_0000.nii.gz, labelsTr/{case}.nii.gz}
    root/nnUNet_preprocessed/Dataset501_Femur/{nnUNetPlans.json, splits_final.json, ...}
    root/nnUNet_results/Dataset501_Femur/{trainer}__{plans}__{configuration}/fold_{fold}/checkpoint_final.pth

nnU-Net reads these three folders from the environment variables ``nnUNet_raw``,
``nnUNet_preprocessed`` and ``nnUNet_results``; :func:`nnunet_environment` sets them for the
duration of one call (nnunetv2 >= 2.8 reads them at each use; earlier releases once at import).
Each step builds its output under a temporary name and renames it when complete.

Planning and preprocessing use nnU-Net's Python API (``nnunetv2.experiment_planning``), the
functions its ``nnUNetv2_plan_and_preprocess`` command calls: no console script on ``PATH`` is
needed, the environment is set for this call only, errors arrive as Python exceptions, and the
planner's GPU-memory target (which sets the patch size) can be passed.

Training builds the trainer class directly (``nnUNetTrainer_femursr`` from
``femursr.nnunet_trainer``: stock nnU-Net with a small budget; or any trainer that nnU-Net can
find by name, e.g. ``nnUNetTrainer`` for the paper's full training on a GPU). Prediction resolves
the trainer name stored in the checkpoint the same way and builds ``nnUNetPredictor`` with
``manual_initialization``, so nothing is copied into nnU-Net's package.

Torch and nnunetv2 are imported only by the functions that need them: assembling a dataset
needs neither. nnU-Net's integrity check, fingerprint and preprocessing start worker processes
with ``spawn``, which re-imports the main module: a script that calls :func:`plan_and_preprocess`
keeps its work under ``if __name__ == "__main__":``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import SimpleITK as sitk

from .atomic import atomic_dir, atomic_file, replace_dir
from .volume import Volume

log = logging.getLogger(__name__)

TRAINER = "nnUNetTrainer_femursr"
PLANS = "nnUNetPlans"
CHANNEL_NAMES = {"0": "CT"}  # "CT" selects nnU-Net's CT normalization (dataset-wide clip + z-score)
FILE_ENDING = ".nii.gz"
CHECKPOINT = "checkpoint_final.pth"
_CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*$")
_DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*$")


# ------------------------------------------------------------------------------ folders
def nnunet_folders(root: str | os.PathLike) -> dict[str, Path]:
    """nnU-Net's three folders under ``root``: ``{"nnUNet_raw": ..., "nnUNet_preprocessed": ..., "nnUNet_results": ...}``."""
    root = Path(root)
    return {k: root / k for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}


def dataset_name(dataset_id: int, name: str) -> str:
    """nnU-Net's dataset folder name, ``Dataset{id:03d}_{name}``."""
    if not (isinstance(dataset_id, (int, np.integer)) and 1 <= int(dataset_id) <= 999):
        raise ValueError(f"nnU-Net dataset id must be an integer in 1..999, got {dataset_id!r}")
    if not _DATASET_NAME.match(str(name)):
        raise ValueError(f"nnU-Net dataset name {name!r}: use letters, digits and '-' only")
    return f"Dataset{int(dataset_id):03d}_{name}"


def find_dataset(folder: str | os.PathLike, dataset_id: int) -> str:
    """Name of the one ``Dataset{id:03d}_*`` folder in ``folder``."""
    folder = Path(folder)
    hits = sorted(p.name for p in folder.glob(f"Dataset{int(dataset_id):03d}_*") if p.is_dir())
    if len(hits) != 1:
        what = "no" if not hits else f"{len(hits)} ({', '.join(hits)})"
        raise FileNotFoundError(f"{folder}: {what} nnU-Net dataset folder with id {int(dataset_id)} (Dataset{int(dataset_id):03d}_<name>)")
    return hits[0]


@contextlib.contextmanager
def nnunet_environment(root: str | os.PathLike | None = None, **folders):
    """Set nnU-Net's environment variables for the block, and restore them after.

    ``root`` gives the three standard folders; keyword arguments (``nnUNet_raw=...``,
    ``nnUNet_preprocessed=...``, ``nnUNet_results=...``, ``nnUNet_n_proc_DA=...``) override
    single variables. ``None`` values are left as they are.
    """
    values = dict(nnunet_folders(root)) if root is not None else {}
    values.update({k: v for k, v in folders.items() if v is not None})
    saved = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            os.environ[k] = str(v)
        yield values
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _require_nnunetv2():
    """nnunetv2, checked to read its folders from the environment at each use (>= 2.8)."""
    try:
        import nnunetv2
        import nnunetv2.paths as paths
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the nnU-Net mask backend needs nnunetv2 and torch (femursr's dependencies): pip install -e .") from e
    if not hasattr(paths.nnUNet_raw, "is_set"):
        version = getattr(nnunetv2, "__version__", "?")
        raise ImportError(
            f"nnunetv2 {version} reads nnUNet_raw/nnUNet_preprocessed/nnUNet_results once at import; "
            "femursr sets them per call and needs nnunetv2 2.8.1 (pip install -e .)"
        )
    return nnunetv2


def resolve_device(device: str = "auto"):
    """``torch.device`` for ``device``: ``"auto"`` is CUDA when torch sees a GPU, else the CPU."""
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"nnU-Net device {device!r} requested, but torch sees no CUDA GPU: use 'auto' or 'cpu'")
    return dev


# ------------------------------------------------------------------------------ resampling
def isotropic_grid(vol: Volume, spacing_mm: float) -> Volume:
    """An empty (zeros, float32) grid of ``spacing_mm`` isotropic voxels over the same box as ``vol``.

    Same direction and centre; as many voxels as cover the box (at least one per axis).
    """
    s = np.asarray(vol.spacing, float)
    n = np.asarray(vol.shape[::-1], float)  # x, y, z
    m = np.maximum(1, np.ceil(n * s / spacing_mm - 1e-6)).astype(int)
    centre = vol.index_to_physical((n - 1) / 2)
    origin = centre - vol.direction_matrix @ ((m - 1) / 2 * spacing_mm)
    return Volume(np.zeros(tuple(m[::-1]), np.float32), (spacing_mm,) * 3, tuple(origin), vol.direction)


def resample_to(vol: Volume, grid: Volume, *, label: bool = False, slab_voxels: int = 32_000_000) -> Volume:
    """``vol`` resampled onto ``grid``'s geometry (float32 for images, uint8 0/1 for labels).

    Where ``grid`` is coarser than ``vol`` along an axis, ``vol`` is first smoothed by the
    Gaussian whose variance makes its voxel box as wide as ``grid``'s ((t^2 - s^2) / 12), so a
    1 mm voxel averages over about 1 mm. Then linear interpolation; a label is resampled as its
    indicator and thresholded at 0.5 (partial volume decides). Outside ``vol`` the value is 0.
    The output is built in slabs of ``grid`` so a large HR grid needs little extra memory.
    """
    src = vol.to_sitk()
    src = sitk.Cast(src, sitk.sitkFloat32)
    var = [max(t * t - s * s, 0.0) / 12.0 for s, t in zip(vol.spacing, grid.spacing)]
    # below ~0.2 voxel standard deviation the kernel is a delta: skip it
    if any(v > (0.2 * s) ** 2 for v, s in zip(var, vol.spacing)):
        var = [v if v > (0.2 * s) ** 2 else 0.0 for v, s in zip(var, vol.spacing)]
        src = sitk.DiscreteGaussian(src, var, 32, 0.01, True)
    out = np.empty(grid.shape, np.uint8 if label else np.float32)
    nz, ny, nx = grid.shape
    step = max(1, slab_voxels // max(1, nx * ny))
    for z0 in range(0, nz, step):
        z1 = min(nz, z0 + step)
        origin = grid.index_to_physical((0.0, 0.0, float(z0)))
        slab = sitk.Resample(
            src, [int(nx), int(ny), int(z1 - z0)], sitk.Transform(), sitk.sitkLinear,
            [float(v) for v in origin], grid.spacing, grid.direction, 0.0, sitk.sitkFloat32,
        )  # fmt: skip
        a = sitk.GetArrayViewFromImage(slab)
        out[z0:z1] = (a >= 0.5) if label else a
    return grid.with_array(out)


# ------------------------------------------------------------------------------ 1. dataset
def assemble_dataset(
    cases: Iterable[tuple[str, Volume, Volume]],
    root: str | os.PathLike,
    dataset_id: int,
    name: str,
    *,
    spacing_mm: float | None = 1.0,
    description: str = "",
    label: str = "femur",
) -> Path:
    """Write an nnU-Net raw dataset from labelled CTs; returns its folder.

    ``cases``: (case id, CT image, binary mask of ``label`` on the same grid), e.g. a generator
    that reads one case at a time. Each is resampled to ``spacing_mm`` isotropic (``None``: kept
    as it is) and written as ``imagesTr/{case}_0000.nii.gz`` and ``labelsTr/{case}.nii.gz`` in
    ``root/nnUNet_raw/Dataset{id:03d}_{name}``, with ``dataset.json`` (channel 0 "CT", labels
    background 0 and ``label`` 1). The folder appears only when complete, replacing an older one.
    """
    if not _CASE_ID.match(label) or label == "background":
        raise ValueError(f"nnU-Net label {label!r}: a name of letters, digits and '-', not 'background'")
    folder = nnunet_folders(root)["nnUNet_raw"] / dataset_name(dataset_id, name)
    seen: list[str] = []
    with atomic_dir(folder) as tmp:
        (tmp / "imagesTr").mkdir()
        (tmp / "labelsTr").mkdir()
        for case_id, image, mask in cases:
            _check_case(case_id, image, mask, seen, label)
            if spacing_mm is not None:
                grid = isotropic_grid(image, spacing_mm)
                image = resample_to(image, grid)
                mask = resample_to(mask.with_array((np.asarray(mask.array) > 0).astype(np.uint8)), grid, label=True)
            img = image.to_sitk()
            img = sitk.Cast(img, sitk.sitkFloat32)
            lab = sitk.Cast(mask.to_sitk() > 0, sitk.sitkUInt8)
            sitk.WriteImage(img, str(tmp / "imagesTr" / f"{case_id}_0000{FILE_ENDING}"), useCompression=True)
            sitk.WriteImage(lab, str(tmp / "labelsTr" / f"{case_id}{FILE_ENDING}"), useCompression=True)
            seen.append(case_id)
            log.info("nnU-Net dataset %s: case %s, %s voxels at %s mm", folder.name, case_id, image.shape, image.spacing)
        if len(seen) < 2:
            raise ValueError(f"{folder.name}: nnU-Net needs at least 2 labelled cases, got {len(seen)}")
        meta = {
            "channel_names": CHANNEL_NAMES,
            "labels": {"background": 0, label: 1},
            "numTraining": len(seen),
            "file_ending": FILE_ENDING,
            "name": name,
            "description": description or f"{label} masks for femursr",
            "femursr": {"spacing_mm": spacing_mm, "cases": seen},
        }
        (tmp / "dataset.json").write_text(json.dumps(meta, indent=2))
    return folder


def _check_case(case_id, image: Volume, mask: Volume, seen: list, label: str = "femur") -> None:
    if not isinstance(case_id, str) or not _CASE_ID.match(case_id):
        raise ValueError(f"case {case_id!r}: case ids are letters, digits and '-' (no '_', nnU-Net's channel separator)")
    if case_id in seen:
        raise ValueError(f"case {case_id}: given twice")
    if not image.same_grid(mask):
        raise ValueError(f"case {case_id}: image {image.shape} at {image.spacing} mm and mask {mask.shape} at {mask.spacing} mm are not on one grid")
    m = np.asarray(mask.array)
    vals = np.unique(m)
    if not np.isin(vals, (0, 1)).all():
        raise ValueError(f"case {case_id}: the mask must be binary (0/1), found values {vals[:8].tolist()}")
    if not (m > 0).any():
        raise ValueError(f"case {case_id}: the {label} mask is empty")


_CASE_COLUMNS = ("image", "mask", "case")


def read_training_cases(spec, *, where: str = "training_cases") -> list[dict]:
    """The labelled CTs of a config entry: ``[{"case", "image", "mask"}, ...]``, checked.

    ``spec``: the path of a TSV with columns ``image``, ``mask`` and optionally ``case``, or a list
    of ``{"image", "mask"[, "case"]}``. Missing case ids become ``T001``, ``T002``, ... (by
    position). Paths are taken as given (relative ones to the working directory) and must exist.
    Raises ``ValueError`` naming ``where``, the row and the file, with the fix.
    """
    if isinstance(spec, (str, os.PathLike)):
        import pandas as pd

        tsv = Path(spec)
        where = f"{where} ({tsv})"
        if not tsv.is_file():
            raise ValueError(f"{where}: file not found; give a TSV with columns image, mask [, case] (paths relative to the directory snakemake runs in)")
        table = pd.read_csv(tsv, sep="\t", dtype=str, keep_default_na=False)
        unknown = [c for c in table.columns if c not in _CASE_COLUMNS]
        missing = [c for c in ("image", "mask") if c not in table.columns]
        if unknown or missing:
            raise ValueError(
                f"{where}: columns must be image, mask and optionally case"
                + (f"; missing {', '.join(missing)}" if missing else "")
                + (f"; unknown {', '.join(map(repr, unknown))}" if unknown else "")
            )
        rows = table.to_dict("records")
    else:
        rows = [dict(r) for r in spec]
    cases, seen = [], set()
    for n, row in enumerate(rows, 1):
        case = str(row.get("case") or f"T{n:03d}")
        who = f"{where}, case {case} (row {n})"
        if not _CASE_ID.match(case):
            raise ValueError(f"{who}: case ids are letters, digits and '-' (no '_', nnU-Net's channel separator)")
        if case in seen:
            raise ValueError(f"{who}: case id given twice")
        seen.add(case)
        for key in ("image", "mask"):
            if not str(row.get(key) or "").strip():
                raise ValueError(f"{who}: no {key} path")
            if not Path(row[key]).exists():
                raise ValueError(f"{who}: {key} {row[key]} not found (paths are relative to the directory snakemake runs in)")
        cases.append({"case": case, "image": str(row["image"]), "mask": str(row["mask"])})
    if len(cases) < 2:
        raise ValueError(f"{where}: nnU-Net needs at least 2 labelled cases, got {len(cases)}")
    return cases


def read_labelled_case(case: str, image_path, mask_path) -> tuple[str, Volume, Volume]:
    """(case, CT in HU, binary femur mask) read from files, for :func:`assemble_dataset`.

    The image is anything :func:`femursr.imaging.import_scan` reads (DICOM folder, NIfTI, MHA,
    NRRD); the mask a 3D image file with values 0 and 1 on the image's grid. Errors name the
    case, the file and the fix.
    """
    from .imaging import import_scan

    image = import_scan(image_path, label=f"nnU-Net training case {case} image")
    try:
        mask = Volume.from_sitk(sitk.ReadImage(str(mask_path)))
    except RuntimeError as e:
        raise ValueError(f"nnU-Net training case {case}: cannot read the mask {mask_path} ({str(e).strip().splitlines()[-1]})") from None
    vals = np.unique(np.asarray(mask.array))
    if not np.isin(vals, (0, 1)).all():
        raise ValueError(
            f"nnU-Net training case {case}: the mask {mask_path} has values {vals[:8].tolist()}; give a binary femur "
            "mask (1 femur, 0 elsewhere), e.g. one label of a multi-label segmentation written as (labels == k)"
        )
    if not image.same_grid(mask):
        raise ValueError(
            f"nnU-Net training case {case}: the mask {mask_path} ({mask.shape} voxels at {mask.spacing} mm, origin "
            f"{mask.origin}) is not on the grid of the image {image_path} ({image.shape} at {image.spacing} mm, origin "
            f"{image.origin}); resample the mask onto the image (nearest neighbour)"
        )
    if not vals.max(initial=0):
        raise ValueError(f"nnU-Net training case {case}: the mask {mask_path} is empty (no femur voxel)")
    return case, image, mask.with_array(np.asarray(mask.array).astype(np.uint8))


# ------------------------------------------------------------------------------ 2. plan
def plan_and_preprocess(
    root: str | os.PathLike,
    dataset_id: int,
    configurations: str | Sequence[str] = "3d_fullres",
    *,
    num_processes: int = 1,
    planner: str = "ExperimentPlanner",
    gpu_memory_target_gb: float | None = None,
    n_folds: int = 5,
) -> Path:
    """nnU-Net fingerprint, plans and preprocessing of ``configurations``; returns the folder.

    Reads ``root/nnUNet_raw/Dataset{id}_*``, writes ``root/nnUNet_preprocessed/Dataset{id}_*``
    (plans ``nnUNetPlans.json`` for the default ``planner``, the cases preprocessed for each of
    ``configurations`` (``"2d"``, ``"3d_fullres"``, ...), and
    ``splits_final.json``: nnU-Net's seeded k-fold split with ``min(n_folds, cases)`` folds,
    written here so that training does not add it to this folder later). ``gpu_memory_target_gb``
    is the planner's VRAM target (nnU-Net's default 8 GB when ``None``); a smaller one gives a
    smaller patch and a cheaper iteration. The folder appears only when complete.
    """
    nnunetv2 = _require_nnunetv2()
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprint_dataset,
        plan_experiment_dataset,
        preprocess_dataset,
    )
    from nnunetv2.utilities.crossval_split import generate_crossval_split
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    configurations = [configurations] if isinstance(configurations, str) else list(configurations)
    folders = nnunet_folders(root)
    name = find_dataset(folders["nnUNet_raw"], dataset_id)
    final = folders["nnUNet_preprocessed"] / name
    planner_class = recursive_find_python_class(
        str(Path(nnunetv2.__path__[0]) / "experiment_planning"), planner, current_module="nnunetv2.experiment_planning"
    )
    if planner_class is None:
        raise ValueError(f"nnU-Net planner {planner!r} not found in nnunetv2.experiment_planning")
    folders["nnUNet_preprocessed"].mkdir(parents=True, exist_ok=True)
    tmp_root = Path(tempfile.mkdtemp(prefix=f".{name}.tmp", dir=folders["nnUNet_preprocessed"]))
    t0 = time.perf_counter()
    try:
        with nnunet_environment(root, nnUNet_preprocessed=tmp_root):
            extract_fingerprint_dataset(
                int(dataset_id), DatasetFingerprintExtractor, num_processes=num_processes,
                check_dataset_integrity=True, clean=True, verbose=False,
            )  # fmt: skip
            _, plans_id = plan_experiment_dataset(int(dataset_id), planner_class, gpu_memory_target_in_gb=gpu_memory_target_gb)
            plans = json.loads((tmp_root / name / f"{plans_id}.json").read_text())
            missing = [c for c in configurations if c not in plans["configurations"]]
            if missing:
                raise ValueError(f"{name}: nnU-Net planned no {', '.join(missing)} configuration (planned: {', '.join(plans['configurations'])})")
            preprocess_dataset(int(dataset_id), plans_id, configurations=configurations, num_processes=[num_processes] * len(configurations))
        cases = _raw_case_ids(folders["nnUNet_raw"] / name)
        k = min(int(n_folds), len(cases))
        splits = generate_crossval_split(cases, seed=12345, n_splits=k)
        (tmp_root / name / "splits_final.json").write_text(json.dumps(splits, indent=2))
        replace_dir(tmp_root / name, final)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    for conf in configurations:
        c = plans["configurations"][conf]
        log.info("nnU-Net %s %s: patch %s, batch %d, spacing %s mm", name, conf, c.get("patch_size"), c.get("batch_size", 0), c.get("spacing"))
    log.info("nnU-Net %s planned and preprocessed, %d folds (%.0f s)", name, k, time.perf_counter() - t0)
    return final


def _raw_case_ids(folder: Path) -> list[str]:
    return sorted(p.name[: -len(FILE_ENDING)] for p in (folder / "labelsTr").glob(f"*{FILE_ENDING}"))


# ------------------------------------------------------------------------------ 3. train
def trainer_class(trainer: str):
    """The nnU-Net trainer class called ``trainer``: ours, or one nnU-Net finds by name."""
    if trainer == TRAINER:
        from .nnunet_trainer import nnUNetTrainer_femursr

        return nnUNetTrainer_femursr
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    return recursive_find_trainer_class_by_name(trainer)


def train(
    root: str | os.PathLike,
    dataset_id: int,
    configuration: str = "3d_fullres",
    fold: int | str = 0,
    *,
    trainer: str = TRAINER,
    plans: str = PLANS,
    epochs: int | None = None,
    iterations_per_epoch: int | None = None,
    val_iterations: int | None = None,
    final_validation: bool = True,
    device: str = "auto",
    num_threads: int | None = None,
    augmentation_processes: int | None = None,
    seed: int | None = None,
) -> Path:
    """Train one fold with nnU-Net; returns the model folder (``.../{trainer}__{plans}__{configuration}``).

    ``epochs``, ``iterations_per_epoch``, ``val_iterations``: the budget (``None`` keeps the
    trainer's: 1 x 20 + 2 for ``nnUNetTrainer_femursr``, 1000 x 250 + 50 for nnU-Net's own).
    ``final_validation`` runs the trainer's validation after training (ours: one pass per
    validation case on the preprocessed grid; nnU-Net's: its full validation). ``device``:
    ``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"``. ``num_threads`` sets torch's
    CPU threads; ``augmentation_processes`` nnU-Net's data-augmentation workers (0 = in this
    process; ``None`` = nnU-Net's default). ``seed`` seeds torch and numpy (the CPU run is then
    repeatable with 0 workers).

    The fold is trained in a temporary results folder and moved into place when done, with the
    model's ``plans.json``, ``dataset.json`` and ``dataset_fingerprint.json``; other folds of the
    same model folder are kept.
    """
    _require_nnunetv2()
    import torch

    folders = nnunet_folders(root)
    name = find_dataset(folders["nnUNet_preprocessed"], dataset_id)
    pre = folders["nnUNet_preprocessed"] / name
    plans_file = pre / f"{plans}.json"
    if not plans_file.is_file():
        raise FileNotFoundError(f"{plans_file}: no nnU-Net plans; run femursr.nnunet.plan_and_preprocess first")
    fold = fold if fold == "all" else int(fold)
    dev = resolve_device(device)
    if num_threads:
        torch.set_num_threads(int(num_threads))
    if seed is not None:
        torch.manual_seed(int(seed))
        np.random.seed(int(seed))
        import random

        random.seed(int(seed))
    cls = trainer_class(trainer)
    model_name = f"{trainer}__{plans}__{configuration}"
    final = folders["nnUNet_results"] / name / model_name
    folders["nnUNet_results"].mkdir(parents=True, exist_ok=True)
    tmp_root = Path(tempfile.mkdtemp(prefix=f".{name}.tmp", dir=folders["nnUNet_results"]))
    t0 = time.perf_counter()
    try:
        with nnunet_environment(
            root, nnUNet_results=tmp_root,
            nnUNet_n_proc_DA=None if augmentation_processes is None else int(augmentation_processes),
        ):  # fmt: skip
            plans_dict = json.loads(plans_file.read_text())
            if configuration not in plans_dict["configurations"]:
                raise ValueError(f"{plans_file}: no configuration {configuration!r} (planned: {', '.join(plans_dict['configurations'])})")
            plans_dict["continue_training"] = False  # nnunetv2 >= 2.8 takes this flag through the plans
            dataset_json = json.loads((pre / "dataset.json").read_text())
            tr = cls(plans=plans_dict, configuration=configuration, fold=fold, dataset_json=dataset_json, device=dev)
            if hasattr(tr, "set_budget"):
                tr.set_budget(epochs, iterations_per_epoch, val_iterations)
            else:
                for attr, value in (("num_epochs", epochs), ("num_iterations_per_epoch", iterations_per_epoch), ("num_val_iterations_per_epoch", val_iterations)):
                    if value is not None:
                        setattr(tr, attr, int(value))
            log.info(
                "nnU-Net training %s fold %s on %s: %d epochs x %d iterations (+%d validation)",
                model_name, fold, dev, tr.num_epochs, tr.num_iterations_per_epoch, tr.num_val_iterations_per_epoch,
            )  # fmt: skip
            tr.run_training()
            if final_validation:
                tr.perform_actual_validation(False)
        built = tmp_root / name / model_name
        if not (built / f"fold_{fold}" / CHECKPOINT).is_file():
            raise RuntimeError(f"{built / f'fold_{fold}'}: nnU-Net training ended without {CHECKPOINT}")
        final.mkdir(parents=True, exist_ok=True)
        for f in ("plans.json", "dataset.json", "dataset_fingerprint.json"):
            with atomic_file(final / f) as t:
                shutil.copyfile(built / f, t)
        replace_dir(built / f"fold_{fold}", final / f"fold_{fold}")
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    log.info("nnU-Net model %s fold %s trained in %.0f s", final, fold, time.perf_counter() - t0)
    return final


# ------------------------------------------------------------------------------ 4. predict
def check_model_folder(model_folder: str | os.PathLike, folds: Sequence | None = None, checkpoint: str = CHECKPOINT) -> list:
    """The folds of a trained nnU-Net model folder that have ``checkpoint``; errors name what is missing."""
    model_folder = Path(model_folder)
    fix = (
        "train one (femursr.nnunet.train, the workflow's nnU-Net training rule) or give the folder of a model "
        "trained elsewhere: it must hold plans.json, dataset.json and fold_<k>/" + checkpoint
    )
    if not model_folder.is_dir():
        raise FileNotFoundError(f"nnU-Net model folder {model_folder} not found: {fix}")
    for f in ("plans.json", "dataset.json"):
        if not (model_folder / f).is_file():
            raise FileNotFoundError(f"nnU-Net model folder {model_folder}: {f} missing: {fix}")
    if folds is None:
        folds = sorted(
            (p.name.removeprefix("fold_") for p in model_folder.glob("fold_*") if (p / checkpoint).is_file()),
            key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s),
        )
        folds = [f if f == "all" else int(f) for f in folds]
    if not folds:
        raise FileNotFoundError(f"nnU-Net model folder {model_folder}: no fold_<k>/{checkpoint}: {fix}")
    for f in folds:
        if not (model_folder / f"fold_{f}" / checkpoint).is_file():
            raise FileNotFoundError(f"nnU-Net model folder {model_folder}: fold_{f}/{checkpoint} missing: {fix}")
    return list(folds)


def load_model(
    model_folder: str | os.PathLike,
    *,
    folds: Sequence | None = None,
    checkpoint: str = CHECKPOINT,
    device: str = "auto",
    mirroring: bool = True,
    tile_step_size: float = 0.5,
):
    """An ``nnUNetPredictor`` for a trained model folder (ours or one trained elsewhere).

    ``folds``: the folds to ensemble (``None``: all that have ``checkpoint``). ``mirroring``:
    nnU-Net's test-time mirroring (up to 8 passes per window in 3D). Checkpoints are unpickled:
    use model folders you trust.
    """
    _require_nnunetv2()
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    model_folder = Path(model_folder)
    folds = check_model_folder(model_folder, folds, checkpoint)
    dataset_json = json.loads((model_folder / "dataset.json").read_text())
    plans_manager = PlansManager(json.loads((model_folder / "plans.json").read_text()))
    params, trainer_name, config_name, mirror_axes = [], None, None, None
    for f in folds:
        ckpt = torch.load(model_folder / f"fold_{f}" / checkpoint, map_location="cpu", weights_only=False)
        if trainer_name is None:
            trainer_name = ckpt["trainer_name"]
            config_name = ckpt["init_args"]["configuration"]
            mirror_axes = ckpt.get("inference_allowed_mirroring_axes")
        params.append(ckpt["network_weights"])
    config = plans_manager.get_configuration(config_name)
    n_in = determine_num_input_channels(plans_manager, config, dataset_json)
    n_out = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
    network = trainer_class(trainer_name).build_network_architecture(
        plans_manager, config, n_in, n_out, enable_deep_supervision=False
    )
    network.load_state_dict(params[0])
    predictor = nnUNetPredictor(
        tile_step_size=tile_step_size, use_gaussian=True, use_mirroring=mirroring, perform_everything_on_device=True,
        device=resolve_device(device), verbose=False, verbose_preprocessing=False, allow_tqdm=False,
    )  # fmt: skip
    predictor.manual_initialization(network, plans_manager, config, params, dataset_json, trainer_name, mirror_axes)
    predictor.femursr_model_folder = str(model_folder)
    predictor.femursr_model = {"model_folder": str(model_folder), "trainer": trainer_name, "configuration": config_name, "folds": list(folds)}
    return predictor


def predict_probability(predictor, image: Volume, labels: str | Sequence[str] = "femur") -> Volume:
    """Probability (float32, 0..1) of ``labels`` (summed) on ``image``'s grid, from nnU-Net's softmax."""
    wanted = [labels] if isinstance(labels, str) else list(labels)
    known = predictor.dataset_json["labels"]
    missing = [w for w in wanted if w not in known]
    if missing:
        raise ValueError(
            f"nnU-Net model {getattr(predictor, 'femursr_model_folder', '')}: no label {', '.join(missing)} "
            f"(its labels: {', '.join(known)})"
        )
    data = np.asarray(image.array, np.float32)[None]
    props = {"spacing": [float(v) for v in image.spacing[::-1]]}  # nnU-Net's arrays and spacings are (z, y, x)
    _, probs = predictor.predict_single_npy_array(data, props, None, None, True)
    idx = [int(known[w]) for w in wanted]  # softmax heads are ordered by label value
    return image.with_array(np.clip(np.asarray(probs)[idx].sum(0), 0, 1).astype(np.float32))


def predict_mask(
    model,
    lr: Volume,
    reference: Volume | None = None,
    *,
    spacing_mm: float = 1.0,
    labels: str | Sequence[str] = "femur",
    device: str = "auto",
    mirroring: bool = True,
    threshold: float = 0.5,
) -> Volume:
    """Femur mask (uint8 0/1) on ``reference``'s grid (``lr``'s when ``None``), as in the paper.

    ``model``: a model folder (see :func:`load_model`) or a predictor it returned. ``lr`` (HU, on
    its native grid or already on the HR grid) is resampled to ``spacing_mm`` isotropic over its
    own box (Gaussian anti-aliasing, linear); nnU-Net predicts the femur probability there; the
    probability is interpolated linearly onto the reference grid and thresholded at
    ``threshold``, so the mask's surface is smooth at the HR voxel size rather than in 1 mm
    steps. Reference voxels outside ``lr``'s box are 0.

    The model sees what it was trained on best: a model trained on whole clinical scans does
    worse on an LR cropped to the HR box (and vice versa), so train on scans framed like the
    ones predicted on.
    """
    predictor = model if hasattr(model, "predict_single_npy_array") else load_model(model, device=device, mirroring=mirroring)
    reference = lr if reference is None else reference
    t0 = time.perf_counter()
    grid = isotropic_grid(lr, spacing_mm)
    low = resample_to(lr, grid)
    prob = predict_probability(predictor, low, labels)
    t1 = time.perf_counter()
    up = resample_to(prob, reference)  # reads only the reference's geometry
    mask = up.with_array((up.array >= threshold).astype(np.uint8))
    log.info(
        "nnU-Net femur mask: %s voxels at %s mm predicted in %.1f s, %d voxels on the %s grid",
        low.shape, spacing_mm, t1 - t0, int(mask.array.sum()), reference.shape,
    )  # fmt: skip
    return mask


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient of two binary arrays (NaN when both are empty)."""
    a = np.asarray(a) > 0
    b = np.asarray(b) > 0
    n = int(a.sum()) + int(b.sum())
    return float(2 * np.logical_and(a, b).sum() / n) if n else float("nan")
