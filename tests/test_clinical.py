"""The clinical branch (issue 9): side, field of view and grid of a clinical-only scan, the portable
model folder, preparation of a synthetic patient against its truth, error records for bad
inputs, the spread across samples, and (slow) the branch through snakemake against the paired
evaluation of the same subject, with bad patients that do not stop the others."""

import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch
import yaml
from torch import nn

from femursr import clinical as C
from femursr import portable as P
from femursr.geometry import REGION_IDS
from femursr.imaging import import_to_file
from femursr.masks import dice
from femursr.pointcloud import PointCloud
from femursr.registration import resample_onto
from femursr.sr.base import SRModel
from femursr.templates import Template, build_template, load_templates, save_templates
from femursr.volume import Volume, read_volume, write_volume

from conftest import REPO, load_config, run_snakemake, small_synthetic

RESAMPLING = {"interpolator": "bspline", "default_hu": -1000}


# tiny convolutions run faster on one thread than on two (OpenMP overhead)
pytestmark = pytest.mark.usefixtures("torch_one_thread")


# ------------------------------------------------------------------ shapes with known answers
def _femur_like(shape=(60, 50, 70), spacing=(1.0, 1.0, 1.0), head=(20, 25, 40), radius=8.0, lateral=+1, along="x"):
    """A ball (the head) joined by a bar (the neck) to a vertical cylinder (the shaft) that lies
    12 voxels lateral of the head (+x: a left femur, -x: a right one; along y: neither) and reaches
    the inferior face; array (z, y, x), identity direction."""
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    hz, hy, hx = head
    sx, sy = (hx + 18 * lateral, hy) if along == "x" else (hx, hy + 18 * lateral)
    m = (z - hz) ** 2 + (y - hy) ** 2 + (x - hx) ** 2 <= radius**2
    m |= ((y - sy) ** 2 + (x - sx) ** 2 <= 25) & (z <= hz + 2)
    lo_x, hi_x = sorted((hx, sx))
    lo_y, hi_y = sorted((hy, sy))
    m |= (np.abs(z - (hz - 2)) <= 2) & (y >= lo_y - 2) & (y <= hi_y + 2) & (x >= lo_x) & (x <= hi_x)
    vol = Volume(m.astype(np.uint8), spacing, (0.0, 0.0, 0.0))
    centre = vol.index_to_physical(np.array([hx, hy, hz], float))
    return vol, centre


def test_fit_sphere_recovers_centre_and_radius():
    rng = np.random.default_rng(0)
    d = rng.normal(size=(500, 3))
    pts = np.array([3.0, -2.0, 7.5]) + 11.0 * d / np.linalg.norm(d, axis=1, keepdims=True)
    c, r = P.fit_sphere(pts + 0.01 * rng.normal(size=pts.shape))
    assert np.allclose(c, [3.0, -2.0, 7.5], atol=0.01) and abs(r - 11.0) < 0.01


def test_detect_side_from_the_anatomy():
    left, c = _femur_like(lateral=+1)
    right, c_r = _femur_like(lateral=-1)
    det = C.detect_side(left, c, 8.0)
    assert det.side == "left" and det.ratio > 0.9 and det.offset_mm[0] > 8
    assert C.detect_side(right, c_r, 8.0).side == "right"
    # the femur behind the head: left and right cannot be told apart
    back, c_b = _femur_like(lateral=+1, along="y")
    unknown = C.detect_side(back, c_b, 8.0)
    assert unknown.side is None and "cannot be told apart" in unknown.reason
    # the same femur seen through a direction matrix that turns x into y: unknown too
    turned = Volume(left.array, left.spacing, left.origin, (0, -1, 0, 1, 0, 0, 0, 0, 1))
    c_t = turned.index_to_physical(left.physical_to_index(c))
    assert C.detect_side(turned, c_t, 8.0).side is None


def test_resolve_side_takes_the_sheet_but_not_against_the_anatomy():
    left = C.SideDetection("left", [12.0, 0.0], 1.0, "lateral")
    unknown = C.SideDetection(None, [0.0, 12.0], 0.0, "the femur lies behind the head")
    assert C.resolve_side(left, "", "patient P1") == ("left", "anatomy")
    assert C.resolve_side(left, "left", "patient P1")[0] == "left"
    side, source = C.resolve_side(unknown, "right", "patient P1")
    assert side == "right" and "subjects sheet" in source and "could not tell" in source
    with pytest.raises(C.ClinicalInputError, match="patient P1: the subjects sheet says side right, but the anatomy shows a left femur"):
        C.resolve_side(left, "right", "patient P1")
    with pytest.raises(C.ClinicalInputError, match="patient P1: left/right unknown: the femur lies behind the head.*column side"):
        C.resolve_side(unknown, "", "patient P1")
    with pytest.raises(C.ClinicalInputError, match="side 'up'"):
        C.resolve_side(left, "up", "patient P1")


