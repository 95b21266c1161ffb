"""The nnU-Net backend of the femur masks: dataset layout, resampling, model folders, and (slow)
assemble -> plan/preprocess -> train -> predict end to end on the CPU with weights trained here."""

import json
import os
import shutil
import time

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from femursr import nnunet
from femursr.volume import Volume

from conftest import small_synthetic


def _ball_volume(radius_mm, spacing, shape_zyx, centre_mm, origin=(0.0, 0.0, 0.0), hu=(0.0, 1000.0)):
    """(image HU, mask) of a ball of ``radius_mm`` centred at ``centre_mm`` (LPS), point sampled."""
    vol = Volume(np.zeros(shape_zyx, np.float32), spacing, origin)
    z, y, x = np.indices(shape_zyx)
    p = vol.index_to_physical(np.stack([x, y, z], -1))
    inside = np.linalg.norm(p - np.asarray(centre_mm), axis=-1) <= radius_mm
    return vol.with_array(np.where(inside, hu[1], hu[0]).astype(np.float32)), vol.with_array(inside.astype(np.uint8))


# ------------------------------------------------------------------------------ fast (no training)
def test_dataset_name_is_nnunets_pattern():
    assert nnunet.dataset_name(7, "Femur") == "Dataset007_Femur"
    for bad_id in (0, 1000, "7"):
        with pytest.raises(ValueError, match="dataset id"):
            nnunet.dataset_name(bad_id, "Femur")
    with pytest.raises(ValueError, match="dataset name"):
        nnunet.dataset_name(7, "my_femur")


def test_isotropic_grid_covers_the_same_box_about_the_same_centre():
    vol = Volume(np.zeros((10, 20, 30), np.float32), (0.5, 0.5, 2.0), (3.0, -4.0, 5.0))
    grid = nnunet.isotropic_grid(vol, 1.0)
    # x: 30 * 0.5 = 15 mm, y: 20 * 0.5 = 10 mm, z: 10 * 2 = 20 mm
    assert grid.shape == (20, 10, 15)
    assert grid.spacing == (1.0, 1.0, 1.0)
    centre = lambda v: v.index_to_physical((np.asarray(v.shape[::-1]) - 1) / 2)  # noqa: E731
    np.testing.assert_allclose(centre(grid), centre(vol), atol=1e-9)


def test_resampling_a_ball_to_1mm_keeps_its_volume_and_place():
    # a 6 mm ball on a 0.25 mm grid, as a label and as an image, brought to 1 mm
    img, mask = _ball_volume(6.0, (0.25,) * 3, (64, 64, 64), (8.1, 7.9, 8.0))
    grid = nnunet.isotropic_grid(mask, 1.0)
    low = nnunet.resample_to(mask, grid, label=True)
    exact = 4 / 3 * np.pi * 6.0**3
    assert low.array.dtype == np.uint8
    assert low.array.sum() * 1.0 == pytest.approx(exact, rel=0.06)
    z, y, x = np.nonzero(low.array)
    np.testing.assert_allclose(low.index_to_physical(np.stack([x, y, z], -1)).mean(0), (8.1, 7.9, 8.0), atol=0.15)
    # the image's mean inside stays the bone value far from the edge; a constant stays constant
    lowimg = nnunet.resample_to(img, grid)
    assert lowimg.array.max() == pytest.approx(1000.0, rel=1e-3)
    flat = nnunet.resample_to(img.with_array(np.full(img.shape, 42.0, np.float32)), grid)
    np.testing.assert_allclose(flat.array[2:-2, 2:-2, 2:-2], 42.0, rtol=1e-4)
    # and back onto the fine grid (as predict_mask does with the probability): Dice near 1
    back = nnunet.resample_to(low.with_array(low.array.astype(np.float32)), mask)
    assert nnunet.dice(back.array >= 0.5, mask.array) > 0.93


