"""ROI evaluation (issue 6, items 1 to 3): bone masks, surface point clouds and their similarity
matching, label transfer, templates, ROI boxes and their morphometry, and the rule scripts end to
end on a small synthetic subject. Inputs whose answers are known: a similarity we applied
ourselves, analytic region labels of the phantom femur, plates of known thickness."""

import json
import runpy

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage as ndi

from conftest import REPO, femur_phantom as render, femur_shape
from femursr.bonemask import BoneThreshold, bone_outline, threshold_bone_mask, volume_ml
from femursr.geometry import REGION_IDS, FemurShape, rotation_matrix
from femursr.pointcloud import (
    MatchParams,
    PointCloud,
    Similarity,
    mask_points,
    match,
    region_centres,
    rotation_error_deg,
    transfer_labels,
)
from femursr.roimetrics import roi_morphometry
from femursr.rois import ROI_REGIONS, roi_boxes, truth_centre_errors
from femursr.templates import Template, build_template, label_points, nearest_template, select_templates
from femursr.volume import Volume
from femursr.workflow import mock_snakemake

SCRIPTS = REPO / "workflow_scripts"


def analytic_labels(shape: FemurShape, points_femur_frame: np.ndarray) -> np.ndarray:
    out = np.zeros(len(points_femur_frame), np.uint8)
    for name, m in shape.region_masks(points_femur_frame).items():
        out[m] = REGION_IDS[name]
    return out


# --------------------------------------------------------------------------- similarity matching
KNOWN = Similarity(1.17, rotation_matrix([0.3, -0.8, 0.5], np.deg2rad(140.0)), np.array([25.0, -12.0, 40.0]))


@pytest.fixture(scope="module")
def known_case():
    """A template cloud (femur frame) and a subject cloud: another sampling of the same surface,
    moved by KNOWN; and the analytic labels of both."""
    shape = femur_shape()
    mask, _ = render(shape, 0.5)
    template = mask_points(mask, 10_000, seed=1)
    template.labels = analytic_labels(shape, template.points)
    other = mask_points(mask, 10_000, seed=2)
    subject = PointCloud(KNOWN.apply(other.points), other.normals @ KNOWN.rotation.T)
    result = match(template, subject, MatchParams(seed=3, ransac_runs=1))
    return shape, template, subject, analytic_labels(shape, other.points), result


def test_matching_recovers_a_known_similarity(known_case):
    _, _, _, _, result = known_case
    t = result.transform
    scale_err = abs(t.scale / KNOWN.scale - 1)
    rot_err = rotation_error_deg(t.rotation, KNOWN.rotation)
    trans_err = float(np.linalg.norm(t.translation - KNOWN.translation))
    print(f"similarity recovery: scale {scale_err:.1e} (relative), rotation {rot_err:.3f} deg, translation {trans_err:.3f} mm")
    assert scale_err < 1e-3
    assert rot_err < 0.3
    assert trans_err < 0.2
    assert result.fitness > 0.5


def test_labels_transfer_onto_the_moved_femur(known_case):
    shape, template, subject, truth, result = known_case
    labels = transfer_labels(result.transform.apply(template.points), template.labels, subject.points)
    assert np.mean(labels == truth) > 0.98
    got = region_centres(subject.points, labels, ROI_REGIONS)
    want = region_centres(subject.points, truth, ROI_REGIONS)
    for name in ROI_REGIONS.values():
        assert np.linalg.norm(got[name] - want[name]) < 0.2, name


def test_similarity_algebra():
    a = Similarity(1.3, rotation_matrix([1, 2, 3], 0.7), np.array([1.0, -2.0, 3.0]))
    p = np.random.default_rng(0).normal(size=(5, 3))
    assert np.allclose(a.inverse().apply(a.apply(p)), p)
    assert np.allclose(Similarity.from_matrix(a.matrix()).apply(p), a.apply(p))
    b = Similarity(0.8, rotation_matrix([0, 0, 1], 1.0), np.zeros(3))
    assert np.allclose(a.compose(b).apply(p), a.apply(b.apply(p)))


# --------------------------------------------------------------------------- templates and labels
def test_template_selection_takes_subjects_at_uniform_quantiles():
    ml = {f"S{i:02d}": float(i) for i in range(1, 13)}  # 1 .. 12 mL
    chosen = select_templates(ml, 3)
    # quantiles 1/6, 1/2, 5/6 of 1..12 are 2.83, 6.5, 10.17 mL
    assert [c[0] for c in chosen] == ["S03", "S06", "S10"]
    assert [round(c[1], 3) for c in chosen] == [0.167, 0.5, 0.833]
    with pytest.raises(ValueError, match="only 2 training subject"):
        select_templates({"A": 1.0, "B": 2.0}, 3)
    templates = [Template(s, v, 0.0, "x", None) for s, v in (("A", 10.0), ("B", 14.0), ("C", 17.0))]
    assert nearest_template(12.1, templates) == 1