def test_field_of_view_must_hold_the_head_and_let_only_the_shaft_out():
    femur, c = _femur_like()  # head centre at z = 20 of 60 slices, x = 40 of 70, radius 8
    lr = femur.with_array(np.zeros(femur.shape, np.float32))
    room = C.check_field_of_view(lr, femur, c, 8.0, 1.0, "patient P1")
    assert room["superior"] == pytest.approx(60 - 0.5 - 20) and room["left"] == pytest.approx(70 - 0.5 - 40)
    assert room["inferior"] == pytest.approx(20.5) and room["anterior"] == pytest.approx(25.5)

    def top(k):  # the scan cut k slices above its first
        return Volume(lr.array[:k], lr.spacing, lr.origin), Volume(femur.array[:k], femur.spacing, femur.origin)

    with pytest.raises(C.ClinicalInputError, match="patient P1: the field of view cuts the femoral head.*2.5 mm from the scan's superior edge"):
        C.check_field_of_view(*top(23), c, 8.0, 1.0, "patient P1")
    with pytest.raises(C.ClinicalInputError, match="beyond the scan's superior edge"):
        C.check_field_of_view(*top(15), c, 8.0, 1.0, "P1")
    # the shaft leaving through a side face far below the head is cut off anyway; near the head it is not
    cut = femur.array.copy()
    cut[:5, 20:30, 60:] = 1  # reaches the scan's left face at z < 5, 25 mm or more from the head centre
    side_ok = femur.with_array(cut)
    C.check_field_of_view(lr, side_ok, c, 8.0, 1.0, "P1", reach_mm=20.0)
    with pytest.raises(C.ClinicalInputError, match="cuts the femur .*lie on the scan's left face"):
        C.check_field_of_view(lr, side_ok, c, 8.0, 1.0, "P1", reach_mm=40.0)


def test_clinical_grid_spans_the_femur_and_cuts_the_shaft_at_the_reach():
    femur, c = _femur_like()
    lr = femur.with_array(np.zeros(femur.shape, np.float32))
    grid, info = C.clinical_grid(lr, femur, c, 8.0, reach_head_radii=2.5, voxel_mm=0.5, margin_mm=1.5)
    assert grid.spacing == (0.5, 0.5, 0.5) and grid.direction == lr.direction
    lo = np.asarray(grid.origin)
    hi = lo + 0.5 * (np.asarray(grid.shape[::-1]) - 1)
    # kept: femur voxels within 20 mm of the head centre; box: their extent + half a voxel + margin,
    # except below, where the grid starts at the lowest kept voxel (the shaft cut)
    pts = femur.index_to_physical(np.argwhere(femur.array)[:, ::-1].astype(float))
    keep = pts[np.linalg.norm(pts - c, axis=1) <= 20.0]
    assert 4 <= keep[:, 2].min() <= 6 and info["shaft_cut"] and info["reach_mm"] == 20.0
    assert lo[2] == pytest.approx(keep[:, 2].min(), abs=1e-6)
    assert np.allclose(lo[:2], np.maximum(keep[:, :2].min(0) - 2.0, 0.0), atol=1e-6)
    fov = np.asarray(lr.shape[::-1], float) - 1
    assert np.all(hi > np.minimum(keep.max(0) + 2.0, fov) - 0.5)  # the far faces, to a voxel of the grid
    assert np.all(hi <= fov + 1e-6)  # never beyond the field of view
    # no reach (no templates): the femur down to the scan's inferior face, where it leaves the scan
    whole, info = C.clinical_grid(lr, femur, c, 8.0, reach_head_radii=None, voxel_mm=0.5, margin_mm=1.5)
    assert whole.origin[2] == pytest.approx(0.0) and not info["shaft_cut"]


