"""The clinical branch (issue 9): bone microstructure of a patient who has a clinical CT and no
HR-pQCT, from a trained SR model and the study's evaluation code.

Nothing here needs an HR scan or the training data. A trained model travels as a *portable model
folder* (:func:`export_model`): the inference weights (``generator.pt``, which rebuilds the
network), the ROI templates (``templates.npz``) and ``model.json``, the model card with what the
clinical branch needs to treat a new scan as the training data were treated (the LR's HU window,
the voxel of the training grid, the templates' femur side and how far down the shaft they reach)
and what a reader needs to judge the numbers (training and validation subjects, validation PSNR
and SSIM, the evaluation settings).

Per patient (rules/clinical.smk):

1. :func:`prepare_clinical`. A coarse femur mask on the native LR (the threshold backend of
   :mod:`femursr.masks`, which also finds the femoral head) gives the femur's side
   (:func:`detect_side`, or the sheet's ``side`` column), checks the field of view
   (:func:`check_field_of_view`: the head with a margin inside the scan, the femur leaving the scan
   only through its inferior face) and the box of the clinical grid (:func:`clinical_grid`):
   isotropic at the training voxel, the LR's axes, the femur plus a margin, and down the shaft
   only as far as the templates' specimens reach (in head radii), because the template matching
   compares whole outlines. The LR is resampled onto that grid (B-spline, as the paired branch
   resamples onto the HR grid); a right femur is mirrored in the same pass, so that it is matched
   by the (left) templates. Then the femur mask on the fine grid (the same threshold backend the
   paired branch runs on the LR on the HR grid) and the normalization of the training data.
2. :func:`super_resolve`: the model on every femur slice (:func:`femursr.sr.infer.infer_volume`);
   a model sampled several times gives one volume per sample, their mean and their SD.
3. :func:`evaluate_clinical`: bone mask, femur outline, template matching, ROIs and Hildebrand
   morphometry as in rules/evaluate.smk (:mod:`femursr.bonemask`, :mod:`femursr.rois`), with the
   ROIs placed from the volume's own bone mask (``roi_source: own``); with several samples every
   sample is measured in the same ROIs and the metrics carry the spread across samples.
4. :func:`summary_page`: one page (PDF, and PNG for the report) with the ROIs drawn on the femur,
   the metrics, and the model's provenance.

A patient whose scan cannot be used (no femur found, side unknown, a field of view that cuts the
femoral head, ROIs that cannot be placed) gets an error record in place of metrics
(:class:`ClinicalInputError`), and the other patients go on.
"""

from __future__ import annotations

import datetime
import json
import logging
import textwrap
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .atomic import atomic_dir, atomic_file, write_tsv
from .portable import SIDES, read_card
from .volume import Volume, read_volume, take_plane, write_volume

log = logging.getLogger(__name__)

STATUS = "status.json"
PREPARED_LR = "lr.nii"  # normalized, masked, on the clinical grid (the SR input)
PREPARED_FEMUR = "femur.nii.gz"
_HU_ON_GRID = "lr_hu.nii"  # the LR in HU on the clinical grid, removed once normalized
#: metric name (as in the paired tables), label on the summary page, unit
METRICS = (("bv_tv", "BV/TV", "1"), ("tb_th_mm", "Tb.Th", "mm"), ("tb_sp_mm", "Tb.Sp", "mm"), ("tb_n_per_mm", "Tb.N", "1/mm"))
TABLE_COLUMNS = ["subject", "status", "model", "region", "metric", "value", "unit", "samples", "sample_sd", "sample_min",
                 "sample_max", "placed_by", "roi_outside_femur", "error"]  # fmt: skip


class ClinicalInputError(ValueError):
    """A patient's scan cannot be used; the message names the patient, the problem and the fix."""


_FACES = {(0, 1): "left", (0, -1): "right", (1, 1): "posterior", (1, -1): "anterior", (2, 1): "superior", (2, -1): "inferior"}


def _face_name(vol: Volume, axis_xyz: int, high: bool) -> str:
    """Anatomical name of a face of the box of ``vol``: grid axis ``axis_xyz`` at its high or low
    end, named by the LPS direction its outward normal is closest to."""
    d = vol.direction_matrix[:, axis_xyz] * (1 if high else -1)
    k = int(np.argmax(np.abs(d)))
    return _FACES[(k, 1 if d[k] > 0 else -1)]


def _superior_axis(vol: Volume) -> tuple[int, int]:
    """The grid axis (x, y, z = 0, 1, 2) closest to superior, and +1 when its index grows upwards."""
    d = vol.direction_matrix
    a = int(np.argmax(np.abs(d[2])))
    return a, 1 if d[2, a] > 0 else -1


def _mask_points(mask: Volume) -> np.ndarray:
    """LPS mm of the voxels of ``mask`` (n, 3)."""
    kji = np.argwhere(np.asarray(mask.array) > 0)
    return mask.index_to_physical(kji[:, ::-1].astype(float))


@dataclass
class SideDetection:
    """The femur's side as its anatomy shows it: the femur away from the head (neck, trochanters,
    shaft) lies lateral of the head. ``offset_mm``: horizontal LPS offset (x, y) from the head
    centre to that part's centroid; ``ratio``: its x share (+1: towards the patient's left)."""

    side: str | None
    offset_mm: list
    ratio: float
    reason: str