def test_label_points_reads_the_truth_label_map():
    shape = femur_shape(nsa=126)
    pose = Similarity(1.0, rotation_matrix([1, 1, 0], 0.4), np.array([5.0, 0, 0]))
    mask, regions = render(shape, 0.5, pose)
    cloud = mask_points(mask, 5000, seed=0)
    got = label_points(cloud.points, regions)
    truth = analytic_labels(shape, pose.inverse().apply(cloud.points))
    assert np.mean(got == truth) > 0.97
    # ROI centres from the label map are those from the analytic labels
    a = region_centres(cloud.points, got, ROI_REGIONS)
    b = region_centres(cloud.points, truth, ROI_REGIONS)
    for name in ROI_REGIONS.values():
        assert np.linalg.norm(a[name] - b[name]) < 0.25, name
    # a label map in another physical space is refused, naming it
    shifted = Volume(regions.array, regions.spacing, np.asarray(regions.origin) + 30.0)
    with pytest.raises(ValueError, match="my labels.nrrd: .* lie more than"):
        label_points(cloud.points, shifted, where="my labels.nrrd")


# --------------------------------------------------------------------------- ROI boxes
def test_roi_box_is_centred_and_its_parts_outside_are_reported():
    femur = Volume(np.zeros((30, 40, 50), np.uint8), (0.5, 0.5, 0.5), (10.0, 20.0, 30.0))
    femur.array[:, :, :25] = 1  # the femur fills the half x < 25
    # centre on voxel (x, y, z) = (25, 20, 0): x straddles the femur's edge, z the volume's
    centre = femur.index_to_physical([24.5, 20.0, 0.0])
    (roi,) = roi_boxes({"head": centre}, femur, 10)
    assert roi.start_zyx[0] in (-5, -4)  # 4 or 5 of its 10 slices lie below the volume
    box_centre = roi.centre_voxel_mm(femur)
    assert np.all(np.abs(box_centre - centre) <= 0.25 + 1e-9)
    z0 = roi.start_zyx[0]
    inside_z = min(10, 10 + z0)  # slices of the box inside the volume
    assert roi.outside_volume == pytest.approx(1 - inside_z / 10)
    # half of the box's x range is femur (x < 25), in the slices inside the volume
    x0 = roi.start_zyx[2]
    femur_x = max(0, min(25, x0 + 10) - x0)
    assert roi.outside_femur == pytest.approx(1 - inside_z * 10 * femur_x / 1000)
    # the morphometry counts only the voxels inside the volume and the femur
    bone = femur.with_array(np.zeros_like(femur.array))
    bone.array[:, :, ::4] = 1
    m = roi_morphometry(bone, femur, roi, context_mm=0.0)
    assert m.total_voxels == inside_z * 10 * femur_x


def test_roi_morphometry_on_plates_is_exact_with_context():
    """Plates of 4 voxels with gaps of 12 (spacing 0.5 mm): Tb.Th 2 mm, Tb.Sp 6 mm, Tb.N 1/8 per
    mm, BV/TV 0.25, also for a cube whose faces cut the plates and gaps (the context margin)."""
    n = 80
    z = np.arange(n)
    bone = np.zeros((n, n, n), np.uint8)
    bone[(z % 16) < 4] = 1
    femur = Volume(np.ones((n, n, n), np.uint8), (0.5, 0.5, 0.5), (0, 0, 0))
    centre = femur.index_to_physical([40, 40, 41.5])  # z faces through a plate and a gap
    (roi,) = roi_boxes({"neck": centre}, femur, 32)
    m = roi_morphometry(femur.with_array(bone), femur, roi, context_mm=4.0)
    assert m.tb_th_mm == pytest.approx(2.0, rel=1e-6)
    assert m.tb_sp_mm == pytest.approx(6.0, rel=1e-6)
    assert m.tb_n_per_mm == pytest.approx(0.125, rel=1e-6)
    assert m.bv_tv == pytest.approx(0.25)


