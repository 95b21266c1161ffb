"""Image quality metrics against scikit-image and against known behaviour."""

import numpy as np
import pytest
import torch
import torchvision
from scipy import ndimage as ndi
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from femursr.quality import LpipsUnavailable, femur_slices, gssim, load_lpips, lpips_slices, psnr, ssim, volume_quality


def textured(shape=(64, 80), seed=0):
    rng = np.random.default_rng(seed)
    return np.clip(ndi.gaussian_filter(rng.random(shape), 2) * 2 - 0.5, 0, 1)


def test_ssim_and_psnr_equal_scikit_image():
    x = textured()
    y = np.clip(x + np.random.default_rng(1).normal(0, 0.05, x.shape), 0, 1)
    ref = structural_similarity(x, y, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    assert ssim(x, y) == pytest.approx(ref, rel=1e-10)
    assert psnr(x, y) == pytest.approx(peak_signal_noise_ratio(x, y, data_range=1.0), rel=1e-12)
    assert ssim(x, x) == pytest.approx(1.0)
    assert psnr(x, x) == float("inf")


def test_gssim_is_one_for_identical_slices_and_falls_with_blur():
    x = textured()
    assert gssim(x, x) == pytest.approx(1.0)
    values = [gssim(x, ndi.gaussian_filter(x, s)) for s in (0.5, 1.0, 1.5, 2.0, 3.0, 4.0)]
    assert all(a > b for a, b in zip(values, values[1:])), values
    assert values[-1] < 0.8


def test_slice_smaller_than_the_window_is_refused():
    with pytest.raises(ValueError, match="window"):
        ssim(np.zeros((8, 8)), np.zeros((8, 8)))


def test_volume_quality_averages_over_femur_slices_only():
    ref = np.stack([textured(seed=i) for i in range(6)])
    pred = ref.copy()
    pred[1] = ndi.gaussian_filter(ref[1], 2)
    mask = np.zeros(ref.shape, bool)
    mask[1:3, 10:50, 10:50] = True
    q = volume_quality(pred, ref, mask)
    assert q["slices"] == 2
    assert q["ssim"] == pytest.approx((ssim(pred[1], ref[1]) + 1.0) / 2)
    with pytest.raises(ValueError, match="empty"):
        femur_slices(np.zeros((3, 4, 4), bool))


def test_lpips_loads_a_backbone_the_test_creates_and_fails_clearly_without(tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "alexnet-test.pth"
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), weights)
    model = load_lpips(tmp_path)  # a folder holding alexnet-*.pth
    x = np.stack([textured(seed=i) for i in range(2)]).astype(np.float32)
    same = lpips_slices(model, x, x)
    diff = lpips_slices(model, x, np.clip(x + 0.3, 0, 1).astype(np.float32))
    assert np.allclose(same, 0, atol=1e-6) and (diff > 0).all()
    with pytest.raises(LpipsUnavailable, match="no backbone weights"):
        load_lpips(None)
    with pytest.raises(LpipsUnavailable, match="no backbone weights at"):
        load_lpips(tmp_path / "missing")
    bad = tmp_path / "bad.pth"
    torch.save({"weight": torch.zeros(3)}, bad)
    with pytest.raises(LpipsUnavailable, match="not a torchvision AlexNet"):
        load_lpips(bad)


def test_quality_record_and_table():
    from femursr.quality import LPIPS_UNAVAILABLE, quality_record, quality_table
    from femursr.volume import Volume

    ref = np.stack([textured(seed=i) for i in range(4)]).astype(np.float32)
    mask = np.ones(ref.shape, np.uint8)
    hr = Volume(ref, spacing=(0.2, 0.2, 0.2), origin=(0.0, 0.0, 0.0))
    rows = []
    for s in ("S001", "S002"):
        rows.append(quality_record(hr.with_array(ndi.gaussian_filter(ref, 1.5)), hr, hr.with_array(mask), method="LR", subject=s))
        rows.append(quality_record(hr.with_array(ref * 0.98), hr, hr.with_array(mask), method="srgan_2d", subject=s, timing={"seconds": 2.0 + int(s[-1])}))
    table = quality_table(rows).set_index("method")
    assert list(table.index) == ["LR", "srgan_2d"]
    assert table.loc["srgan_2d", "ssim"] > table.loc["LR", "ssim"]
    assert table.loc["srgan_2d", "seconds_per_volume"] == pytest.approx(3.5)
    assert np.isnan(table.loc["LR", "seconds_per_volume"]) and np.isnan(table.loc["LR", "lpips"])
    assert table.loc["LR", "note"] == LPIPS_UNAVAILABLE
    shifted = Volume(ref, spacing=(0.2, 0.2, 0.2), origin=(5.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="subject S009: the LR volume is not on the HR grid"):
        quality_record(shifted, hr, hr.with_array(mask), method="LR", subject="S009")