def test_resampling_to_an_oblique_grid_in_slabs_matches_one_pass():
    img, _ = _ball_volume(5.0, (1.0, 1.0, 1.0), (20, 20, 20), (10.0, 10.0, 10.0))
    c, s = np.cos(0.4), np.sin(0.4)
    ref = Volume(np.zeros((30, 30, 30), np.uint8), (0.5,) * 3, (4.0, 2.0, 3.0), (c, -s, 0, s, c, 0, 0, 0, 1))
    one = nnunet.resample_to(img, ref, slab_voxels=10**9)
    slabs = nnunet.resample_to(img, ref, slab_voxels=900 * 7)  # 7 slices per slab, a short last one
    np.testing.assert_array_equal(one.array, slabs.array)
    assert one.same_grid(ref)


def _blob_cases(n=3):
    """Anisotropic (0.8 x 0.8 x 1.5 mm) scans of a bright ball beside a dimmer one, and the mask of the bright one."""
    rng = np.random.default_rng(0)
    for i in range(n):
        img, mask = _ball_volume(5.0 + i, (0.8, 0.8, 1.5), (16, 30, 30), (11.0, 12.0, 10.0), origin=(-1.0, 0.5, 2.0))
        other, _ = _ball_volume(3.0, (0.8, 0.8, 1.5), (16, 30, 30), (19.0, 19.0, 12.0), origin=(-1.0, 0.5, 2.0), hu=(0, 300))
        noisy = img.with_array(img.array + other.array + rng.normal(0, 20, img.shape).astype(np.float32))
        yield f"C{i:02d}", noisy, mask


def test_assemble_dataset_writes_nnunet_raw_layout_at_1mm(tmp_path):
    folder = nnunet.assemble_dataset(_blob_cases(3), tmp_path, 42, "Blobs")
    assert folder == tmp_path / "nnUNet_raw" / "Dataset042_Blobs"
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "CT"}
    assert meta["labels"] == {"background": 0, "femur": 1}
    assert meta["numTraining"] == 3 and meta["file_ending"] == ".nii.gz"
    assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == [f"C{i:02d}_0000.nii.gz" for i in range(3)]
    assert sorted(p.name for p in (folder / "labelsTr").iterdir()) == [f"C{i:02d}.nii.gz" for i in range(3)]
    for i, (_, img, mask) in enumerate(_blob_cases(3)):
        im = sitk.ReadImage(str(folder / "imagesTr" / f"C{i:02d}_0000.nii.gz"))
        lab = sitk.ReadImage(str(folder / "labelsTr" / f"C{i:02d}.nii.gz"))
        assert im.GetSpacing() == pytest.approx((1.0, 1.0, 1.0)) and lab.GetSpacing() == pytest.approx((1.0, 1.0, 1.0))
        assert im.GetSize() == lab.GetSize() == (24, 24, 24)  # 30 x 0.8, 30 x 0.8, 16 x 1.5 mm
        np.testing.assert_allclose(im.GetOrigin(), lab.GetOrigin())
        assert lab.GetPixelID() == sitk.sitkUInt8
        arr = sitk.GetArrayFromImage(lab)
        assert set(np.unique(arr)) == {0, 1}
        # the ball's volume survives the change of grid (partial volume decides at the edge)
        assert arr.sum() == pytest.approx(mask.array.sum() * 0.8 * 0.8 * 1.5, rel=0.08)
        # the image is in HU: the bright ball is still near 1000 HU inside
        assert np.percentile(sitk.GetArrayFromImage(im)[arr > 0], 50) > 800
    leftovers = [p.name for p in folder.parent.iterdir() if p.name.startswith(".")]
    assert not leftovers


def test_assemble_dataset_at_native_spacing_keeps_the_grid(tmp_path):
    folder = nnunet.assemble_dataset(_blob_cases(2), tmp_path, 43, "Native", spacing_mm=None)
    im = sitk.ReadImage(str(folder / "imagesTr" / "C00_0000.nii.gz"))
    assert im.GetSpacing() == pytest.approx((0.8, 0.8, 1.5)) and im.GetSize() == (30, 30, 16)