def test_roi_morphometry_with_enough_context_equals_the_whole_volume_map():
    """On a random structure the ROI's values with a margin of twice the largest ball radius are
    those of the thickness maps of the whole volume averaged over the ROI; without the margin
    they are not (balls are cut, or grow past structure beyond the ROI's faces)."""
    from femursr.morphometry import morphometry

    rng = np.random.default_rng(4)
    n = 72
    field = ndi.gaussian_filter(rng.normal(size=(n, n, n)), 2.5)
    bone = (field > np.quantile(field, 0.7)).astype(np.uint8)
    femur = Volume(np.ones((n, n, n), np.uint8), (0.3, 0.3, 0.3), (0, 0, 0))
    (roi,) = roi_boxes({"trochanter": femur.index_to_physical([36, 35, 37])}, femur, 20)
    regions = np.zeros((n, n, n), np.uint8)
    regions[roi.slices()] = 1
    whole = morphometry(bone > 0, np.ones((n, n, n), bool), (0.3,) * 3, regions, {1: "trochanter"})["trochanter"]
    m = roi_morphometry(femur.with_array(bone), femur, roi, context_mm=7.5)  # 25 voxels
    assert m.tb_th_mm == pytest.approx(whole.tb_th_mm, rel=1e-6)
    assert m.tb_sp_mm == pytest.approx(whole.tb_sp_mm, rel=1e-6)
    assert m.bv_tv == pytest.approx(whole.bv_tv)
    bare = roi_morphometry(femur.with_array(bone), femur, roi, context_mm=0.0)
    assert abs(bare.tb_sp_mm - whole.tb_sp_mm) > 1e-3 * whole.tb_sp_mm


# --------------------------------------------------------------------------- bone masks
def test_threshold_bone_mask_on_plates_is_exact_and_stays_in_the_femur(monkeypatch):
    rng = np.random.default_rng(0)
    n = 64
    truth = np.zeros((n, n, n), bool)
    truth[:, :, (np.arange(n) % 16) < 4] = True  # plates along x, 4 voxels thick
    image = np.where(truth, 0.8, 0.1).astype(np.float32)
    image = ndi.gaussian_filter(image, 0.6) + rng.normal(0, 0.02, image.shape).astype(np.float32)
    femur = np.zeros_like(truth, np.uint8)
    femur[8:56, 8:56, 8:56] = 1
    vol = Volume(image, (0.082,) * 3, (0, 0, 0))
    params = BoneThreshold(sigma_mm=0.066, threshold=0.45)
    bone = threshold_bone_mask(vol, vol.with_array(femur), params)
    b = bone.array > 0
    assert not b[femur == 0].any()
    assert np.array_equal(b[femur > 0], truth[femur > 0])
    # slab by slab (halo of slices) gives the same mask as one slab
    import femursr.volume

    monkeypatch.setattr(femursr.volume, "SLAB_VOXELS", n * n * 5)
    assert np.array_equal(threshold_bone_mask(vol, vol.with_array(femur), params).array, bone.array)
    with pytest.raises(ValueError, match="not on the same grid"):
        threshold_bone_mask(vol, Volume(femur, (0.1,) * 3, (0, 0, 0)), params)


def test_bone_outline_is_the_solid_femur_behind_a_cortex_and_open_trabeculae():
    n = 60
    g = np.indices((n, n, n)) - 29.5
    r = np.sqrt((g**2).sum(0))
    femur = (r < 25).astype(np.uint8)
    bone = ((r < 25) & (r >= 23)) | ((r < 23) & (np.abs(g[2]) % 6 < 1))  # shell and plates
    vol = Volume(bone.astype(np.uint8), (0.2,) * 3, (0, 0, 0))
    out = bone_outline(vol, vol.with_array(femur), closing_mm=0.6, voxel_mm=0.4)
    assert volume_ml(out) == pytest.approx(volume_ml(vol.with_array(femur)), rel=0.01)
    assert volume_ml(bone_outline(vol.with_array(np.zeros_like(femur)), vol.with_array(femur))) == 0


# --------------------------------------------------------------------------- end to end
def _run(script, **kw):
    runpy.run_path(str(SCRIPTS / script), init_globals={"snakemake": mock_snakemake(**kw)}, run_name="__main__")


