"""The nnunet bone-structure backend (femursr.bonemask with femursr.nnunet, label bone): the
prediction is cropped to the femur and pasted back exactly, training labels come from the truth
or the HR's threshold, the dataset is labelled bone, and an nnU-Net trained on small HR-like
volumes segments an unseen one."""

import json
import time

import numpy as np
import pytest
from scipy import ndimage as ndi

from femursr import nnunet
from femursr.bonemask import (
    BoneThreshold,
    bone_segmenter,
    nnunet_bone_mask,
    threshold_bone_mask,
    training_bone_label,
)
from femursr.volume import Volume, crop, nonzero_box


def _oblique(array, spacing=(0.2, 0.25, 0.3)):
    """A volume on an oblique grid (so that the crop's origin must follow the direction)."""
    c, s = np.cos(0.3), np.sin(0.3)
    return Volume(array, spacing, (10.0, -4.0, 7.0), (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))


def _trabecular(shape, seed, sigma=2.0, bvtv=0.3):
    rng = np.random.default_rng(seed)
    a = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return a > np.quantile(a, 1 - bvtv)


class ThresholdOracle:
    """Stands in for nnU-Net's predictor: bone probability = 1 where the intensity exceeds 0.5.
    Records what it was given."""

    def __init__(self):
        self.dataset_json = {"labels": {"background": 0, "bone": 1}}
        self.calls = []

    def predict_single_npy_array(self, data, props, seg_prev, out_file, return_probs):
        self.calls.append((data.shape, props))
        fg = (data[0] > 0.5).astype(np.float32)
        return fg.astype(np.uint8), np.stack([1 - fg, fg])


def test_crop_keeps_physical_positions():
    vol = _oblique(np.arange(8 * 9 * 10, dtype=np.float32).reshape(8, 9, 10))
    box = (slice(2, 6), slice(3, 9), slice(1, 4))
    part = crop(vol, box)
    assert part.shape == (4, 6, 3) and part.spacing == vol.spacing and part.direction == vol.direction
    # voxel (x=0, y=0, z=0) of the crop is voxel (x=1, y=3, z=2) of the volume, at the same place
    assert np.allclose(part.index_to_physical(np.array([0.0, 0.0, 0.0])), vol.index_to_physical(np.array([1.0, 3.0, 2.0])))
    assert part.array[0, 0, 0] == vol.array[2, 3, 1]


def test_nonzero_box_is_the_bounding_box_with_margin_clipped():
    f = np.zeros((10, 12, 14), np.uint8)
    f[3:5, 0:4, 9:14] = 1
    assert nonzero_box(_oblique(f).array, 2) == (slice(1, 7), slice(0, 6), slice(7, 14))
    assert nonzero_box(np.zeros_like(f)) is None


def test_nnunet_bone_mask_predicts_on_the_femur_box_and_stays_inside_the_femur():
    shape = (20, 24, 28)
    bone = _trabecular(shape, 0)
    image = np.where(bone, 0.8, 0.2).astype(np.float32)
    femur = np.zeros(shape, np.uint8)
    femur[4:15, 5:19, 6:22] = ndi.binary_erosion(np.ones((11, 14, 16)), iterations=1)
    vol, fem = _oblique(image), _oblique(femur)
    oracle = ThresholdOracle()
    mask = nnunet_bone_mask(oracle, vol, fem, label="S001 HR")
    assert mask.same_grid(vol) and mask.array.dtype == np.uint8
    assert np.array_equal(mask.array, (bone & (femur > 0)).astype(np.uint8))
    (data_shape, props), = oracle.calls
    assert data_shape == (1, 13, 16, 18)  # the femur's box (9 x 12 x 14 after the erosion), 2 voxels each side
    assert props["spacing"] == [0.3, 0.25, 0.2]  # nnU-Net's (z, y, x)