def detect_side(femur: Volume, head_centre_mm, head_radius_mm: float, min_ratio: float = 0.5) -> SideDetection:
    """Left or right femur from a femur mask in patient (LPS) coordinates and its head sphere.

    The centroid of the femur beyond 1.5 head radii from the head centre lies lateral of the head:
    towards +x (the patient's left) for a left femur. The side is unknown (``side`` None) when that
    offset is shorter than a head radius horizontally or points less than ``min_ratio`` along x
    (more front-back than sideways: a scan not in patient coordinates, or an unusual pose)."""
    c = np.asarray(head_centre_mm, float)
    pts = _mask_points(femur)
    far = np.linalg.norm(pts - c, axis=1) > 1.5 * head_radius_mm
    if far.sum() < 10:
        return SideDetection(None, [0.0, 0.0], 0.0, "the femur mask holds almost nothing beyond the femoral head")
    v = pts[far].mean(0) - c
    h = float(np.hypot(v[0], v[1]))
    ratio = float(v[0] / h) if h > 0 else 0.0
    offset = [float(v[0]), float(v[1])]
    if h < head_radius_mm:
        return SideDetection(None, offset, ratio, f"the femur's centroid lies only {h:.1f} mm sideways of the head centre (head radius {head_radius_mm:.1f} mm)")
    if abs(ratio) < min_ratio:
        return SideDetection(None, offset, ratio, f"the femur lies {abs(v[1]):.1f} mm {'behind' if v[1] > 0 else 'in front of'} the head but only "
                             f"{abs(v[0]):.1f} mm to its {'left' if v[0] > 0 else 'right'}; left and right cannot be told apart")  # fmt: skip
    side = "left" if ratio > 0 else "right"
    return SideDetection(side, offset, ratio, f"the femur lies {abs(v[0]):.1f} mm to the patient's {side} of the femoral head (lateral)")


def resolve_side(detected: SideDetection, given: str, label: str) -> tuple[str, str]:
    """The side to use and where it comes from: the sheet's ``side`` column when given (it must not
    contradict the anatomy), else the anatomy. Raises :class:`ClinicalInputError` when unknown."""
    given = (given or "").strip().lower()
    if given and given not in SIDES:
        raise ClinicalInputError(f"{label}: side {given!r} in the subjects sheet; use left, right or leave it empty")
    if given and detected.side and given != detected.side:
        raise ClinicalInputError(
            f"{label}: the subjects sheet says side {given}, but the anatomy shows a {detected.side} femur ({detected.reason}); "
            "check the sheet's side column and the scan's orientation (DICOM ImageOrientationPatient, PatientPosition)"
        )
    if given:
        return given, "subjects sheet" + ("" if detected.side else f" (the anatomy could not tell: {detected.reason})")
    if detected.side is None:
        raise ClinicalInputError(
            f"{label}: left/right unknown: {detected.reason}. Give the femur's side in the subjects sheet "
            "(column side: left or right), or check that the scan is in patient coordinates"
        )
    return detected.side, "anatomy"


def check_field_of_view(lr: Volume, femur: Volume, head_centre_mm, head_radius_mm: float, margin_mm: float, label: str,
                        reach_mm: float | None = None) -> dict:  # fmt: skip
    """The scan must hold the whole femoral head with ``margin_mm`` to spare, and the part of the
    femur within ``reach_mm`` of the head centre (the part the clinical grid keeps; None: all of
    it) may leave the scanned box only through its inferior face (the shaft). Returns the head's
    distance to each face (mm); raises :class:`ClinicalInputError` naming the face otherwise."""
    ijk = lr.physical_to_index(np.asarray(head_centre_mm, float))
    n = np.asarray(lr.shape[::-1], float)
    sp = np.asarray(lr.spacing, float)
    room = {}
    for a in range(3):
        for high, d in ((False, (ijk[a] + 0.5) * sp[a]), (True, (n[a] - 0.5 - ijk[a]) * sp[a])):
            room[_face_name(lr, a, high)] = float(d)
    need = head_radius_mm + margin_mm
    for face, d in room.items():
        if d < need:
            where = f"beyond the scan's {face} edge" if d < 0 else f"{d:.1f} mm from the scan's {face} edge"
            raise ClinicalInputError(
                f"{label}: the field of view cuts the femoral head: its centre "
                f"({', '.join(f'{v:.1f}' for v in head_centre_mm)} mm) lies {where}, and the scan must hold its radius "
                f"{head_radius_mm:.1f} mm + {margin_mm:g} mm (clinical.head_margin_mm) on every side. Reconstruct the CT "
                "with a field of view that holds the whole hip joint, or leave this patient out"
            )
    m = np.asarray(femur.array) > 0
    sup, _ = _superior_axis(lr)
    for a in range(3):
        for high in (False, True):
            face = _face_name(lr, a, high)
            if face == "inferior":
                continue
            kji = np.argwhere(np.take(m, -1 if high else 0, axis=2 - a))
            if not len(kji):
                continue
            kji = np.insert(kji, 2 - a, m.shape[2 - a] - 1 if high else 0, axis=1)
            dist = np.linalg.norm(lr.index_to_physical(kji[:, ::-1].astype(float)) - np.asarray(head_centre_mm, float), axis=1)
            count = int(np.count_nonzero(dist <= (np.inf if reach_mm is None else reach_mm)))
            if count:
                part = "the femoral head" if a == sup else "the femur (greater trochanter or neck)"
                raise ClinicalInputError(
                    f"{label}: the field of view cuts {part}: {count} voxels of the femur mask lie on the scan's {face} "
                    "face, where only the shaft may leave the scan (its inferior face). Reconstruct the CT with a field "
                    "of view that holds the whole proximal femur, or leave this patient out"
                )
    return room