@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda c: [("S_01", c[0][1], c[0][2])], "letters, digits"),
        (lambda c: [c[0], c[0]], "given twice"),
        (lambda c: [(c[0][0], c[0][1], c[0][2].with_array(c[0][2].array * 2))], "binary"),
        (lambda c: [(c[0][0], c[0][1], c[0][2].with_array(np.zeros_like(c[0][2].array)))], "empty"),
        (lambda c: [(c[0][0], c[0][1], Volume(c[0][2].array, (1, 1, 1), (0, 0, 0)))], "not on one grid"),
        (lambda c: [c[0]], "at least 2"),
    ],
)
def test_assemble_dataset_rejects_bad_cases_and_leaves_nothing(tmp_path, bad, message):
    cases = list(_blob_cases(2))
    with pytest.raises(ValueError, match=message):
        nnunet.assemble_dataset(bad(cases), tmp_path, 44, "Bad")
    raw = tmp_path / "nnUNet_raw"
    assert not raw.exists() or not any(raw.iterdir())


def test_missing_model_folder_names_it_and_the_fix(tmp_path):
    missing = tmp_path / "nnUNet_results" / "Dataset501_Femur" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    with pytest.raises(FileNotFoundError, match="not found") as err:
        nnunet.check_model_folder(missing)
    assert str(missing) in str(err.value) and "train one" in str(err.value) and "trained elsewhere" in str(err.value)
    missing.mkdir(parents=True)
    (missing / "plans.json").write_text("{}")
    (missing / "dataset.json").write_text("{}")
    (missing / "fold_0").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no fold_<k>/checkpoint_final.pth"):
        nnunet.check_model_folder(missing)
    with pytest.raises(FileNotFoundError, match=r"fold_3/checkpoint_final.pth missing"):
        nnunet.check_model_folder(missing, folds=[3])
    (missing / "fold_0" / "checkpoint_final.pth").write_bytes(b"")
    assert nnunet.check_model_folder(missing) == [0]