def test_mirrored_sampling_grid_gives_the_flipped_volume():
    rng = np.random.default_rng(1)
    lr = Volume(rng.normal(size=(20, 18, 16)).astype(np.float32), (1.0, 1.1, 0.7), (3.0, -2.0, 5.0))
    grid = Volume(np.broadcast_to(np.float32(0), (12, 10, 9)), (0.5,) * 3, (5.0, 1.0, 7.0))
    ident = sitk.Transform(3, sitk.sitkIdentity)
    plain = resample_onto(lr, grid, ident, interpolator="linear")
    mirrored = resample_onto(lr, C.mirrored_sampling_grid(grid), ident, interpolator="linear")
    assert np.array_equal(mirrored.array, plain.array[:, :, ::-1])


def _template(subject, radius, reach, n=400, seed=0):
    """A head sphere of ``radius`` (labelled head) and one point ``reach`` mm below its centre."""
    rng = np.random.default_rng(seed)
    d = rng.normal(size=(n, 3))
    pts = radius * d / np.linalg.norm(d, axis=1, keepdims=True)
    pts = np.vstack([pts, [[0.0, 0.0, -reach]]])
    labels = np.r_[np.full(n, REGION_IDS["head"], np.uint8), [REGION_IDS["shaft"]]]
    return Template(subject, 10.0, 0.5, "test", PointCloud(pts, pts / np.linalg.norm(pts, axis=1, keepdims=True), labels))


def test_template_reach_in_head_radii():
    reach = P.template_reach([_template("A", 10.0, 50.0), _template("B", 8.0, 48.0), _template("C", 12.0, 54.0)])
    assert [round(p["reach_head_radii"], 6) for p in reach["per_template"]] == [5.0, 6.0, 4.5]
    assert reach["reach_head_radii"] == pytest.approx(5.0)
    assert reach["per_template"][1]["head_radius_mm"] == pytest.approx(8.0)


# ------------------------------------------------------------------ the portable model folder
def _tiny_srgan_params():
    params = load_config()["models"]["srgan"]
    params["network"]["generator"] = {"features": 4, "n_blocks": 1, "n_extra_blocks": 0}
    return params


def _export(tmp_path, templates, train_volume, samples=1):
    from femursr.sr.infer import save_generator
    from femursr.sr.registry import build_model

    torch.manual_seed(0)
    params = _tiny_srgan_params()
    model = build_model("srgan", "2d", 2, params)
    save_generator(model, tmp_path / "generator.pt", name="srgan", dims="2d", neighbours=2, params=params)
    record = {"model": "srgan", "dims": "2d", "neighbours": 0, "in_channels": 1, "steps": 4, "device": "cpu",
              "train_subjects": ["S002"], "validation_subjects": ["S003"], "validation": {"psnr": 21.5, "ssim": 0.61},
              "validation_patches": 2}  # fmt: skip
    (tmp_path / "record.json").write_text(json.dumps(record))
    out = tmp_path / "portable"
    card = P.export_model(
        generator=tmp_path / "generator.pt", record=tmp_path / "record.json", templates=templates, train_volumes=[train_volume],
        out_generator=out / "generator.pt", out_card=out / "model.json", out_templates=out / "templates.npz", method="srgan_2d",
        normalization={"lr_window_hu": [-200, 1800], "hr_window_hu": [-200, 1800]}, evaluation={"roi_edge_vox": 40},
        template_side="left", samples=samples, seed=5, cohort="synthetic",
    )  # fmt: skip
    return model, card, out


def test_portable_model_folder_runs_without_the_training_files(tmp_path):
    from femursr.sr.infer import load_generator

    save_templates([_template("S002", 9.0, 45.0)], tmp_path / "templates.npz")
    train = write_volume(Volume(np.zeros((4, 4, 4), np.uint8), (0.25,) * 3, (0, 0, 0)), tmp_path / "S002_femur.nii.gz")
    model, card, out = _export(tmp_path, tmp_path / "templates.npz", train)
    assert card["voxel_mm"] == 0.25 and card["normalization"]["lr_window_hu"] == [-200.0, 1800.0]
    assert card["templates"]["reach_head_radii"] == pytest.approx(5.0) and card["templates"]["side"] == "left"
    assert card["validation"] == {"psnr": 21.5, "ssim": 0.61} and card["training"]["train_subjects"] == ["S002"]
    # copied to "another machine": the training run's files are gone
    moved = shutil.copytree(out, tmp_path / "elsewhere" / "model")
    shutil.rmtree(out)
    for name in ("generator.pt", "record.json", "templates.npz", "S002_femur.nii.gz"):
        (tmp_path / name).unlink()
    assert P.check_model_folder(moved) == card
    assert P.file_sha256(moved / "generator.pt") == card["generator_sha256"]
    back = load_generator(moved / card["files"]["generator"])
    x = torch.rand(2, 1, 24, 24)
    with torch.no_grad():
        assert torch.allclose(back.predict(x), model.eval().predict(x), atol=1e-6)
    assert len(load_templates(moved / card["files"]["templates"])) == 1
    # what a broken folder says
    (moved / "templates.npz").unlink()
    with pytest.raises(FileNotFoundError, match="templates.npz is missing; copy the whole portable model folder"):
        P.check_model_folder(moved)
    (moved / "model.json").write_text(json.dumps({"format": 99}))
    with pytest.raises(ValueError, match="not a femursr model card of format 1"):
        P.read_card(moved / "model.json")
    with pytest.raises(FileNotFoundError, match="the portable model folder does not exist"):
        P.check_model_folder(tmp_path / "nowhere")


