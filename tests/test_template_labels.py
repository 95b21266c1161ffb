"""Automatic geometric labelling of template femur masks (issue 6, item 2; femursr.labelling).

Known answers: phantom femurs (femursr.geometry) whose regions are analytic, rendered in other
poses, mirrored into right femora, cut at the array's face, and the threshold backend's femur
mask of a synthetic subject. A mask with no femoral head is refused, naming the subject and the
file. The rule scripts and the workflow wiring (template_labels: auto) end to end."""

import json
import re
import runpy

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from conftest import REPO, femur_phantom as phantom, femur_shape, small_synthetic
from femursr.geometry import REGION_NAMES, rotation_matrix
from femursr.labelling import LabellingError, label_femur
from femursr.pointcloud import Similarity, mask_points, region_centres
from femursr.rois import ROI_REGIONS
from femursr.templates import label_points
from femursr.volume import Volume, read_volume, write_volume
from femursr.workflow import mock_snakemake

SCRIPTS = REPO / "workflow_scripts"
FLOORS = {"head": 0.95, "neck": 0.9, "trochanter": 0.95, "shaft": 0.9}  # Dice against the truth


def dice_per_region(labels: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    return {
        name: float(2 * np.count_nonzero((labels == k) & (truth == k)) / (np.count_nonzero(labels == k) + np.count_nonzero(truth == k)))
        for k, name in REGION_NAMES.items()
    }


def roi_centre_distances(mask: Volume, auto: Volume, truth: Volume) -> dict[str, float]:
    """Distance (mm) between the ROI centres (means of the labelled surface points, as rule
    place_rois takes them) from the automatic labels and from the truth labels."""
    cloud = mask_points(mask, 5000, seed=0)
    got = region_centres(cloud.points, label_points(cloud.points, auto), ROI_REGIONS)
    want = region_centres(cloud.points, label_points(cloud.points, truth), ROI_REGIONS)
    return {name: float(np.linalg.norm(got[name] - want[name])) for name in ROI_REGIONS.values()}


def _check_against_truth(shape, pose, mask, truth, labels, geom, tag):
    dice = dice_per_region(labels.array, truth.array)
    rois = roi_centre_distances(mask, labels, truth)
    head_err = float(np.linalg.norm(np.asarray(geom.head_centre_mm) - pose.apply(shape.head_center[None])[0]))
    lt_err = float((np.asarray(geom.lesser_trochanter_mm) - pose.apply(np.array([[0.0, 0.0, shape.lt_bottom]]))[0]) @ geom.shaft_axis)
    print(f"{tag}: Dice", {k: round(v, 3) for k, v in dice.items()}, "ROI centres (mm)", {k: round(v, 2) for k, v in rois.items()},
          f"head centre {head_err:.2f} mm, radius {geom.head_radius_mm - shape.head_radius:+.2f} mm, "
          f"neck-shaft angle {geom.neck_shaft_angle_deg - shape.neck_shaft_angle_deg:+.2f} deg, lesser trochanter {lt_err:+.2f} mm")  # fmt: skip
    for name, floor in FLOORS.items():
        assert dice[name] > floor, (name, dice[name])
    assert all(d < 1.0 for d in rois.values()), rois
    assert head_err < 0.5
    assert abs(geom.head_radius_mm - shape.head_radius) < 0.3
    assert abs(geom.neck_shaft_angle_deg - shape.neck_shaft_angle_deg) < 2.0
    assert abs(lt_err) < 1.0
    return dice


# --------------------------------------------------------------------------- phantom femurs
CASES = {
    "left, femur frame": (femur_shape(130, 12, 1.0), 0.5, Similarity(), False),
    "left, turned 35 deg, 0.4 mm": (
        femur_shape(124, 20, 0.9), 0.4,
        Similarity(1.0, rotation_matrix([0.3, 1.0, -0.4], np.deg2rad(35)), np.array([10.0, -5.0, 30.0])), False,
    ),
    "left, cut at the array face": (
        femur_shape(137, 6, 1.15), 0.5, Similarity(1.0, rotation_matrix([0, 0, 1], np.deg2rad(70)), np.array([-4.0, 3.0, 0.0])), True,
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_automatic_labels_agree_with_the_phantom_regions(case):
    shape, vox, pose, at_face = CASES[case]
    mask, truth = phantom(shape, vox, pose, at_face)
    labels, geom = label_femur(mask, where=case)
    assert labels.same_grid(mask) and labels.array.dtype == np.uint8
    assert np.array_equal(labels.array > 0, mask.array > 0)  # every femur voxel, nothing else
    _check_against_truth(shape, pose, mask, truth, labels, geom, case)
    assert geom.head_coverage > 0.8


def test_mirrored_femur_gets_mirrored_labels():
    """A right femur (the left one mirrored through the grid's x axis) is labelled as the mirror
    image of the left one's labels, and as well against its (mirrored) truth."""
    shape = femur_shape(128, 15, 1.0)
    pose = Similarity(1.0, rotation_matrix([0.2, 0.1, 1.0], np.deg2rad(-25)), np.zeros(3))
    mask, truth = phantom(shape, 0.5, pose)
    left, g_left = label_femur(mask, where="left")
    flip = (slice(None), slice(None), slice(None, None, -1))
    right_mask = mask.with_array(mask.array[flip].copy())
    right, g_right = label_femur(right_mask, where="right")
    femur = right_mask.array > 0
    agree = float(np.mean(right.array[femur] == left.array[flip][femur]))
    dice = dice_per_region(right.array, truth.array[flip])
    print(f"mirrored: labels agree with the mirrored labels on {100 * agree:.2f} % of voxels; Dice", {k: round(v, 3) for k, v in dice.items()})
    assert agree > 0.995
    for name, floor in FLOORS.items():
        assert dice[name] > floor, (name, dice[name])
    # the head centre is mirrored: x -> 2 x0 + (nx - 1) dx - x on this axis-aligned grid
    mirror_x = 2 * mask.origin[0] + (mask.shape[2] - 1) * mask.spacing[0]
    want = np.array(g_left.head_centre_mm) * [-1, 1, 1] + [mirror_x, 0, 0]
    assert np.linalg.norm(np.array(g_right.head_centre_mm) - want) < 0.1
    assert abs(g_right.neck_shaft_angle_deg - g_left.neck_shaft_angle_deg) < 0.5


def test_threshold_backend_mask_of_a_synthetic_subject():
    """The workflow labels the femur masks of rule femur_mask (threshold backend, from the clinical
    CT on the HR grid): smoother than the phantom, pelvis removed, reaching the box's inferior
    face. The labels agree with the subject's truth regions above the saw cut."""
    from femursr import phantom as ph
    from femursr.masks import threshold_femur_mask

    cfg = small_synthetic(scale=0.35, voxel=0.25)
    syn = cfg["synthetic"]
    subj = ph.draw_subject(syn, cfg["seed"], 1, "S001")
    rng = ph.subject_rng(cfg["seed"], 10_000 + 1)
    hr, _, regions = ph.render_hr(subj, syn, rng)
    lo = np.asarray(hr.origin)
    hi = lo + (np.asarray(hr.shape[::-1]) - 1) * np.asarray(hr.spacing)
    lr, _, _ = ph.render_lr(subj, syn, rng, (lo, hi))
    on_grid = sitk.Resample(lr.to_sitk(), hr.to_sitk(), ph.pose_transform(subj), sitk.sitkBSpline, -1000.0, sitk.sitkFloat32)
    mask, _ = threshold_femur_mask(Volume.from_sitk(on_grid), label="S001")
    labels, geom = label_femur(mask, where="S001")
    z = hr.origin[2] + np.arange(hr.shape[0]) * hr.spacing[2]
    above_cut = (z > subj.z_cut)[:, None, None]
    dice = dice_per_region(labels.array * above_cut, regions.array)
    head_err = float(np.linalg.norm(np.asarray(geom.head_centre_mm) - subj.shape.head_center))  # HR frame = femur frame
    print("threshold mask: Dice above the cut", {k: round(v, 3) for k, v in dice.items()}, f"head centre {head_err:.2f} mm, "
          f"neck-shaft angle {geom.neck_shaft_angle_deg - subj.shape.neck_shaft_angle_deg:+.2f} deg")  # fmt: skip
    # the mask itself has Dice ~0.95 against the truth femur: lower floors than on the phantom
    for name, floor in {"head": 0.93, "neck": 0.88, "trochanter": 0.9, "shaft": 0.85}.items():
        assert dice[name] > floor, (name, dice[name])
    assert head_err < 0.6
    assert abs(geom.neck_shaft_angle_deg - subj.shape.neck_shaft_angle_deg) < 2.5


# --------------------------------------------------------------------------- refusals
def _cylinder(vox=0.5):
    g = np.mgrid[0:110, 0:36, 0:36]
    arr = ((g[1] - 17.5) ** 2 + (g[2] - 17.5) ** 2 < 14**2) & (g[0] > 4) & (g[0] < 105)
    return Volume(arr.astype(np.uint8), (vox,) * 3, (0.0, 0.0, 0.0))


def _run(script, **kw):
    runpy.run_path(str(SCRIPTS / script), init_globals={"snakemake": mock_snakemake(**kw)}, run_name="__main__")


def test_mask_without_a_head_is_refused_naming_subject_and_file(tmp_path):
    path = tmp_path / "masks" / "P07" / "femur.nii.gz"
    path.parent.mkdir(parents=True)
    write_volume(_cylinder(), path)
    out = tmp_path / "templates"
    with pytest.raises(LabellingError, match=rf"template P07: {re.escape(str(path))}: no femoral head found.*min_head_coverage"):
        _run("label_template.py", input={"mask": str(path)}, params={"options": {}}, wildcards={"subject": "P07"}, log=[None],
             output={"labels": str(out / "labels_P07.nii.gz"), "geometry": str(out / "labels_P07.json"), "png": str(out / "labels_P07.png")})  # fmt: skip
    assert not out.exists() or not any(out.iterdir())


def test_a_sphere_alone_has_no_shaft():
    g = np.mgrid[0:50, 0:50, 0:50]
    ball = Volume((((g - 24.5) ** 2).sum(0) < 20**2).astype(np.uint8), (0.5,) * 3, (0.0, 0.0, 0.0))
    with pytest.raises(LabellingError, match="ball.nii.gz: no shaft found"):
        label_femur(ball, where="template P08: ball.nii.gz")


# --------------------------------------------------------------------------- rule scripts and workflow
def test_rule_scripts_label_a_template_and_build_it(tmp_path):
    """template_labels (the rule script) writes the label map on the mask's grid, the geometry and
    the QC figure; templates builds the labelled cloud from it, close to the truth-labelled one."""
    from femursr.templates import build_template, load_templates

    shape = femur_shape(127, 16, 1.05)
    pose = Similarity(1.0, rotation_matrix([0.2, 1.0, 0.3], np.deg2rad(30)), np.array([40.0, -20.0, 10.0]))
    mask, truth = phantom(shape, 0.5, pose)
    masks = tmp_path / "masks"
    masks.mkdir()
    write_volume(mask, masks / "P01.nii.gz")
    out = tmp_path / "templates"
    outputs = {"labels": str(out / "labels_P01.nii.gz"), "geometry": str(out / "labels_P01.json"), "png": str(out / "labels_P01.png")}
    _run("label_template.py", input={"mask": str(masks / "P01.nii.gz")}, output=outputs, params={"options": {"work_mm": 0.5}},
         wildcards={"subject": "P01"}, log=[str(tmp_path / "labels.log")])  # fmt: skip
    labels = read_volume(outputs["labels"])
    assert labels.same_grid(mask) and set(np.unique(labels.array)) == {0, 1, 2, 3, 4}
    geom = json.loads((out / "labels_P01.json").read_text())
    assert abs(geom["neck_shaft_angle_deg"] - 127) < 2 and geom["params"]["work_mm"] == 0.5
    assert (out / "labels_P01.png").stat().st_size > 20_000

    sel = tmp_path / "selection.tsv"
    pd.DataFrame({"subject": ["P01"], "bone_ml": [4.0], "quantile": [0.5], "bone_ml_at_quantile": [4.0]}).to_csv(sel, sep="\t", index=False)
    _run("build_templates.py", input={"selection": str(sel), "masks": [str(masks / "P01.nii.gz")], "labels": [outputs["labels"]]},
         output={"templates": str(tmp_path / "t.npz"), "png": str(tmp_path / "t.png")},
         params={"subjects": ["P01"], "label_maps": {"P01": outputs["labels"]}, "auto_labels": True, "points": 3000,
                 "surface_voxel_mm": 0.0, "seed": 0}, log=[None])  # fmt: skip
    (template,) = load_templates(tmp_path / "t.npz")
    assert template.label_source.startswith("automatic (")
    reference = build_template("P01", mask, truth, 3000, 0, 0.0, "truth", 4.0, 0.5)
    same = float(np.mean(template.cloud.labels == reference.cloud.labels))
    print(f"template cloud: {100 * same:.1f} % of the points carry the truth's label")
    assert same > 0.95


def _dry_run(tmp_path, cfg, *targets):
    import yaml

    from conftest import run_snakemake

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return run_snakemake(["-n", *targets, "--configfile", str(path)], tmp_path, check=False)


def test_workflow_labels_the_templates_automatically_when_asked(tmp_path):
    from conftest import load_config

    cfg = load_config()
    cfg["evaluation"]["template_labels"] = "auto"
    res = _dry_run(tmp_path, cfg)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "checkpoint" in res.stdout and any(line.split()[:2] == ["templates", "1"] for line in res.stdout.splitlines())
    res = _dry_run(tmp_path, cfg, "results/evaluation/templates/labels_S002.png")
    assert res.returncode == 0, res.stderr[-3000:]
    assert any(line.split()[:2] == ["template_labels", "1"] for line in res.stdout.splitlines())

    cfg["evaluation"]["auto_labelling"] = {"head_radius": 3}
    res = _dry_run(tmp_path, cfg)
    assert res.returncode != 0
    assert "config evaluation.auto_labelling: unknown key 'head_radius'" in res.stdout + res.stderr


def test_cohort_sheet_without_label_maps_labels_automatically(tmp_path):
    """With a cohort sheet, templates without label maps are labelled automatically (the DAG
    resolves where it used to stop); label maps given for some templates must cover them all."""
    from conftest import load_config

    rows = ["subject\tlr\thr"]
    for k in range(1, 7):
        for scan in ("lr", "hr"):
            (tmp_path / f"P0{k}" / scan).mkdir(parents=True)
        rows.append(f"P0{k}\t{tmp_path / f'P0{k}' / 'lr'}\t{tmp_path / f'P0{k}' / 'hr'}")
    (tmp_path / "subjects.tsv").write_text("\n".join(rows) + "\n")
    cfg = load_config(cohort="sheet", subjects=str(tmp_path / "subjects.tsv"))
    cfg["training"]["models"] = []
    if "clinical" in cfg:
        cfg["clinical"]["model"] = None  # no SR model is trained here
    cfg["evaluation"]["template_subjects"] = ["P01", "P02"]
    res = _dry_run(tmp_path, cfg)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert any(line.split()[:2] == ["templates", "1"] for line in res.stdout.splitlines())
    cfg["evaluation"]["template_labels"] = {"P01": "labels/P01.nrrd"}
    res = _dry_run(tmp_path, cfg)
    assert res.returncode != 0
    assert "P02 has no region label map in evaluation.template_labels" in res.stdout + res.stderr
    assert "or set template_labels to auto" in res.stdout + res.stderr