def test_environment_is_set_for_the_block_only(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_results", "/somewhere/else")
    monkeypatch.delenv("nnUNet_raw", raising=False)
    with nnunet.nnunet_environment(tmp_path, nnUNet_n_proc_DA=0):
        assert os.environ["nnUNet_raw"] == str(tmp_path / "nnUNet_raw")
        assert os.environ["nnUNet_results"] == str(tmp_path / "nnUNet_results")
        assert os.environ["nnUNet_n_proc_DA"] == "0"
    assert "nnUNet_raw" not in os.environ and os.environ["nnUNet_results"] == "/somewhere/else"


def test_device_auto_is_cuda_only_when_there_is_one():
    assert nnunet.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert nnunet.resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA GPU"):
            nnunet.resolve_device("cuda")


def _write_cases(tmp_path, n=2):
    """n labelled blob cases as NIfTI files; returns [(image path, mask path)]."""
    paths = []
    for case, img, mask in _blob_cases(n):
        ip, mp = tmp_path / f"{case}_ct.nii.gz", tmp_path / f"{case}_femur.nii.gz"
        sitk.WriteImage(img.to_sitk(), str(ip))
        sitk.WriteImage(mask.to_sitk(), str(mp))
        paths.append((ip, mp))
    return paths


def test_training_cases_from_a_tsv_or_a_list(tmp_path):
    (i0, m0), (i1, m1) = _write_cases(tmp_path)
    tsv = tmp_path / "cases.tsv"
    tsv.write_text(f"case\timage\tmask\nA-1\t{i0}\t{m0}\nB-2\t{i1}\t{m1}\n")
    assert nnunet.read_training_cases(str(tsv)) == [
        {"case": "A-1", "image": str(i0), "mask": str(m0)},
        {"case": "B-2", "image": str(i1), "mask": str(m1)},
    ]
    # without case ids, T001, T002, ... by position
    listed = nnunet.read_training_cases([{"image": str(i0), "mask": str(m0)}, {"image": str(i1), "mask": str(m1)}])
    assert [c["case"] for c in listed] == ["T001", "T002"]


@pytest.mark.parametrize(
    "table, message",
    [
        ("image\tmask\n{i0}\t{m0}\n", "at least 2"),
        ("image\tmask\n{i0}\t{m0}\n{i1}\t/nowhere/femur.nii.gz\n", r"case T002 \(row 2\): mask /nowhere/femur.nii.gz not found"),
        ("imgae\tmask\n{i0}\t{m0}\n{i1}\t{m1}\n", "missing image; unknown 'imgae'"),
        ("case\timage\tmask\nS_1\t{i0}\t{m0}\nS2\t{i1}\t{m1}\n", r"case S_1 \(row 1\): case ids are letters"),
        ("case\timage\tmask\nS1\t{i0}\t{m0}\nS1\t{i1}\t{m1}\n", "given twice"),
    ],
)
def test_bad_training_case_tables_name_the_row_and_file(tmp_path, table, message):
    (i0, m0), (i1, m1) = _write_cases(tmp_path)
    tsv = tmp_path / "cases.tsv"
    tsv.write_text(table.format(i0=i0, m0=m0, i1=i1, m1=m1))
    with pytest.raises(ValueError, match=message) as err:
        nnunet.read_training_cases(str(tsv), where="training_cases")
    assert str(tsv) in str(err.value)
    with pytest.raises(ValueError, match="file not found"):
        nnunet.read_training_cases(str(tmp_path / "none.tsv"))


def test_labelled_case_is_read_and_bad_masks_are_refused(tmp_path):
    (i0, m0), _ = _write_cases(tmp_path)
    case, img, mask = nnunet.read_labelled_case("C00", i0, m0)
    assert case == "C00" and img.same_grid(mask) and mask.array.dtype == np.uint8 and mask.array.sum() > 100
    ref = sitk.ReadImage(str(m0))
    multi = sitk.Cast(ref, sitk.sitkUInt8) * 75  # a multi-label map (TotalSegmentator-like label 75)
    multi.CopyInformation(ref)
    sitk.WriteImage(multi, str(tmp_path / "multi.nii.gz"))
    with pytest.raises(ValueError, match=r"case C00: the mask .*multi.nii.gz has values \[0, 75\]; give a binary femur mask"):
        nnunet.read_labelled_case("C00", i0, tmp_path / "multi.nii.gz")
    shifted = sitk.Image(ref)
    shifted.SetOrigin((5.0, 0.0, 0.0))
    sitk.WriteImage(shifted, str(tmp_path / "shifted.nii.gz"))
    with pytest.raises(ValueError, match=r"shifted.nii.gz .* is not on the grid of the image .*C00_ct.nii.gz"):
        nnunet.read_labelled_case("C00", i0, tmp_path / "shifted.nii.gz")
    empty = sitk.Image(ref) * 0
    empty.CopyInformation(ref)
    sitk.WriteImage(empty, str(tmp_path / "empty.nii.gz"))
    with pytest.raises(ValueError, match="empty"):
        nnunet.read_labelled_case("C00", i0, tmp_path / "empty.nii.gz")


# ------------------------------------------------------------------------------ end to end (slow)
# Measured on the 2-core development machine (shared, loaded): 5 phantom LR scans at 1 mm, the 2d
# configuration for 3 x 50 iterations trains in 3 to 6 min and reaches Dice 0.82 on the HR grid
# of an unseen subject (all-femur guess: 0.22). One 3d_fullres iteration takes 10 to 20 s here, so
# the 3D configuration (the paper's) gets a smoke test of 2 iterations.
CI_BUDGET = dict(epochs=3, iterations_per_epoch=50, val_iterations=1)
N_TRAIN = 5


def _phantom(index, syn, seed):
    """A synthetic subject's clinical CT (HU), its femur mask, and the subject (for analytic truth)."""
    from femursr.phantom import draw_subject, render_lr, subject_rng

    subj = draw_subject(syn, seed, index, f"S{index:03d}")
    lo, hi = subj.shape.bounding_box(subj.z_cut)
    img, mask, _ = render_lr(subj, syn, subject_rng(seed, 10_000 + index), (lo - 2.0, hi + 2.0))
    return img, mask, subj


def _hr_reference(subj, spacing=0.5, margin=3.0):
    """An HR-like grid in the femur frame (as the HR scan's), expressed in the LR's patient frame,
    and the analytic femur indicator at its voxel centres (the femur continues below the cut)."""
    from femursr.phantom import femur_tissue

    lo, hi = subj.shape.bounding_box(subj.z_cut)
    lo, hi = lo - margin, hi + margin
    n = np.ceil((hi - lo) / spacing).astype(int) + 1
    ref = Volume(
        np.zeros((n[2], n[1], n[0]), np.uint8), (spacing,) * 3,
        subj.rotation @ lo + subj.translation, subj.rotation.ravel(),
    )  # fmt: skip
    z, y, x = np.indices(ref.shape)
    p = ref.index_to_physical(np.stack([x, y, z], -1).reshape(-1, 3))
    q = ((p - subj.translation) @ subj.rotation).astype(np.float32)  # patient -> femur frame
    tissue, _ = femur_tissue(subj, q)
    return ref, (tissue > 0).reshape(ref.shape)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """assemble -> plan/preprocess (2d, 3d_fullres) -> train 2d on 5 phantom LR scans (demo noise)."""
    torch.set_num_threads(2)
    cfg = small_synthetic(n_subjects=N_TRAIN + 1, scale=0.35)
    syn, seed = cfg["synthetic"], cfg["seed"]
    root = tmp_path_factory.mktemp("nnunet")
    times = {}
    t = time.perf_counter()
    cases = ((f"S{i:03d}", *_phantom(i, syn, seed)[:2]) for i in range(1, N_TRAIN + 1))
    raw = nnunet.assemble_dataset(cases, root, 501, "Femur")
    times["assemble"] = time.perf_counter() - t
    t = time.perf_counter()
    pre = nnunet.plan_and_preprocess(root, 501, ("2d", "3d_fullres"), num_processes=1)
    times["plan"] = time.perf_counter() - t
    t = time.perf_counter()
    model = nnunet.train(root, 501, "2d", 0, **CI_BUDGET, device="cpu", augmentation_processes=0, seed=0)
    times["train_2d"] = time.perf_counter() - t
    yield dict(root=root, raw=raw, pre=pre, model=model, times=times, syn=syn, seed=seed)
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_trained_model_folder_is_complete(trained):
    pre, model = trained["pre"], trained["model"]
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    assert plans["configurations"]["3d_fullres"]["spacing"] == [1.0, 1.0, 1.0]  # assembled at 1 mm
    assert (pre / "nnUNetPlans_2d").is_dir() and (pre / "nnUNetPlans_3d_fullres").is_dir()
    splits = json.loads((pre / "splits_final.json").read_text())
    assert len(splits) == 5 and all(len(s["val"]) == 1 for s in splits)
    assert model.name == "nnUNetTrainer_femursr__nnUNetPlans__2d"
    for f in ("plans.json", "dataset.json", "dataset_fingerprint.json", "fold_0/checkpoint_final.pth"):
        assert (model / f).is_file(), f
    val = json.loads((model / "fold_0" / "validation" / "summary.json").read_text())
    assert set(val["cases"]) == set(splits[0]["val"])
    # no temporary folders left beside the outputs
    for d in (pre.parent, model.parent.parent):
        assert not [p.name for p in d.iterdir() if p.name.startswith(".")]
    print("nnU-Net timings (s):", {k: round(v, 1) for k, v in trained["times"].items()}, "validation", val["mean"])


@pytest.mark.slow
def test_predicted_mask_on_the_hr_grid_matches_the_analytic_femur(trained):
    """A subject the model never saw: the mask comes back on the (oblique, 0.5 mm) HR grid and
    overlaps the analytic femur there far better than a constant guess."""
    img, _, subj = _phantom(N_TRAIN + 1, trained["syn"], trained["seed"])
    ref, truth = _hr_reference(subj)
    predictor = nnunet.load_model(trained["model"], device="cpu", mirroring=False)
    t = time.perf_counter()
    mask = nnunet.predict_mask(predictor, img, ref)
    elapsed = time.perf_counter() - t
    assert mask.same_grid(ref) and mask.array.dtype == np.uint8
    d = nnunet.dice(mask.array, truth)
    constant = nnunet.dice(np.ones_like(truth), truth)  # the best constant guess on this grid
    # the LR already resampled onto the HR grid (as the workflow gives it): only the HR box is
    # seen, unlike the training scans, so the model does worse, but still better than a guess
    mask2 = nnunet.predict_mask(predictor, nnunet.resample_to(img, ref))
    d2 = nnunet.dice(mask2.array, truth)
    print(f"nnU-Net prediction {elapsed:.1f} s, Dice on the HR grid {d:.3f}, from the LR on the HR grid {d2:.3f} (all-femur guess {constant:.3f})")
    assert d > 0.7 > 3 * constant
    assert mask2.same_grid(ref)
    assert d2 > constant + 0.1


@pytest.mark.slow
def test_a_model_folder_trained_elsewhere_predicts_the_same(trained, tmp_path):
    """A copy of the model folder elsewhere, its checkpoint naming nnU-Net's stock trainer (as a
    model trained with plain nnUNetv2_train would), predicts the same mask."""
    elsewhere = tmp_path / "downloaded" / "nnUNetTrainer__nnUNetPlans__2d"
    shutil.copytree(trained["model"], elsewhere)
    ckpt_file = elsewhere / "fold_0" / "checkpoint_final.pth"
    ckpt = torch.load(ckpt_file, map_location="cpu", weights_only=False)
    ckpt["trainer_name"] = "nnUNetTrainer"
    torch.save(ckpt, ckpt_file)
    img, _, _ = _phantom(N_TRAIN + 1, trained["syn"], trained["seed"])
    ours = nnunet.predict_mask(trained["model"], img, device="cpu", mirroring=False)
    theirs = nnunet.predict_mask(elsewhere, img, device="cpu", mirroring=False)
    assert ours.same_grid(img)
    np.testing.assert_array_equal(ours.array, theirs.array)
    with pytest.raises(ValueError, match="no label pelvis"):
        nnunet.predict_mask(elsewhere, img, labels="pelvis", device="cpu", mirroring=False)


@pytest.mark.slow
def test_3d_fullres_trains_and_predicts(trained):
    """The paper's configuration runs end to end (2 iterations, no validation iterations: a
    smoke test of the 3D path)."""
    t = time.perf_counter()
    model = nnunet.train(
        trained["root"], 501, "3d_fullres", 0, epochs=1, iterations_per_epoch=2, val_iterations=0,
        device="cpu", augmentation_processes=0, seed=0,
    )  # fmt: skip
    elapsed = time.perf_counter() - t
    assert (model / "fold_0" / "checkpoint_final.pth").is_file()
    assert model.name == "nnUNetTrainer_femursr__nnUNetPlans__3d_fullres"
    assert (trained["model"] / "fold_0" / "checkpoint_final.pth").is_file()  # the 2d model is kept
    img, _, _ = _phantom(N_TRAIN + 1, trained["syn"], trained["seed"])
    t = time.perf_counter()
    mask = nnunet.predict_mask(model, img, device="cpu", mirroring=False)
    print(f"nnU-Net 3d_fullres: 2 iterations + validation in {elapsed:.0f} s, prediction {time.perf_counter() - t:.1f} s")
    assert mask.same_grid(img) and set(np.unique(mask.array)) <= {0, 1}

