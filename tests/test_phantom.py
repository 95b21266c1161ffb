"""The synthetic cohort's truth is what it says."""

import json

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from femursr import phantom
from femursr.geometry import REGION_IDS, rotation_angle_deg

from conftest import small_synthetic


def _arr(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.fixture(scope="module")
def truth_table(small_subject):
    """The truth morphometry of the small subject, as rule truth_morphometry computes it."""
    from femursr.truth import truth_morphometry
    from femursr.volume import read_volume

    truth = small_subject[3]
    return truth_morphometry("S001", read_volume(truth / "tissue.nii.gz"), read_volume(truth / "regions.nii.gz"))


def test_recorded_bvtv_equals_bvtv_measured_on_truth(small_subject, truth_table):
    rec, _, _, truth, _ = small_subject
    tissue = _arr(truth / "tissue.nii.gz")
    regions = _arr(truth / "regions.nii.gz")
    table = truth_table
    for name, lab in REGION_IDS.items():
        r = regions == lab
        bv = np.count_nonzero(r & (tissue == 2))
        tv = np.count_nonzero(r & ((tissue == 1) | (tissue == 2)))
        recorded = table.query("region == @name and metric == 'BV/TV'")["value"].item()
        assert tv > 0, f"region {name} has no trabecular compartment"
        assert recorded == pytest.approx(bv / tv, rel=1e-5)
    tbn = table.pivot(index="region", columns="metric", values="value")
    np.testing.assert_allclose(tbn["Tb.N"], 1 / (tbn["Tb.Th"] + tbn["Tb.Sp"]), rtol=1e-5)


def test_morphometry_lies_in_a_plausible_range(truth_table):
    table = truth_table.pivot(index="region", columns="metric", values="value")
    # the head is the dense, plate-like region; neck and trochanter are sparse
    assert 0.3 < table.loc["head", "BV/TV"] < 0.75
    for r in ("neck", "trochanter"):
        assert 0.03 < table.loc[r, "BV/TV"] < 0.3
        assert table.loc[r, "Tb.Sp"] > table.loc["head", "Tb.Sp"]
    assert (table["Tb.Th"].dropna() > 0.2).all() and (table["Tb.Th"].dropna() < 1.5).all()


def test_labels_cover_the_femur_and_nothing_else(small_subject):
    truth = small_subject[3]
    femur = _arr(truth / "femur_mask.nii.gz") > 0
    regions = _arr(truth / "regions.nii.gz")
    assert femur.sum() > 10_000
    np.testing.assert_array_equal(regions > 0, femur)
    assert set(np.unique(regions)) == {0, 1, 2, 3, 4}


def test_region_predicates_partition_space():
    cfg = small_synthetic()
    subj = phantom.draw_subject(cfg["synthetic"], 7, 1, "S001")
    rng = np.random.default_rng(0)
    lo, hi = subj.shape.bounding_box(subj.z_cut)
    p = rng.uniform(lo, hi, size=(200_000, 3))
    masks = subj.shape.region_masks(p)
    stack = np.stack(list(masks.values())).astype(int)
    assert (stack.sum(0) == 1).all(), "every point must be in exactly one region"
    for name, m in masks.items():
        assert m.any(), f"no point in region {name}"
    # the soft weights used for blending round to the same regions away from borders
    w = subj.shape.region_weights(p)
    np.testing.assert_allclose(w.sum(1), 1, atol=1e-9)
    confident = w.max(1) > 0.9
    assert (np.argmax(w[confident], 1) == np.argmax(stack[:, confident], 0)).all()


def test_true_pose_maps_lr_femur_onto_hr_femur(small_subject):
    rec, _, _, truth, _ = small_subject
    hr_mask = sitk.ReadImage(str(truth / "femur_mask.nii.gz"))
    lr_mask = sitk.Cast(sitk.ReadImage(str(truth / "femur_mask_lr.nii.gz")), sitk.sitkFloat32)
    tfm = sitk.ReadTransform(str(truth / "pose.tfm"))
    hr = sitk.GetArrayFromImage(hr_mask) > 0
    # compare above the saw cut of the HR specimen (the in-situ femur continues below it)
    z = np.asarray(hr_mask.GetOrigin())[2] + np.arange(hr.shape[0]) * hr_mask.GetSpacing()[2]
    keep = (z > rec["hr_cut_z_mm"] + 1.0)[:, None, None]

    def dice(transform):
        moved = sitk.Resample(lr_mask, hr_mask, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        lr = (sitk.GetArrayFromImage(moved) >= 0.5) & keep
        h = hr & keep
        return 2 * np.count_nonzero(lr & h) / (np.count_nonzero(lr) + np.count_nonzero(h))

    assert dice(tfm) > 0.9
    assert dice(sitk.Euler3DTransform()) < 0.3, "the identity must not align the scans (the pose is not trivial)"
    assert 0 <= rec["pose"]["rotation_deg"] <= 20.0 + 1e-9


def test_pose_record_matches_transform_file(small_subject):
    rec, _, _, truth, _ = small_subject
    tfm = sitk.ReadTransform(str(truth / "pose.tfm"))
    c_hr = np.array(rec["pose"]["head_centre_hr"])
    np.testing.assert_allclose(tfm.TransformPoint(c_hr.tolist()), rec["pose"]["head_centre_lr"], atol=1e-6)
    R = np.array(rec["pose"]["R"])
    np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-9)
    assert rotation_angle_deg(R) == pytest.approx(rec["pose"]["rotation_deg"])


def test_lr_noise_is_the_configured_sd_or_gives_the_configured_snr(small_subject):
    rec, *_, cfg = small_subject
    assert rec["lr_noise"]["noise_hu"] == cfg["synthetic"]["lr"]["noise_hu"]
    syn = small_synthetic()["synthetic"]
    syn["lr"]["noise_hu"] = None  # calibrate to the SNR instead
    syn["lr"]["snr"] = 0.93
    subj = phantom.draw_subject(syn, 5, 1, "S001")
    lo, hi = subj.shape.bounding_box(subj.z_cut)
    _, _, info = phantom.render_lr(subj, syn, np.random.default_rng(0), (lo, hi))
    assert info["snr_femur"] == pytest.approx(0.93, rel=0.05)
    assert info["noise_hu"] > rec["lr_noise"]["noise_hu"]


def test_dicom_series_carry_the_recorded_geometry(small_subject):
    rec, lr_dir, hr_dir, _, _ = small_subject
    for folder, grid in ((lr_dir, rec["lr_grid"]), (hr_dir, rec["hr_grid"])):
        reader = sitk.ImageSeriesReader()
        names = reader.GetGDCMSeriesFileNames(str(folder))
        assert len(names) == grid["shape_zyx"][0]
        reader.SetFileNames(names)
        img = reader.Execute()
        assert list(img.GetSize()[::-1]) == grid["shape_zyx"]
        np.testing.assert_allclose(img.GetSpacing(), grid["spacing"], atol=1e-5)
        np.testing.assert_allclose(img.GetOrigin(), grid["origin"], atol=1e-5)


def test_lr_scan_holds_soft_tissue_air_and_pelvis(small_subject):
    from femursr.dicomio import read_ct_series_pydicom

    rec, lr_dir, _, truth, _ = small_subject
    hu, *_ = read_ct_series_pydicom(lr_dir)
    femur = _arr(truth / "femur_mask_lr.nii.gz") > 0
    outside = ~femur
    # air beside the body, and bright bone outside the femur: the pelvis that masking must remove
    assert (hu[outside] < -700).mean() > 0.02
    smooth = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(sitk.GetImageFromArray(hu), 1.5))
    assert (smooth[outside] > 500).sum() > 50