# ------------------------------------------------------------------ a synthetic patient
@pytest.fixture(scope="module")
def patient(small_subject, tmp_path_factory):
    """The small synthetic subject's imported LR, a template from its own truth, and a card."""
    rec, lr_dir, _, truth, cfg = small_subject
    root = tmp_path_factory.mktemp("clinical")
    import_to_file(lr_dir, root / "lr.nii", root / "lr.json", label="S001 LR")
    tpl = build_template("S001", read_volume(truth / "femur_mask.nii.gz"), read_volume(truth / "regions.nii.gz"), 2000, 0, 0.4,
                         "truth", 8.0, 0.5)  # fmt: skip
    save_templates([tpl], root / "templates.npz")
    card = {"format": 1, "method": "srgan_2d", "model": "srgan", "dims": "2d", "samples": 1, "voxel_mm": 0.25,
            "normalization": {"lr_window_hu": [-200.0, 1800.0]}, "files": {"generator": "generator.pt", "templates": "templates.npz"},
            "templates": {"side": "left", "subjects": ["S001"], **P.template_reach([tpl])},
            "training": {"cohort": "synthetic", "train_subjects": ["S001"], "validation_subjects": [], "steps": 0, "device": "cpu"},
            "validation": {}, "validation_patches": 0}  # fmt: skip
    (root / "model.json").write_text(json.dumps(card))
    return {"rec": rec, "truth": truth, "root": root, "card": card, "lr": root / "lr.nii"}


def _prepare(patient, name, lr_path=None, card=None, side=""):
    out = patient["root"] / name
    rec = C.prepare_clinical(lr_path or patient["lr"], out, card=card or patient["card"], threshold={}, resampling=RESAMPLING,
                             options=C.PrepareOptions(), side=side, subject=name)  # fmt: skip
    return rec, out


def _truth_on(grid: Volume, patient) -> np.ndarray:
    """The truth femur mask (HR grid) on a clinical grid, through the true pose."""
    tr = read_volume(patient["truth"] / "femur_mask.nii.gz")
    pose = sitk.ReadTransform(str(patient["truth"] / "pose.tfm"))
    return resample_onto(tr.with_array(tr.array.astype(np.float32)), grid, pose.GetInverse(), interpolator="linear", default_hu=0).array > 0.5


@pytest.fixture(scope="module")
def prepared(patient):
    """Patient P1 (the synthetic subject) prepared with the plain card."""
    return _prepare(patient, "P1")


def _bad_scan(patient, case, name=None):
    """Prepare a broken copy of the patient's scan (see test_bad_scans_give_an_error_record)."""
    lr = read_volume(patient["lr"])
    a = np.array(lr.array)
    side = ""
    if case == "no_femur":
        a[a > 250] = 40.0  # all bone is soft tissue now
        vol = lr.with_array(a)
    elif case == "head_cut":
        k = int(lr.physical_to_index(np.asarray(patient["rec"]["pose"]["head_centre_lr"]))[2] + 3)
        vol = Volume(a[:k], lr.spacing, lr.origin, lr.direction)  # the scan ends 2 mm above the head centre
    elif case == "side_unknown":
        vol = Volume(a, lr.spacing, lr.origin, (0, -1, 0, 1, 0, 0, 0, 0, 1))  # lateral is now posterior
    else:
        vol, side = lr, "right"
    name = name or case
    path = write_volume(vol, patient["root"] / f"{name}.nii")
    return _prepare(patient, name, lr_path=path, side=side)