def clinical_grid(lr: Volume, femur: Volume, head_centre_mm, head_radius_mm: float, reach_head_radii: float | None,
                  voxel_mm: float, margin_mm: float) -> tuple[Volume, dict]:  # fmt: skip
    """The clinical grid: isotropic ``voxel_mm``, the LR's axes, over the femur of ``femur`` (the
    coarse mask on the LR) plus ``margin_mm``, inside the LR's field of view.

    Down the shaft it ends where the femur leaves the sphere of ``reach_head_radii`` head radii
    around the head centre (the templates' specimens end there; None: no limit), with no margin:
    the femur leaves the grid through its inferior face, as the sawn shaft leaves the HR box. Returns
    the grid (a Volume whose array is a read-only stand-in of zeros) and a record."""
    pts = _mask_points(femur)
    c = np.asarray(head_centre_mm, float)
    dist = np.linalg.norm(pts - c, axis=1)
    reach_mm = None if reach_head_radii is None else float(reach_head_radii * head_radius_mm)
    keep = pts if reach_mm is None else pts[dist <= reach_mm]
    sp = np.asarray(lr.spacing, float)
    u = lr.physical_to_index(keep) * sp  # mm along the LR's grid axes (x, y, z)
    half = 0.5 * sp
    lo, hi = u.min(0) - half - margin_mm, u.max(0) + half + margin_mm
    sup, sign = _superior_axis(lr)
    # the inferior face: where the kept femur ends (the cut), no margin
    if sign > 0:
        lo[sup] = u[:, sup].min()
    else:
        hi[sup] = u[:, sup].max()
    fov_hi = (np.asarray(lr.shape[::-1], float) - 1) * sp
    lo, hi = np.maximum(lo, 0.0), np.minimum(hi, fov_hi)
    n_xyz = np.floor((hi - lo) / voxel_mm + 1e-6).astype(int) + 1
    origin = lr.index_to_physical(lo / sp)
    shape = (int(n_xyz[2]), int(n_xyz[1]), int(n_xyz[0]))
    below = pts[dist > reach_mm] if reach_mm is not None else pts[:0]
    cut = bool(len(below))
    grid = Volume(np.broadcast_to(np.float32(0), shape), (voxel_mm,) * 3, tuple(origin), lr.direction)
    info = {
        "shape_zyx": list(shape),
        "spacing_mm": voxel_mm,
        "origin_lps_mm": [float(v) for v in origin],
        "direction_lps": list(lr.direction),
        "margin_mm": margin_mm,
        "reach_mm": reach_mm,
        "shaft_cut": cut,
        "femur_length_in_grid_mm": float((hi - lo)[sup]),
    }
    if reach_mm is not None and not cut:
        info["warning"] = (
            f"the scan ends before the templates' reach ({reach_mm:.1f} mm from the head centre): the femur in the grid is "
            "shorter than the templates', which the matching may not fit well"
        )
    return grid, info


def _lateral_axis(vol: Volume) -> int:
    """The grid axis (x, y, z = 0, 1, 2) closest to the patient's left-right axis."""
    return int(np.argmax(np.abs(vol.direction_matrix[0])))


def mirrored_sampling_grid(grid: Volume) -> Volume:
    """The sampling grid whose resampled array is that of ``grid`` flipped along its left-right
    axis: stored with the geometry of ``grid``, the volume shows the femur mirrored (a right femur
    as a left one), in one resampling pass."""
    a = _lateral_axis(grid)
    d = grid.direction_matrix.copy()
    n = grid.shape[2 - a]
    origin = np.asarray(grid.origin) + (n - 1) * grid.spacing[a] * d[:, a]
    d[:, a] *= -1
    return Volume(grid.array, grid.spacing, tuple(origin), tuple(d.ravel()))


# ------------------------------------------------------------------ step 1: prepare
@dataclass
class PrepareOptions:
    """Settings of :func:`prepare_clinical` (config ``clinical``)."""

    voxel_mm: float | None = None  # None: the training grid's voxel (model card)
    margin_mm: float = 1.5
    head_margin_mm: float = 1.0