def test_rule_scripts_place_rois_on_a_synthetic_subject_within_1_mm(small_subject, tmp_path):
    """bone_mask, templates, place_rois and roi_morphometry (the rule scripts) on the small
    synthetic subject, whose HR is made from its truth tissue; the template is another femur
    (other angles and size, turned and moved) with analytic labels. The HR's ROI centres must lie
    within 1 mm of the centres from the truth labels."""
    from femursr.templates import save_templates
    from femursr.volume import read_volume, write_volume

    _, _, _, truth_dir, _ = small_subject
    tissue = read_volume(truth_dir / "tissue.nii.gz")
    rng = np.random.default_rng(1)
    t = tissue.array
    image = np.select([t >= 2, t == 1], [0.8, 0.15], 0.0).astype(np.float32)
    image = ndi.gaussian_filter(image, 0.5) + rng.normal(0, 0.03, t.shape).astype(np.float32)
    hr = tmp_path / "hr.nii"
    write_volume(tissue.with_array(image), hr)
    femur = truth_dir / "femur_mask.nii.gz"
    # the template: another femur, turned by 30 degrees and moved, with analytic labels
    shape = femur_shape(nsa=127, anteversion=16, size=1.05)
    pose = Similarity(1.0, rotation_matrix([0.2, 1.0, 0.3], np.deg2rad(30)), np.array([40.0, -20.0, 10.0]))
    tmask, tregions = render(shape, 0.5, pose)
    template = build_template("T1", tmask, tregions, 5000, 0, 0.0, "analytic", volume_ml(tmask), 0.5)
    save_templates([template], tmp_path / "templates.npz")

    bone = tmp_path / "bone" / "HR.nii.gz"
    _run("bone_mask.py", input={"volume": str(hr), "femur": str(femur)},
         output={"mask": str(bone), "report": str(tmp_path / "bone" / "HR.json")},
         params={"options": {"backend": "threshold", "sigma_mm": 0.066, "threshold": 0.45}},
         wildcards={"method": "HR", "subject": "S001"}, log=[str(tmp_path / "bone.log")])  # fmt: skip
    opts = {"roi_source": "own", "min_outline_fraction": 0.8, "refine_radius": 0.7, "matching": {},
            "template_points": 5000, "surface_voxel_mm": 0.4, "outline_closing_mm": 1.0, "roi_edge_vox": 24}  # fmt: skip
    rois = tmp_path / "rois" / "HR.json"
    _run("place_rois.py", input={"bone": str(bone), "volume": str(hr), "femur": str(femur), "templates": str(tmp_path / "templates.npz")},
         output={"rois": str(rois), "points": str(tmp_path / "rois" / "HR.points.npz"), "png": str(tmp_path / "rois" / "HR.png")},
         params={"options": opts, "seed": 0}, wildcards={"method": "HR", "subject": "S001"}, log=[str(tmp_path / "rois.log")])  # fmt: skip
    rec = json.loads(rois.read_text())
    assert rec["placed_by"] == "own" and rec["outline"]["fraction"] > 0.9
    errors = truth_centre_errors(PointCloud.load(tmp_path / "rois" / "HR.points.npz"), read_volume(truth_dir / "regions.nii.gz"), rec["own"]["centres_mm"])
    print("ROI centre to truth (mm):", {k: round(v["distance_mm"], 3) for k, v in errors.items()})
    assert set(errors) == {"head", "neck", "trochanter"}
    assert all(e["distance_mm"] < 1.0 for e in errors.values())
    assert (tmp_path / "rois" / "HR.png").stat().st_size > 20_000

    # an LR-like volume whose bone mask outlines little of the femur falls back on the HR's ROIs
    lr = tmp_path / "lr.nii"
    top = np.arange(t.shape[0])[:, None, None] > 0.75 * t.shape[0]  # bone seen only in the top slices
    write_volume(tissue.with_array(np.float32(0.6) * ((t == 3) & top)), lr)
    _run("bone_mask.py", input={"volume": str(lr), "femur": str(femur)},
         output={"mask": str(tmp_path / "bone" / "LR.nii.gz"), "report": str(tmp_path / "bone" / "LR.json")},
         params={"options": {"backend": "threshold", "sigma_mm": 0.0, "threshold": 0.45}},
         wildcards={"method": "LR", "subject": "S001"}, log=[None])  # fmt: skip
    _run("place_rois.py", input={"bone": str(tmp_path / "bone" / "LR.nii.gz"), "volume": str(lr), "femur": str(femur),
                                 "templates": str(tmp_path / "templates.npz"), "hr_rois": str(rois)},
         output={"rois": str(tmp_path / "rois" / "LR.json"), "points": str(tmp_path / "rois" / "LR.points.npz"),
                 "png": str(tmp_path / "rois" / "LR.png")},
         params={"options": opts, "seed": 0}, wildcards={"method": "LR", "subject": "S001"}, log=[None])  # fmt: skip
    lr_rec = json.loads((tmp_path / "rois" / "LR.json").read_text())
    assert lr_rec["placed_by"] == "hr-fallback" and "min_outline_fraction" in lr_rec["reason"]
    assert [r["start_zyx"] for r in lr_rec["rois"]] == [r["start_zyx"] for r in rec["rois"]]

    table = tmp_path / "morphometry" / "HR" / "S001.tsv"
    _run("roi_morphometry.py", input={"bone": str(bone), "femur": str(femur), "rois": str(rois)}, output={"table": str(table)},
         params={"context_mm": 1.0}, wildcards={"method": "HR", "subject": "S001"}, log=[None])  # fmt: skip
    df = pd.read_csv(table, sep="\t")
    assert list(df.columns[:5]) == ["subject", "method", "region", "metric", "value"]
    assert set(df.metric) == {"bv_tv", "tb_th_mm", "tb_sp_mm", "tb_n_per_mm"}
    assert len(df) == 12 and df.value.notna().all()
    w = df.pivot(index="region", columns="metric", values="value")
    assert np.allclose(w.tb_n_per_mm, 1 / (w.tb_th_mm + w.tb_sp_mm))
    # the head is denser than the neck and the trochanter, as in the phantom
    assert w.loc["head", "bv_tv"] > max(w.loc["neck", "bv_tv"], w.loc["trochanter", "bv_tv"])