def test_same_seed_same_subject_and_subjects_differ():
    cfg = small_synthetic()["synthetic"]
    a = phantom.draw_subject(cfg, 11, 2, "S002")
    b = phantom.draw_subject(cfg, 11, 2, "S002")
    c = phantom.draw_subject(cfg, 11, 3, "S003")
    p = np.random.default_rng(1).uniform(-20, 20, size=(5000, 3)).astype(np.float32)
    ta, _ = phantom.femur_tissue(a, p)
    tb, _ = phantom.femur_tissue(b, p)
    tc, _ = phantom.femur_tissue(c, p)
    np.testing.assert_array_equal(ta, tb)
    assert (ta != tc).any()
    np.testing.assert_array_equal(a.rotation, b.rotation)
    assert a.shape.neck_shaft_angle_deg != c.shape.neck_shaft_angle_deg


def test_failed_write_leaves_no_partial_output(tmp_path, monkeypatch):
    cfg = small_synthetic(scale=0.3, voxel=0.3)
    calls = {"n": 0}
    real = phantom.write_ct_series

    def failing(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 2:  # the HR series
            raise OSError("disk full (simulated)")
        return real(*args, **kw)

    monkeypatch.setattr(phantom, "write_ct_series", failing)
    with pytest.raises(OSError, match="simulated"):
        phantom.synthesize_subject("S001", 1, cfg["synthetic"], 1, tmp_path / "lr", tmp_path / "hr", tmp_path / "truth")
    assert not (tmp_path / "truth").exists()
    assert not (tmp_path / "hr").exists()
    assert not (tmp_path / "lr").exists(), "the LR series must not appear without its subject's truth"
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name], "temporary folders left behind"


def test_subject_record_is_json_with_structure(small_subject):
    truth = small_subject[3]
    rec = json.loads((truth / "subject.json").read_text())
    assert set(rec["structure"]) == {"head", "neck", "trochanter", "shaft"}
    assert 0.7 <= rec["bone_loss_factor"] <= 1.15