def prepare_clinical(lr_path, out_dir, *, card: dict, threshold: dict, resampling: dict, options: PrepareOptions,
                     side: str = "", subject: str = "") -> dict:  # fmt: skip
    """Step 1 for one patient: write ``out_dir`` (atomically) holding ``status.json`` and, when the
    scan can be used, ``lr.nii`` (normalized and masked, on the clinical grid) and
    ``femur.nii.gz``. Returns the status record (``status`` ok or error); a scan that cannot be used
    gives an error record (:class:`ClinicalInputError`, :class:`femursr.masks.MaskError`), any
    other failure raises."""
    from .masks import MaskError

    t0 = time.perf_counter()
    label = f"patient {subject}" if subject else str(lr_path)
    record = {"subject": subject, "lr": str(lr_path), "status": "ok", "error": "", "warnings": []}
    with atomic_dir(out_dir) as tmp:
        try:
            _prepare(Path(lr_path), tmp, record, card, threshold, resampling, options, side, label)
        except (ClinicalInputError, MaskError) as err:
            for name in (PREPARED_LR, PREPARED_FEMUR, _HU_ON_GRID):
                (tmp / name).unlink(missing_ok=True)
            record.update(status="error", error=str(err), stage=record.get("stage", "prepare"))
            log.error("%s", err)
        record["seconds"] = time.perf_counter() - t0
        (tmp / STATUS).write_text(json.dumps(record, indent=2) + "\n")
    return record


def _prepare(lr_path: Path, tmp: Path, record: dict, card, threshold, resampling, options: PrepareOptions, side, label) -> None:
    from .masks import MaskError, ThresholdParams, threshold_femur_mask
    from .normalize import normalize_to_file
    from .registration import resample_onto
    from .volume import VolumeWriter

    import SimpleITK as sitk

    params = ThresholdParams(**threshold)
    lr = read_volume(lr_path)
    record["stage"] = "femur on the native LR"
    try:
        coarse, rep = threshold_femur_mask(lr, params, label="native LR")
    except MaskError as err:
        raise ClinicalInputError(f"{label}: no femur found in the clinical CT {lr_path}: {err}") from None
    c, r = np.asarray(rep["head_centre_mm"]), float(rep["head_radius_mm"])
    record["native"] = {"head_centre_mm": c.tolist(), "head_radius_mm": r, "femur_ml": rep["femur_ml"],
                        "spacing_mm": list(lr.spacing), "shape_zyx": list(lr.shape)}  # fmt: skip
    record["stage"] = "field of view"
    reach = card["templates"].get("reach_head_radii")
    reach_mm = None if reach is None else reach * r
    record["native"]["head_room_mm"] = check_field_of_view(lr, coarse, c, r, options.head_margin_mm, label, reach_mm)
    record["stage"] = "side"
    det = detect_side(coarse, c, r)
    use, source = resolve_side(det, side, label)
    templates_side = card["templates"]["side"]
    mirrored = use != templates_side
    record["side"] = {"side": use, "source": source, "detected": asdict(det), "templates_side": templates_side, "mirrored": mirrored}
    log.info("%s: %s femur (%s); head r = %.1f mm at %s mm", label, use, source, r, np.round(c, 1).tolist())

    record["stage"] = "grid"
    voxel = float(options.voxel_mm or card["voxel_mm"])
    if abs(voxel - float(card["voxel_mm"])) > 1e-6:
        record["warnings"].append(f"clinical.voxel_mm {voxel:g} mm differs from the model's training voxel {card['voxel_mm']:g} mm")
    grid, info = clinical_grid(lr, coarse, c, r, reach, voxel, options.margin_mm)
    if "warning" in info:
        record["warnings"].append(info.pop("warning"))
    record["grid"] = info
    sampling = mirrored_sampling_grid(grid) if mirrored else grid
    hu_path = tmp / _HU_ON_GRID
    with VolumeWriter(hu_path, grid.shape, "float32", grid.spacing, grid.origin, grid.direction) as w:
        resample_onto(lr, sampling, sitk.Transform(3, sitk.sitkIdentity), interpolator=resampling["interpolator"],
                      default_hu=resampling["default_hu"], out=w)  # fmt: skip
    on_grid = read_volume(hu_path)
    log.info("%s: LR resampled onto the clinical grid %s at %g mm%s", label, grid.shape, voxel, ", mirrored" if mirrored else "")

    record["stage"] = "femur on the clinical grid"
    try:
        femur, frep = threshold_femur_mask(on_grid, params, label="LR on the clinical grid")
    except MaskError as err:
        raise ClinicalInputError(f"{label}: no femur found on the clinical grid of {lr_path}: {err}") from None
    write_volume(femur, tmp / PREPARED_FEMUR)
    record["femur"] = {k: frep[k] for k in ("head_centre_mm", "head_radius_mm", "femur_ml", "acetabulum_cover", "pelvis_removed_ml")}
    record["stage"] = "normalize"
    window = card["normalization"]["lr_window_hu"]
    normalize_to_file(on_grid, window, femur, tmp / PREPARED_LR, label=label)
    record["normalization"] = {"lr_window_hu": window}
    del on_grid
    hu_path.unlink()
    record["stage"] = "done"


def read_status(prepared_dir) -> dict:
    """The status record of a prepared folder."""
    return json.loads((Path(prepared_dir) / STATUS).read_text())