# --------------------------------------------------------------------------- the workflow
def _dry_run(tmp_path, cfg):
    import yaml

    from conftest import run_snakemake

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return run_snakemake(["-n", "--configfile", str(path)], tmp_path, check=False)


def test_evaluation_dag_has_every_volume_of_the_test_subjects(tmp_path):
    from conftest import load_config

    res = _dry_run(tmp_path, load_config())
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    # 5 test subjects: LR, HR and the 8 SR variants (4 models x 2D, 2.5D) each
    for rule, n in (("bone_mask", 50), ("place_rois", 50), ("roi_morphometry", 50), ("templates", 1), ("roi_accuracy", 1)):
        assert any(line.split()[:2] == [rule, str(n)] for line in out.splitlines()), (rule, n)
    assert "results/morphometry/HR/" in out and "results/morphometry/srgan_25d/" in out


@pytest.mark.parametrize(
    "change, message",
    [
        ({"template_labels": {"S002": "x.nii.gz"}}, "evaluation.template_labels: the synthetic cohort's templates are labelled from its truth"),
        ({"template_subjects": ["S999"]}, "evaluation.template_subjects: S999 is not a subject with both scans"),
        ({"matching": {"ransac_iters": 10}}, "evaluation.matching: unknown key 'ransac_iters'"),
    ],
)
def test_bad_evaluation_config_fails_at_parse_time_naming_the_key(tmp_path, change, message):
    from conftest import load_config

    cfg = load_config()
    cfg["evaluation"].update(change)
    res = _dry_run(tmp_path, cfg)
    assert res.returncode != 0
    assert message in res.stdout + res.stderr


def test_matching_a_femur_to_a_box_is_refused(known_case):
    _, template, _, _, _ = known_case
    box = Volume(np.pad(np.ones((40, 30, 20), np.uint8), 2), (0.5,) * 3, (0, 0, 0))
    with pytest.raises(ValueError, match="could not be matched"):
        match(template, mask_points(box, 5000, seed=0), MatchParams(ransac_runs=1))


def test_templates_rule_names_the_chosen_subjects_that_need_label_maps(tmp_path):
    from femursr.volume import write_volume

    mask, _ = render(femur_shape(), 0.6)
    paths = {}
    for s in ("P01", "P02"):
        paths[s] = tmp_path / f"{s}.nii.gz"
        write_volume(mask, paths[s])
    sel = tmp_path / "selection.tsv"
    pd.DataFrame({"subject": ["P02"], "bone_ml": [1.0], "quantile": [0.5], "bone_ml_at_quantile": [1.0]}).to_csv(sel, sep="\t", index=False)
    with pytest.raises(ValueError, match=r"templates P02 were chosen .* P02 has no region label map"):
        _run("build_templates.py", input={"selection": str(sel), "masks": [str(paths["P01"]), str(paths["P02"])], "labels": []},
             output={"templates": str(tmp_path / "t.npz"), "png": str(tmp_path / "t.png")},
             params={"subjects": ["P01", "P02"], "label_maps": {"P01": "labels/P01.nrrd"}, "points": 1000, "surface_voxel_mm": 0.0, "seed": 0},
             log=[None])  # fmt: skip
    assert not (tmp_path / "t.npz").exists()