def test_prepare_a_synthetic_patient_without_its_hr(patient, prepared):
    rec, out = prepared
    assert rec["status"] == "ok", rec["error"]
    assert rec["side"]["side"] == "left" and rec["side"]["source"] == "anatomy" and not rec["side"]["mirrored"]
    lr, femur = read_volume(out / C.PREPARED_LR), read_volume(out / C.PREPARED_FEMUR)
    assert lr.same_grid(femur) and lr.spacing == (0.25, 0.25, 0.25)
    truth = patient["rec"]
    head = np.asarray(truth["pose"]["head_centre_lr"])
    assert np.linalg.norm(np.asarray(rec["native"]["head_centre_mm"]) - head) < 1.0  # mm, on the native LR
    assert abs(rec["native"]["head_radius_mm"] - truth["head_radius_mm"]) < 1.0
    m = np.asarray(femur.array) > 0
    a = np.asarray(lr.array)
    assert a.min() >= 0 and a.max() <= 1 and not a[~m].any()
    # the femur mask against the truth, above the grid's shaft cut (the specimen's own cut lies elsewhere)
    t = _truth_on(femur, patient)
    z0 = int(np.flatnonzero(t.any(axis=(1, 2)))[0]) + 4
    assert dice(m[z0:], t[z0:]) > 0.85
    assert (out / C.STATUS).is_file() and not (out / "lr_hu.nii").exists()


def test_prepare_mirrors_a_femur_of_the_templates_other_side(patient, prepared):
    card = json.loads(json.dumps(patient["card"]))
    card["templates"]["side"] = "right"
    rec, out = _prepare(patient, "P1m", card=card)
    plain = read_volume(prepared[1] / C.PREPARED_FEMUR)
    mirrored = read_volume(out / C.PREPARED_FEMUR)
    assert rec["side"]["mirrored"] and mirrored.same_grid(plain)
    assert dice(mirrored.array[:, :, ::-1], plain.array) > 0.98


@pytest.mark.parametrize(
    "case, message",
    [
        ("no_femur", "no femur found in the clinical CT"),
        ("head_cut", "the field of view cuts the femoral head"),
        ("side_unknown", "left/right unknown"),
        ("side_contradicts", "the subjects sheet says side right, but the anatomy shows a left femur"),
    ],
)
def test_bad_scans_give_an_error_record(patient, case, message):
    rec, out = _bad_scan(patient, case)
    assert rec["status"] == "error" and rec["error"].startswith(f"patient {case}: ") and message in rec["error"]
    assert sorted(p.name for p in out.iterdir()) == [C.STATUS]
    assert C.read_status(out)["error"] == rec["error"]


# ------------------------------------------------------------------ SR, spread across samples, pages
class NoisyIdentity(SRModel):
    """A stochastic stand-in: the LR plus Gaussian noise of SD 0.15."""

    name = "noisy"
    stochastic = True

    def __init__(self, in_channels=1, params=None, perceptual_weights=None):
        super().__init__(in_channels)
        self.scale = nn.Parameter(torch.tensor(1.0))

    @torch.no_grad()
    def predict(self, lr):
        return self.scale * lr[:, :1] + 0.15 * torch.randn_like(lr[:, :1])


def _build_noisy(name, dims, neighbours, params, perceptual_weights=None):
    return NoisyIdentity()