# ------------------------------------------------------------------ step 2: super-resolution
def super_resolve(prepared_dir, generator, out_volume, out_timing, samples_dir, *, samples: int = 1, seed: int = 0,
                  device="auto", amp="off", batch_slices: int = 4, tile_px=None, overlap_px: int = 32, subject: str = "",
                  build=None) -> dict:  # fmt: skip
    """Step 2: the SR volume of a prepared patient (``out_volume``; the mean of the samples for a
    model sampled several times) and its timing record (``out_timing``: T/V). With ``samples`` > 1
    every sample (``sample_XX.nii.gz``, seeds ``seed`` + k) and their voxel-wise SD (``std.nii.gz``)
    go to ``samples_dir``, which is empty otherwise. ``build`` stands in for the registry (tests)."""
    from .sr.infer import infer_volume, load_generator
    from .sr.train import select_device

    prepared_dir = Path(prepared_dir)
    label = f"patient {subject}" if subject else str(prepared_dir)
    lr = read_volume(prepared_dir / PREPARED_LR)
    mask = read_volume(prepared_dir / PREPARED_FEMUR)
    dev = select_device(device)
    model = load_generator(generator, dev, build=build)
    samples = int(samples)
    if samples > 1 and not model.stochastic:
        raise ValueError(f"{label}: model {model.name} is deterministic; several samples would all be equal (samples: 1)")
    opts = dict(device=dev, amp=amp, batch_slices=batch_slices, tile_px=tile_px, overlap_px=overlap_px, label=label)
    with atomic_dir(samples_dir) as tmp:
        if samples == 1:
            sr, timing = infer_volume(model, lr.array, mask.array, seed=seed, **opts)
        else:
            total = np.zeros(lr.shape, np.float64)
            sq = np.zeros(lr.shape, np.float64)
            seconds = 0.0
            for k in range(samples):
                s, timing = infer_volume(model, lr.array, mask.array, seed=seed + k, **opts)
                write_volume(lr.with_array(s), tmp / f"sample_{k:02d}.nii.gz")
                total += s
                sq += np.asarray(s, np.float64) ** 2
                seconds += timing["seconds"]
            sr = (total / samples).astype(np.float32)
            std = np.sqrt(np.maximum(sq / samples - (total / samples) ** 2, 0.0)).astype(np.float32)
            write_volume(lr.with_array(std), tmp / "std.nii.gz")
            timing.update(seconds=seconds, seconds_per_slice=seconds / max(1, timing["slices_computed"]), samples=samples, seed=seed)
        write_volume(lr.with_array(sr), out_volume)
    timing = {"subject": subject, "model": model.name, "in_channels": model.in_channels, "weights": str(generator), **timing}
    with atomic_file(out_timing) as tmp:
        tmp.write_text(json.dumps(timing, indent=2) + "\n")
    log.info("%s: SR of %d slices in %.1f s (%d sample(s)) on %s", label, timing["slices_computed"], timing["seconds"], samples, timing["device"])
    return timing


def sample_files(samples_dir) -> list[Path]:
    """The per-sample SR volumes of a samples folder, in order."""
    return sorted(Path(samples_dir).glob("sample_*.nii.gz"))


# ------------------------------------------------------------------ step 3: evaluation
@dataclass
class EvaluationOptions:
    """The evaluation settings (config ``evaluation``) the clinical branch uses."""

    bone_mask: dict
    outline_closing_mm: float = 1.0
    surface_voxel_mm: float = 0.4
    template_points: int = 10000
    matching: dict | None = None
    refine_radius: float = 0.7
    roi_edge_vox: int = 40
    context_mm: float = 2.0
    min_outline_fraction: float = 0.8

    @classmethod
    def from_config(cls, evaluation: dict) -> "EvaluationOptions":
        return cls(**{k: evaluation[k] for k in cls.__dataclass_fields__ if k in evaluation})


def roi_edge_vox(opts: EvaluationOptions, card: dict, grid_voxel_mm: float) -> int:
    """ROI edge in voxels of the clinical grid: ``roi_edge_vox`` training-grid voxels, so that the
    ROIs have the study's size in mm whatever voxel the clinical grid has."""
    return max(4, int(round(opts.roi_edge_vox * float(card["voxel_mm"]) / grid_voxel_mm)))