def test_nnunet_bone_mask_errors_and_empty_femur():
    vol = _oblique(np.full((6, 6, 6), 0.7, np.float32))
    oracle = ThresholdOracle()
    empty = nnunet_bone_mask(oracle, vol, vol.with_array(np.zeros((6, 6, 6), np.uint8)))
    assert not empty.array.any() and not oracle.calls
    with pytest.raises(ValueError, match="S002 SR: the volume .* and the femur mask .* are not on the same grid"):
        nnunet_bone_mask(oracle, vol, _oblique(np.ones((6, 6, 7), np.uint8)), label="S002 SR")
    bad = vol.array.copy()
    bad[3, 3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        nnunet_bone_mask(oracle, vol.with_array(bad), vol.with_array(np.ones((6, 6, 6), np.uint8)))
    oracle.dataset_json = {"labels": {"background": 0, "femur": 1}}
    with pytest.raises(ValueError, match="no label bone"):
        nnunet_bone_mask(oracle, vol, vol.with_array(np.ones((6, 6, 6), np.uint8)))


def test_training_labels_from_truth_and_threshold():
    shape = (12, 14, 16)
    tissue = np.zeros(shape, np.uint8)
    tissue[2:10, 2:12, 2:14] = 1  # marrow
    tissue[4:6] = 2  # trabecular plate
    tissue[2:10, 2:4, 2:14] = 3  # cortex
    femur = (tissue > 0).astype(np.uint8)
    femur[8:10] = 0  # the femur mask may be smaller than the tissue
    hr = _oblique(np.where(tissue >= 2, 0.9, 0.1).astype(np.float32))
    truth = training_bone_label("truth", hr, hr.with_array(femur), hr.with_array(tissue))
    assert np.array_equal(truth.array, ((tissue >= 2) & (femur > 0)).astype(np.uint8))
    params = BoneThreshold(sigma_mm=0.0, threshold=0.5)
    thr = training_bone_label("threshold", hr, hr.with_array(femur), params=params)
    assert np.array_equal(thr.array, threshold_bone_mask(hr, hr.with_array(femur), params).array)
    assert np.array_equal(thr.array, truth.array)  # a clean image: both agree
    with pytest.raises(ValueError, match="truth labels need the synthetic tissue map"):
        training_bone_label("truth", hr, hr.with_array(femur))
    with pytest.raises(ValueError, match="not on the HR grid"):
        training_bone_label("truth", hr, hr.with_array(femur), _oblique(tissue[:, :, :15]))
    with pytest.raises(ValueError, match="unknown bone label source 'manual'"):
        training_bone_label("manual", hr, hr.with_array(femur))


def test_bone_segmenter_dispatches_and_names_what_is_missing():
    vol = _oblique(np.where(_trabecular((10, 10, 10), 1), 0.8, 0.2).astype(np.float32))
    femur = vol.with_array(np.ones((10, 10, 10), np.uint8))
    seg = bone_segmenter({"backend": "threshold", "sigma_mm": 0.0, "threshold": 0.5})
    assert np.array_equal(seg(vol, femur, "x").array, threshold_bone_mask(vol, femur, BoneThreshold(0.0, 0.5)).array)
    with pytest.raises(ValueError, match="needs the folder of a trained bone model"):
        bone_segmenter({"backend": "nnunet", "nnunet": {"fold": 0, "device": "cpu", "mirroring": False}})
    with pytest.raises(ValueError, match="unknown bone-mask backend 'otsu'"):
        bone_segmenter({"backend": "otsu"})


def test_dataset_is_labelled_bone_at_native_spacing(tmp_path):
    cases = []
    for i in (1, 2):
        b = _trabecular((8, 10, 12), i)
        img = _oblique(np.where(b, 0.8, 0.2).astype(np.float32))
        cases.append((f"S00{i}", img, img.with_array(b.astype(np.uint8))))
    folder = nnunet.assemble_dataset(cases, tmp_path, 502, "FemurBone", spacing_mm=None, label="bone")
    meta = json.loads((folder / "dataset.json").read_text())
    assert folder.name == "Dataset502_FemurBone"
    assert meta["labels"] == {"background": 0, "bone": 1} and meta["channel_names"] == {"0": "CT"}
    import SimpleITK as sitk

    lab = sitk.ReadImage(str(folder / "labelsTr" / "S001.nii.gz"))
    assert lab.GetSize() == (12, 10, 8) and np.allclose(lab.GetSpacing(), (0.2, 0.25, 0.3))
    with pytest.raises(ValueError, match="nnU-Net label 'background'"):
        nnunet.assemble_dataset(cases, tmp_path, 503, "X", label="background")
    empty = [(c, img, m.with_array(np.zeros(m.shape, np.uint8))) for c, img, m in cases]
    with pytest.raises(ValueError, match="case S001: the bone mask is empty"):
        nnunet.assemble_dataset(empty, tmp_path, 504, "Y", spacing_mm=None, label="bone")
    assert not (tmp_path / "nnUNet_raw" / "Dataset504_Y").exists()


# ------------------------------------------------------------------------------ end to end
# Measured here: 4 volumes of 40^3, nnU-Net 2d for 2 x 30 iterations on one CPU thread: about
# 30 s, Dice 0.87 on an unseen volume (the best of three global thresholds: 0.875).
def _hr_like(seed, n=40, sigma=1.5, noise=0.08):
    """An HR-like normalized volume: a trabecular structure (label) blurred like a scanner's PSF,
    with noise, inside a cylinder standing for the femur."""
    rng = np.random.default_rng(seed)
    bone = _trabecular((n, n, n), seed, sigma=2.5, bvtv=0.3)
    z, y, x = np.indices((n, n, n))
    femur = ((y - n / 2) ** 2 + (x - n / 2) ** 2 < (0.45 * n) ** 2).astype(np.uint8)
    bone &= femur > 0
    img = ndi.gaussian_filter(np.where(bone, 0.8, 0.15).astype(np.float32), sigma) + noise * rng.standard_normal((n, n, n))
    img = np.clip(img, 0, 1).astype(np.float32) * femur
    vol = _oblique(img, (0.1, 0.1, 0.1))
    return vol, vol.with_array(femur), bone


def test_a_bone_model_trained_on_hr_like_volumes_segments_an_unseen_one(tmp_path, torch_one_thread):
    t0 = time.perf_counter()
    cases = []
    for i in range(1, 5):
        vol, femur, bone = _hr_like(i)
        cases.append((f"S00{i}", vol, vol.with_array(bone.astype(np.uint8))))
    nnunet.assemble_dataset(cases, tmp_path, 502, "FemurBone", spacing_mm=None, label="bone")
    nnunet.plan_and_preprocess(tmp_path, 502, "2d", num_processes=1)
    model = nnunet.train(tmp_path, 502, "2d", 0, epochs=2, iterations_per_epoch=30, val_iterations=1,
                         device="cpu", augmentation_processes=0, seed=0)  # fmt: skip
    t1 = time.perf_counter()
    opts = {"backend": "nnunet", "nnunet": {"fold": 0, "device": "cpu", "mirroring": False}}
    segment = bone_segmenter(opts, model)
    vol, femur, bone = _hr_like(9)
    mask = segment(vol, femur, "unseen")
    d = nnunet.dice(mask.array, bone)
    # the classical route on the same blurred, noisy volume, with its best threshold
    d_thr = max(nnunet.dice(threshold_bone_mask(vol, femur, BoneThreshold(0.05, t)).array, bone) for t in (0.35, 0.45, 0.55))
    print(f"bone nnU-Net: trained in {t1 - t0:.0f} s, Dice on an unseen volume {d:.3f} (best threshold {d_thr:.3f})")
    assert mask.same_grid(vol) and not (mask.array & (femur.array == 0)).any()
    assert d > 0.8
    with pytest.raises(ValueError, match="has no label 'bone'"):
        femur_model = tmp_path / "femur_model"
        femur_model.mkdir()
        for f in ("plans.json", "fold_0"):
            src = model / f
            (femur_model / f).symlink_to(src)
        ds = json.loads((model / "dataset.json").read_text())
        ds["labels"] = {"background": 0, "femur": 1}
        (femur_model / "dataset.json").write_text(json.dumps(ds))
        bone_segmenter(opts, femur_model)