def test_sampled_model_metrics_carry_the_spread_across_samples(patient, prepared):
    from femursr.sr.infer import save_generator

    root = patient["root"]
    save_generator(NoisyIdentity(), root / "noisy.pt", name="noisy", dims="2d", neighbours=0, params={})
    card = {**patient["card"], "samples": 3, "method": "noisy_2d"}
    (root / "noisy.json").write_text(json.dumps(card))
    prepared = prepared[1]
    timing = C.super_resolve(prepared, root / "noisy.pt", root / "sr.nii.gz", root / "sr.json", root / "samples", samples=3, seed=4,
                             device="cpu", batch_slices=64, subject="P1", build=_build_noisy)  # fmt: skip
    samples = C.sample_files(root / "samples")
    assert len(samples) == 3 and timing["samples"] == 3 and (root / "samples" / "std.nii.gz").is_file()
    stack = np.stack([read_volume(p).array for p in samples])
    assert np.allclose(read_volume(root / "sr.nii.gz").array, stack.mean(0), atol=1e-6)
    assert not np.array_equal(stack[0], stack[1])  # seeds 4, 5, 6
    opts = C.EvaluationOptions.from_config({**load_config()["evaluation"], "roi_edge_vox": 24, "template_points": 2000})
    rec = C.finish_patient(subject="P1", prepared_dir=prepared, card_path=root / "noisy.json", templates=root / "templates.npz",
                           sr=root / "sr.nii.gz", timing=root / "sr.json", samples_dir=root / "samples", options=opts, seed=1,
                           out_metrics=root / "m.csv", out_record=root / "r.json", out_pdf=root / "s.pdf", out_png=root / "s.png")  # fmt: skip
    assert rec["status"] == "ok"
    table = pd.read_csv(root / "m.csv")
    assert set(table.region) == {"head", "neck", "trochanter"} and len(table) == 12 and (table.samples == 3).all()
    # the spread is that of the per-sample values measured in the same ROIs
    for _, row in table.iterrows():
        per = [s[row.region][row.metric] for s in rec["evaluation"]["per_sample"]]
        assert row.sample_sd == pytest.approx(np.std(per, ddof=1), rel=1e-4)
        assert row.sample_min == pytest.approx(min(per), rel=1e-4) and row.sample_max == pytest.approx(max(per), rel=1e-4)
    assert (table[table.metric == "bv_tv"].sample_sd > 0).all()
    assert (root / "s.pdf").stat().st_size > 10_000 and (root / "s.png").stat().st_size > 10_000


def test_a_patient_without_metrics_gets_an_error_record_and_page(patient):
    root = patient["root"]
    _, prepared_dir = _bad_scan(patient, "no_femur", name="P9")
    out = root / "P9_done"
    rec = C.finish_patient(subject="P9", prepared_dir=prepared_dir, card_path=root / "model.json",
                           options=C.EvaluationOptions.from_config(load_config()["evaluation"]), seed=1, out_metrics=out / "metrics.csv",
                           out_record=out / "record.json", out_pdf=out / "summary.pdf", out_png=out / "summary.png")  # fmt: skip
    table = pd.read_csv(out / "metrics.csv")
    assert len(table) == 1 and table.status[0] == "error" and "no femur found" in table.error[0]
    assert rec["status"] == "error" and json.loads((out / "record.json").read_text())["error"] == table.error[0]
    assert (out / "summary.png").stat().st_size > 5_000


# ------------------------------------------------------------------ the DAG and the config
def test_demo_routes_its_clinical_only_patients_through_the_clinical_branch_only(tmp_path):
    res = run_snakemake(["-n", "--configfile", str(REPO / "config" / "config.yaml")], tmp_path)
    out = res.stdout
    jobs = {p[0]: int(p[1]) for p in (line.split() for line in out.splitlines()) if len(p) == 2 and p[1].isdigit()}
    cfg = load_config()
    n, k = cfg["synthetic"]["n_subjects"], cfg["synthetic"]["n_clinical"]
    assert k >= 2 and jobs["synthesize_subject"] == n + k and jobs["clinical_prepare"] == k and jobs["clinical_table"] == 1
    assert jobs["clinical_export_model"] == len(cfg["training"]["models"]) * len(cfg["training"]["dims"])
    assert jobs["import_scan"] == 2 * n + k and jobs["register"] == n  # no HR import, no registration
    clinical = [f"S{i:03d}" for i in range(n + 1, n + k + 1)]
    for s in clinical:
        assert f"results/clinical/{s}/metrics.csv" in out and f"results/imported/{s}/lr.nii" in out
        # no paired stage, no SR training input, no paired evaluation touches them
        assert not re.search(rf"results/(prepared|registration|masks|sr|morphometry|evaluation|quality)/\S*{s}\b", out)
        assert f"results/imported/{s}/hr.nii" not in out
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize(
    "clinical, message",
    [
        ({"model": "srgan_3d"}, "config clinical.model: 'srgan_3d' is not a trained model of this workflow; choose one of srgan_2d"),
        ({"subjects": ["S099"]}, "config clinical.subjects: S099 is not a subject with both scans"),
        ({"model_dir": "no/such/folder"}, "config clinical.model_dir: no/such/folder: the portable model folder does not exist"),
        ({"model": "srgan_2d", "model_dir": "x"}, "give model (a {model}_{dims} trained by this workflow) or model_dir"),
    ],
)
def test_clinical_config_errors_stop_before_any_job(tmp_path, clinical, message):
    cfg = small_synthetic(n_subjects=3)
    cfg["training"]["models"] = ["srgan"]
    cfg["clinical"] = clinical
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = run_snakemake(["-n", "--configfile", str(path)], tmp_path, check=False)
    assert res.returncode != 0 and message in res.stdout + res.stderr


