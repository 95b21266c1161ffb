"""A trained SR model as a portable folder: the inference weights, the ROI templates and a model
card (``model.json``) with what the clinical branch needs on another machine, without the
training data (issue 9, item 3): the LR window of the normalization, the training voxel, the
templates' side and reach, the evaluation settings, the training and validation subjects and
figures, and checksums. Used by :mod:`femursr.clinical`; a module of its own so that the export
reruns only when its own code changes (:mod:`femursr.provenance`).
"""

from __future__ import annotations

import datetime
import json
import shutil
from pathlib import Path

import numpy as np

from . import __version__
from .atomic import atomic_file, file_sha256

CARD = "model.json"
CARD_FORMAT = 1
GENERATOR = "generator.pt"
TEMPLATES = "templates.npz"
SIDES = ("left", "right")


def fit_sphere(points: np.ndarray) -> tuple[np.ndarray, float]:
    """Least-squares sphere through ``points`` (n, 3) mm: centre (3,) and radius (mm).

    |p|^2 = 2 c.p + (r^2 - |c|^2) is linear in (c, r^2 - |c|^2)."""
    p = np.asarray(points, float)
    if len(p) < 4:
        raise ValueError(f"a sphere needs at least 4 points, got {len(p)}")
    sol, *_ = np.linalg.lstsq(np.c_[2 * p, np.ones(len(p))], (p**2).sum(1), rcond=None)
    c = sol[:3]
    return c, float(np.sqrt(max(sol[3] + c @ c, 0.0)))


def template_reach(templates) -> dict:
    """How far the templates' femurs reach from the head: per template the head sphere fitted to
    its head-labelled surface points, and the largest distance of any point from the head centre
    in head radii (the saw cut's far rim). The clinical grid cuts the shaft at the median reach,
    so the outline a clinical volume gives is comparable to the templates'."""
    from .geometry import REGION_IDS

    per = []
    for t in templates:
        pts = t.cloud.points
        head = pts[t.cloud.labels == REGION_IDS["head"]]
        if len(head) < 20:
            raise ValueError(f"template {t.subject}: only {len(head)} surface points are labelled head; cannot fit the femoral head")
        c, r = fit_sphere(head)
        reach = float(np.linalg.norm(pts - c, axis=1).max())
        per.append({"subject": t.subject, "head_radius_mm": r, "reach_mm": reach, "reach_head_radii": reach / r})
    return {"reach_head_radii": float(np.median([p["reach_head_radii"] for p in per])), "per_template": per}


def _grid_voxel_mm(paths) -> float:
    """The isotropic voxel (mm) of the grids of ``paths`` (volume headers only)."""
    import SimpleITK as sitk

    spacings = []
    for p in paths:
        r = sitk.ImageFileReader()
        r.SetFileName(str(p))
        r.ReadImageInformation()
        spacings.append(r.GetSpacing())
    sp = np.asarray(spacings, float)
    if sp.size == 0:
        raise ValueError("no training volume given: the voxel of the training grid is unknown")
    if np.ptp(sp) > 0.01 * sp.min():
        raise ValueError(f"the training grids are not all isotropic at one voxel size (spacings from {sp.min():.4g} to {sp.max():.4g} mm)")
    return round(float(np.median(sp)), 6)  # the header's float32 spacing, as written


def export_model(*, generator, record, templates, train_volumes, out_generator, out_card, out_templates, method: str,
                 normalization: dict, evaluation: dict, template_side: str, samples: int, seed: int, cohort: str) -> dict:  # fmt: skip
    """Write a portable model folder: the inference weights and templates copied, and the model
    card (``model.json``). ``record`` is the training run's record.json, ``train_volumes`` the
    training subjects' volumes on the HR grid (their voxel is the clinical grid's),
    ``normalization`` the block ``preprocessing.normalize``, ``evaluation`` the evaluation settings
    in force. Returns the card."""
    from .templates import load_templates

    rec = json.loads(Path(record).read_text())
    tpl = load_templates(templates)
    if template_side not in SIDES:
        raise ValueError(f"template_side must be one of {SIDES}, not {template_side!r}")
    card = {
        "format": CARD_FORMAT,
        "kind": "femursr portable SR model",
        "method": method,
        "model": rec["model"],
        "dims": rec["dims"],
        "neighbours": rec.get("neighbours"),
        "in_channels": rec.get("in_channels"),
        "samples": int(samples),
        "seed": int(seed),
        "files": {"generator": GENERATOR, "templates": TEMPLATES},
        "generator_sha256": file_sha256(generator),
        "templates_sha256": file_sha256(templates),
        "voxel_mm": _grid_voxel_mm(train_volumes),
        "normalization": {k: [float(v) for v in normalization[k]] for k in ("lr_window_hu", "hr_window_hu")},
        "training": {
            "cohort": cohort,
            "train_subjects": list(rec.get("train_subjects", [])),
            "validation_subjects": list(rec.get("validation_subjects", [])),
            "steps": rec.get("steps"),
            "phases": rec.get("phases"),
            "patch_size_px": rec.get("patch_size_px"),
            "batch_size": rec.get("batch_size"),
            "device": rec.get("device"),
            "parameters": rec.get("parameters") or rec.get("generator_parameters"),
            "config_hash": rec.get("config_hash"),
        },
        "validation": dict(rec.get("validation") or {}),
        "validation_patches": rec.get("validation_patches"),
        "evaluation": evaluation,
        "templates": {
            "side": template_side,
            "subjects": [t.subject for t in tpl],
            "bone_ml": [t.bone_ml for t in tpl],
            **template_reach(tpl),
        },
        "exported": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "femursr": __version__,
    }
    for src, dst in ((generator, out_generator), (templates, out_templates)):
        with atomic_file(dst) as tmp:
            shutil.copyfile(src, tmp)
    with atomic_file(out_card) as tmp:
        tmp.write_text(json.dumps(card, indent=2) + "\n")
    return card


def read_card(path) -> dict:
    """The model card ``path`` (``model.json`` of a portable model folder), checked."""
    path = Path(path)
    fix = "export it with rule clinical_export_model (results/models/{model}_{dims}/portable/) and copy the whole folder"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no model card; a portable model folder holds {CARD}, {GENERATOR} and {TEMPLATES}; {fix}")
    try:
        card = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not a femursr model card ({err}); {fix}") from None
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        raise ValueError(f"{path}: not a femursr model card of format {CARD_FORMAT}; {fix}")
    missing = [k for k in ("method", "model", "dims", "voxel_mm", "normalization", "templates", "samples") if k not in card]
    if missing:
        raise ValueError(f"{path}: the model card lacks {', '.join(missing)}; {fix}")
    return card


def check_model_folder(folder) -> dict:
    """The card of a portable model folder, after checking that its files are there (no torch:
    called when the workflow is parsed)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: the portable model folder does not exist")
    card = read_card(folder / CARD)
    for name in (card["files"]["generator"], card["files"]["templates"]):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder}: {name} is missing; copy the whole portable model folder")
    return card


# ------------------------------------------------------------------ side, field of view, grid