def evaluate_clinical(prepared_dir, sr_path, samples_dir, templates_path, card: dict, opts: EvaluationOptions, *, seed: int,
                      subject: str, bone_model=None) -> tuple[pd.DataFrame, dict]:  # fmt: skip
    """Step 3: bone mask, ROIs and morphometry of a patient's SR volume. Returns the metrics (one
    row per region and metric, :data:`TABLE_COLUMNS`) and a record (placement, ROIs, per-sample
    values). ROIs come from the volume's own bone mask; when it outlines less than
    ``min_outline_fraction`` of the femur mask, or its match fails, from the femur mask itself
    (``placed_by`` says which). ``bone_model``: the nnU-Net bone model folder (bone-mask backend
    nnunet). Raises :class:`ClinicalInputError` when neither places them."""
    from .bonemask import bone_outline, bone_segmenter, volume_ml
    from .pointcloud import MatchParams
    from .roimetrics import roi_morphometry
    from .rois import place_from_outline, roi_boxes
    from .templates import load_templates

    prepared_dir = Path(prepared_dir)
    label = f"patient {subject}"
    femur = read_volume(prepared_dir / PREPARED_FEMUR)
    sr = read_volume(sr_path)
    segment = bone_segmenter(opts.bone_mask, bone_model)
    bone = segment(sr, femur, label)
    outline = bone_outline(bone, femur, opts.outline_closing_mm, opts.surface_voxel_mm)
    femur_ml, outline_ml = volume_ml(femur), volume_ml(outline)
    fraction = outline_ml / femur_ml if femur_ml else 0.0
    templates = load_templates(templates_path)
    match_params = MatchParams(**{"seed": seed, **(opts.matching or {})})

    def place(mask):
        return place_from_outline(mask, templates, opts.template_points, opts.surface_voxel_mm, match_params, opts.refine_radius, seed=seed)

    placement, placed_by, notes = None, "own", []
    if fraction >= opts.min_outline_fraction:
        try:
            placement = place(outline)
        except (ValueError, RuntimeError) as err:
            notes.append(f"own placement failed: {err}")
    else:
        notes.append(f"the bone mask outlines {100 * fraction:.0f} % of the femur mask, below evaluation.min_outline_fraction "
                     f"{opts.min_outline_fraction:g}")  # fmt: skip
    if placement is None:
        placed_by = "femur mask"
        try:
            placement = place(femur)
        except (ValueError, RuntimeError) as err:
            raise ClinicalInputError(f"{label}: the ROIs cannot be placed ({'; '.join(notes)}; on the femur mask: {err})") from None
        notes.append("the ROIs were placed on the femur mask's outline instead")
    for n in notes:
        log.warning("%s: %s", label, n)
    edge = roi_edge_vox(opts, card, femur.spacing[0])
    rois = roi_boxes(placement.centres, femur, edge)
    values = {r.region: roi_morphometry(bone, femur, r, opts.context_mm) for r in rois}
    per_sample = []
    for path in sample_files(samples_dir):
        b = segment(read_volume(path), femur, f"{label} ({path.name})")
        per_sample.append({r.region: roi_morphometry(b, femur, r, opts.context_mm) for r in rois})
    rows = []
    for r in rois:
        for metric, _, unit in METRICS:
            s = np.array([getattr(ps[r.region], metric) for ps in per_sample], float)
            rows.append({
                "subject": subject, "status": "ok", "model": card["method"], "region": r.region, "metric": metric,
                "value": float(getattr(values[r.region], metric)), "unit": unit, "samples": max(1, len(s)),
                "sample_sd": float(np.std(s, ddof=1)) if len(s) > 1 else np.nan,
                "sample_min": float(s.min()) if len(s) > 1 else np.nan, "sample_max": float(s.max()) if len(s) > 1 else np.nan,
                "placed_by": placed_by, "roi_outside_femur": r.outside_femur, "error": "",
            })  # fmt: skip
    record = {
        "subject": subject,
        "placed_by": placed_by,
        "notes": notes,
        "outline": {"outline_ml": outline_ml, "femur_ml": femur_ml, "fraction": fraction},
        "bone_ml": volume_ml(bone),
        "placement": placement.to_dict(),
        "roi_edge_vox": edge,
        "rois": [asdict(r) for r in rois],
        "per_sample": [{reg: asdict(m) for reg, m in ps.items()} for ps in per_sample],
        "grid": {"shape_zyx": list(femur.shape), "spacing": femur.spacing, "origin": femur.origin, "direction": femur.direction},
    }
    return pd.DataFrame(rows, columns=TABLE_COLUMNS), record


def error_table(subject: str, model: str, error: str) -> pd.DataFrame:
    """The metrics file of a patient without metrics: one row that says why."""
    row = {c: np.nan for c in TABLE_COLUMNS}
    row.update(subject=subject, status="error", model=model, region="", metric="", unit="", placed_by="", error=error)
    return pd.DataFrame([row], columns=TABLE_COLUMNS)


def write_metrics(table: pd.DataFrame, path) -> None:
    write_tsv(table, path, sep=",", float_format="%.6g")


# ------------------------------------------------------------------ step 4: the summary page
def _fmt(v, unit):
    if not np.isfinite(v):
        return "n/a"
    return f"{v:.3f}" if unit in ("1", "mm", "1/mm") else f"{v:g}"


def _provenance(card: dict, status: dict, record: dict | None, timing: dict | None) -> list[str]:
    tr = card.get("training", {})
    val = card.get("validation", {})
    vtxt = ", ".join(f"{k.upper()} {v:.4g}" for k, v in sorted(val.items())) or "none recorded"
    lines = [
        f"Model: {card['method']} ({card['model']}, {card['dims'].replace('25d', '2.5D').replace('2d', '2D')}), "
        f"weights sha256 {card.get('generator_sha256', '')[:12]}, exported {card.get('exported', '?')}, femursr {card.get('femursr', '?')}",
        f"Training data: {len(tr.get('train_subjects', []))} training and {len(tr.get('validation_subjects', []))} validation "
        f"subjects ({tr.get('cohort', '?')} cohort; paired clinical CT and HR-pQCT), {tr.get('steps', '?')} steps on {tr.get('device', '?')}; "
        f"training grid {card['voxel_mm']:g} mm, LR window {card['normalization']['lr_window_hu']} HU",
        f"Validation ({card.get('validation_patches', '?')} patches of the validation subjects, last epoch): {vtxt}",
        f"Templates: {', '.join(card['templates']['subjects'])} ({card['templates']['side']} femurs, reach "
        f"{card['templates'].get('reach_head_radii', float('nan')):.2f} head radii)",
    ]
    side = status.get("side")
    if side:
        lines.append(f"Side: {side['side']} ({side['source']})" + ("; mirrored to a left femur for the templates" if side["mirrored"] else ""))
    if status.get("grid"):
        g = status["grid"]
        lines.append(f"Clinical grid: {g['shape_zyx'][::-1]} voxels of {g['spacing_mm']:g} mm (x, y, z) over the femur "
                     f"+ {g['margin_mm']:g} mm; source {status['lr']}")  # fmt: skip
    if record:
        p = record["placement"]
        lines.append(f"ROIs: {record['roi_edge_vox']} voxels ({record['roi_edge_vox'] * status['grid']['spacing_mm']:.1f} mm) cubes, "
                     f"placed on the {'own bone mask' if record['placed_by'] == 'own' else 'femur mask'} outline by template "
                     f"{p['template']} (scale {p['match']['transform']['scale']:.3f}, fitness {p['match']['fitness']:.2f}, "
                     f"RMS {p['match']['rmse_mm']:.2f} mm)")  # fmt: skip
    if timing:
        lines.append(f"SR: {timing['slices_computed']} slices in {timing['seconds']:.1f} s on {timing['device']}, {timing.get('samples', 1)} sample(s)")
    for w in status.get("warnings", []) + (record or {}).get("notes", []):
        lines.append(f"Note: {w}")
    return lines