# ------------------------------------------------------------------ through snakemake (slow)
def _paired_metrics(tmp, method, subject):
    t = pd.read_csv(tmp / "results" / "morphometry" / method / f"{subject}.tsv", sep="\t")
    return t.set_index(["region", "metric"])["value"]


@pytest.mark.slow
def test_clinical_branch_against_the_paired_evaluation_of_the_same_subject(tmp_path):
    """Three subjects with both scans train srgan 2D (one step per phase); the test subject is also
    run through the clinical branch with its HR dropped, and one more synthetic subject is
    clinical-only. For the test subject the clinical metrics must equal the paired evaluation's
    up to what the ROI placement explains: the paired SR volume measured in the clinical ROIs
    (mapped into the HR frame by the registration) must match the clinical metrics (the residual,
    from the grid the SR ran on: the LR's axes and box instead of the HR's).

    Figures of the last run (0.3 mm voxels, 8.1 mm ROIs): the clinical ROI centres lie 0.23 (head),
    0.53 (neck) and 0.52 mm (trochanter) from the paired ones; clinical minus paired BV/TV 0.006,
    0.011, 0.0001, Tb.Th 0.013, 0.009, 0.000 mm, Tb.Sp 0.015, 0.265, 0.194 mm; the placement alone
    changes the paired Tb.Sp by 0.006, 0.266, 0.214 mm; residuals at most 0.006 (BV/TV) and
    0.023 mm (Tb.Th, Tb.Sp)."""
    from femursr.roimetrics import roi_morphometry
    from femursr.rois import roi_boxes
    from femursr.split import split_subjects

    cfg = small_synthetic(n_subjects=3, scale=0.45, voxel=0.3)
    cfg["synthetic"]["n_clinical"] = 1
    cfg["training"].update(models=["srgan"], dims=["2d"], samples_per_epoch=2, batch_size=2, validation_patches=2, device="cpu")
    cfg["models"]["srgan"]["pretrain"]["epochs"] = 1
    cfg["models"]["srgan"]["gan"]["epochs"] = 1
    cfg["evaluation"].update(n_templates=1, template_points=3000, roi_edge_vox=27)  # 8 mm ROIs
    (test,) = split_subjects(["S001", "S002", "S003"], cfg["split"], cfg["seed"]).part("test")
    cfg["clinical"] = {"model": "srgan_2d", "subjects": [test]}
    cfgfile = tmp_path / "config.yaml"
    cfgfile.write_text(yaml.safe_dump(cfg))
    targets = ["results/clinical/metrics.tsv", f"results/morphometry/srgan_2d/{test}.tsv", f"results/registration/{test}/lr_to_hr.tfm"]
    run_snakemake(["-c2", *targets, "--configfile", str(cfgfile)], tmp_path, timeout=3000)
    res = tmp_path / "results"
    table = pd.read_csv(res / "clinical" / "metrics.tsv", sep="\t")
    assert set(table.subject) == {"S004", test} and (table.status == "ok").all(), table.error.dropna().tolist()
    assert not (res / "imported" / "S004" / "hr.nii").exists()  # the clinical-only patient's HR is never used
    assert (res / "models" / "srgan_2d" / "portable" / "model.json").is_file()
    for s in ("S004", test):
        assert (res / "clinical" / s / "summary.pdf").stat().st_size > 10_000
    # the same subject, both ways
    clin = table[table.subject == test].set_index(["region", "metric"])["value"]
    paired = _paired_metrics(tmp_path, "srgan_2d", test)
    rec = json.loads((res / "clinical" / test / "record.json").read_text())
    tfm = sitk.ReadTransform(str(res / "registration" / test / "lr_to_hr.tfm"))  # HR point -> LR point
    inv = tfm.GetInverse()
    centres = {r["region"]: np.asarray(inv.TransformPoint([float(v) for v in r["centre_mm"]])) for r in rec["evaluation"]["rois"]}
    paired_rois = json.loads((res / "evaluation" / "rois" / "srgan_2d" / f"{test}.json").read_text())
    femur = read_volume(res / "masks" / test / "femur.nii.gz")
    bone = read_volume(res / "evaluation" / "bone" / "srgan_2d" / f"{test}.nii.gz")
    ev = cfg["evaluation"]
    moved = {r.region: roi_morphometry(bone, femur, r, ev["context_mm"]) for r in roi_boxes(centres, femur, ev["roi_edge_vox"])}
    figures = []
    for r in paired_rois["rois"]:
        shift = float(np.linalg.norm(centres[r["region"]] - np.asarray(r["centre_mm"])))
        for metric in ("bv_tv", "tb_th_mm", "tb_sp_mm"):
            c, p, m = clin[(r["region"], metric)], paired[(r["region"], metric)], getattr(moved[r["region"]], metric)
            figures.append((r["region"], metric, shift, abs(c - p), abs(m - p), abs(c - m)))
    df = pd.DataFrame(figures, columns=["region", "metric", "shift_mm", "clinical_vs_paired", "placement_effect", "residual"])
    print("\n" + df.to_string())
    # the ROI centres of the two branches agree to a few voxels (both come from the same template)
    assert df.shift_mm.max() < 1.5
    # once the ROIs sit in the same place, what is left comes from the grid the SR ran on: BV/TV to
    # 0.02, thickness and spacing to a fifth of a voxel; the rest of any difference is the placement
    assert (df[df.metric == "bv_tv"].residual < 0.02).all()
    assert (df[df.metric != "bv_tv"].residual < 0.06).all()  # mm


@pytest.mark.slow
def test_bad_patients_get_error_records_and_the_others_their_metrics(patient, tmp_path):
    """A sheet of clinical-only patients and a portable model folder (a machine without training
    data): a good scan, a scan without a femur, one whose field of view cuts the head, and one whose
    side cannot be told. The default run finishes; the three bad ones get error records."""
    from femursr.dicomio import write_ct_series

    save_templates(load_templates(patient["root"] / "templates.npz"), tmp_path / "templates.npz")
    train = write_volume(Volume(np.zeros((4, 4, 4), np.uint8), (0.25,) * 3, (0, 0, 0)), tmp_path / "t.nii.gz")
    _, card, folder = _export(tmp_path, tmp_path / "templates.npz", train)
    lr = read_volume(patient["lr"])
    a = np.array(lr.array)
    k = int(lr.physical_to_index(np.asarray(patient["rec"]["pose"]["head_centre_lr"]))[2] + 3)
    no_bone = np.where(a > 250, 40.0, a)
    scans = {"P1": (a, np.eye(3)), "P2": (no_bone, np.eye(3)), "P3": (a[:k], np.eye(3)),
             "P4": (a, np.array([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]]))}  # fmt: skip
    rows = ["subject\tlr\thr"]
    for s, (arr, d) in scans.items():
        write_ct_series(arr, lr.spacing, lr.origin, d, tmp_path / s, patient_id=s, series_description="clinical CT", uid_key=s)
        rows.append(f"{s}\t{tmp_path / s}\t")
    (tmp_path / "subjects.tsv").write_text("\n".join(rows) + "\n")
    cfg = load_config(cohort="sheet", subjects=str(tmp_path / "subjects.tsv"))
    cfg["training"]["models"] = []
    cfg["training"]["device"] = "cpu"
    cfg["evaluation"].update(roi_edge_vox=24, template_points=2000)
    cfg["clinical"] = {"model": None, "model_dir": str(folder)}
    cfgfile = tmp_path / "config.yaml"
    cfgfile.write_text(yaml.safe_dump(cfg))
    run_snakemake(["-c2", "--configfile", str(cfgfile)], tmp_path, timeout=1800)
    table = pd.read_csv(tmp_path / "results" / "clinical" / "metrics.tsv", sep="\t").set_index("subject")
    assert (table.loc["P1", "status"] == "ok").all() and len(table.loc["P1"]) == 12
    for s, msg in (("P2", "no femur found"), ("P3", "cuts the femoral head"), ("P4", "left/right unknown")):
        assert table.loc[s, "status"] == "error" and msg in table.loc[s, "error"]
        assert (tmp_path / "results" / "clinical" / s / "summary.png").is_file()
    assert json.loads((tmp_path / "results" / "clinical" / "P1" / "record.json").read_text())["model"]["method"] == "srgan_2d"