def summary_page(pdf, png, *, subject: str, card: dict, status: dict, table: pd.DataFrame, record: dict | None = None,
                 timing: dict | None = None, sr_path=None, prepared_dir=None) -> None:  # fmt: skip
    """One A4 page (``pdf``, and ``png`` for the report): the SR volume's coronal slice through the
    ROIs with the ROIs drawn on the femur, a close-up of each ROI, the metrics (with the spread
    across samples), and where the numbers come from; for a patient without metrics, the error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from .geometry import REGION_IDS
    from .templates import REGION_COLOURS

    ok = status.get("status") == "ok" and record is not None
    fig = plt.figure(figsize=(8.27, 11.69))
    fig.text(0.05, 0.965, f"Proximal femur bone microstructure: patient {subject}", fontsize=14, weight="bold")
    fig.text(0.05, 0.945, f"clinical CT only, super-resolved by {card['method']}; femursr clinical branch, "
             f"{datetime.date.today().isoformat()}. Research use, not a diagnostic device.", fontsize=8, color="0.3")  # fmt: skip
    if ok:
        sr = read_volume(sr_path)
        femur = read_volume(Path(prepared_dir) / PREPARED_FEMUR)
        rois = record["rois"]
        centre_idx = np.mean([np.asarray(r["start_zyx"], float) + (r["edge_vox"] - 1) / 2 for r in rois], axis=0)
        # coronal slice: the grid axis closest to anterior-posterior is the slice normal
        ap = int(np.argmax(np.abs(sr.direction_matrix[1])))  # x, y, z
        arr_axis = 2 - ap
        k = int(np.clip(round(centre_idx[arr_axis]), 0, sr.shape[arr_axis] - 1))
        img = np.asarray(take_plane(sr.array, arr_axis, k), np.float32)
        fem = np.asarray(take_plane(femur.array, arr_axis, k)) > 0
        axes_left = [a for a in (0, 1, 2) if a != arr_axis]  # array axes left in the plane (rows, cols)
        ax = fig.add_axes([0.05, 0.50, 0.50, 0.42])
        ax.imshow(img, cmap="gray", vmin=0, vmax=1, origin="lower", interpolation="nearest")
        ax.contour(fem.astype(float), levels=[0.5], colors="#ffd700", linewidths=0.6)
        for r in rois:
            s = np.asarray(r["start_zyx"])
            cuts = s[arr_axis] <= k < s[arr_axis] + r["edge_vox"]
            colour = REGION_COLOURS[REGION_IDS[r["region"]]]
            ax.add_patch(Rectangle((s[axes_left[1]] - 0.5, s[axes_left[0]] - 0.5), r["edge_vox"], r["edge_vox"], fill=False,
                                   ec=colour, lw=1.8, ls="-" if cuts else "--"))  # fmt: skip
            ax.text(s[axes_left[1]], s[axes_left[0]] + r["edge_vox"] + 2, r["region"], color=colour, fontsize=8, weight="bold")
        ax.set_title(f"SR volume, {'coronal' if ap == 1 else 'slice'} plane {k}: femur outline (yellow) and ROIs", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        if status.get("side", {}).get("mirrored"):
            ax.text(0.02, 0.02, "mirrored (right femur shown as left)", transform=ax.transAxes, color="w", fontsize=7)
        for i, r in enumerate(rois):
            s = np.asarray(r["start_zyx"])
            e = r["edge_vox"]
            zc = int(np.clip(s[0] + e // 2, 0, sr.shape[0] - 1))
            sl = np.asarray(take_plane(sr.array, 0, zc), np.float32)
            y0, x0 = max(0, s[1]), max(0, s[2])
            crop = sl[y0 : s[1] + e, x0 : s[2] + e]
            axr = fig.add_axes([0.60, 0.785 - i * 0.14, 0.13, 0.13])
            axr.imshow(crop, cmap="gray", vmin=0, vmax=1, origin="lower", interpolation="nearest")
            axr.set_xticks([])
            axr.set_yticks([])
            for sp_ in axr.spines.values():
                sp_.set_color(REGION_COLOURS[REGION_IDS[r["region"]]])
                sp_.set_linewidth(2)
            sub = table[table.region == r["region"]].set_index("metric")
            txt = "\n".join(f"{lab} {_fmt(sub.loc[m, 'value'], u)}" + (f" ± {sub.loc[m, 'sample_sd']:.3f}" if np.isfinite(sub.loc[m, "sample_sd"]) else "")
                            + ("" if u == "1" else f" {u}") for m, lab, u in METRICS)  # fmt: skip
            fig.text(0.75, 0.845 - i * 0.14, f"{r['region']} ROI\n(axial, centre slice)\n" + txt, fontsize=7.5, va="center")
        # the table
        n_s = int(table["samples"].max())
        header = ["region"] + [f"{lab} ({u})" if u != "1" else lab for _, lab, u in METRICS] + ["outside femur"]
        cells = []
        for r in rois:
            sub = table[table.region == r["region"]].set_index("metric")
            row = [r["region"]]
            for m, _, u in METRICS:
                v = _fmt(sub.loc[m, "value"], u)
                if n_s > 1 and np.isfinite(sub.loc[m, "sample_sd"]):
                    v += f" ± {sub.loc[m, 'sample_sd']:.3f}"
                row.append(v)
            row.append(f"{100 * r['outside_femur']:.0f} %")
            cells.append(row)
        axt = fig.add_axes([0.05, 0.36, 0.90, 0.11])
        axt.axis("off")
        tab = axt.table(cellText=cells, colLabels=header, loc="center", cellLoc="center")
        tab.auto_set_font_size(False)
        tab.set_fontsize(8.5)
        tab.scale(1, 1.5)
        spread = (f"values of the mean of {n_s} samples; ± SD across the samples, each measured in the same ROIs" if n_s > 1
                  else "one deterministic SR volume (no spread across samples)")  # fmt: skip
        fig.text(0.05, 0.345, f"Metrics in the cubic ROIs (Hildebrand local thickness; Tb.N = 1/(Tb.Th + Tb.Sp)); {spread}.", fontsize=7.5)
    else:
        fig.text(0.05, 0.88, "No metrics for this patient", fontsize=13, color="#b00020", weight="bold")
        msg = status.get("error") or (table["error"].iloc[0] if len(table) else "")
        fig.text(0.05, 0.86, "\n".join(textwrap.wrap(str(msg), 110)), fontsize=8.5, va="top", family="monospace")
        fig.text(0.05, 0.78, "The other patients are not affected. Fix the input as the message says and rerun.", fontsize=8.5)
    y = 0.32
    fig.text(0.05, y, "Where the numbers come from", fontsize=10, weight="bold")
    for line in _provenance(card, status, record if ok else None, timing if ok else None):
        wrapped = textwrap.wrap(line, 120)
        y -= 0.016
        fig.text(0.05, y, wrapped[0], fontsize=7)
        for w in wrapped[1:]:
            y -= 0.013
            fig.text(0.07, y, w, fontsize=7)
    for path, fmt, dpi in ((pdf, "pdf", None), (png, "png", 100)):
        with atomic_file(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=dpi)
    plt.close(fig)


def finish_patient(*, subject: str, prepared_dir, card_path, templates=None, sr=None, timing=None, samples_dir=None,
                   options: EvaluationOptions, seed: int, out_metrics, out_record, out_pdf, out_png,
                   bone_model=None) -> dict:  # fmt: skip
    """Steps 3 and 4 for one patient: the metrics file (``metrics.csv``; an error record when the
    scan could not be used or the ROIs cannot be placed), the record (JSON: preparation, placement,
    ROIs, per-sample values, the model card) and the summary page. ``sr``, ``timing``,
    ``samples_dir`` and ``templates`` are needed only when the preparation succeeded. Returns the
    record."""
    card = read_card(card_path)
    status = read_status(prepared_dir)
    evaluation, tim = None, None
    if status["status"] == "ok":
        try:
            table, evaluation = evaluate_clinical(prepared_dir, sr, samples_dir, templates, card, options, seed=seed, subject=subject,
                                                  bone_model=bone_model)  # fmt: skip
            tim = json.loads(Path(timing).read_text())
        except ClinicalInputError as err:
            status = {**status, "status": "error", "error": str(err), "stage": "ROI placement"}
            log.error("%s", err)
    if status["status"] != "ok":
        table = error_table(subject, card["method"], status["error"])
    write_metrics(table, out_metrics)
    record = {"subject": subject, "status": status["status"], "error": status.get("error", ""), "preparation": status,
              "evaluation": evaluation, "timing": tim, "model": card}  # fmt: skip
    with atomic_file(out_record) as tmp:
        tmp.write_text(json.dumps(record, indent=2, default=float) + "\n")
    summary_page(out_pdf, out_png, subject=subject, card=card, status=status, table=table, record=evaluation, timing=tim,
                 sr_path=sr, prepared_dir=prepared_dir)  # fmt: skip
    return record


# ------------------------------------------------------------------ all patients
def collect_tables(paths) -> pd.DataFrame:
    """The metrics of all patients in one table (errors included)."""
    tables = [pd.read_csv(p, dtype={"subject": str, "error": str}, keep_default_na=True) for p in paths]
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=TABLE_COLUMNS)
