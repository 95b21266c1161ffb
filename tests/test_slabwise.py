"""Slab-wise paths (for paper-scale volumes) give what the one-shot paths give, on small volumes.

Each slab-wise function is run with slabs of a few slices and compared with the same function
run in one piece (or with the plain numpy / SimpleITK operation it stands for).
"""

import json

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage as ndi

from femursr import phantom
from femursr import registration as reg
from femursr.geometry import rotation_matrix
from femursr.imaging import import_scan, import_to_file
from femursr.normalize import NormalizationError, normalize, normalize_to_file
from femursr.volume import Volume, VolumeWriter, read_slab, read_volume, take_plane, value_range, write_volume

from conftest import small_synthetic
from test_imaging import hu_volume, write_isq, write_series

GEOMETRY = dict(spacing=(0.5, 0.6, 0.7), origin=(1.0, -2.0, 3.5), direction=rotation_matrix([1, 1, 0], 0.3))


def _smooth_random(shape, seed=0, scale=1000.0):
    a = ndi.gaussian_filter(np.random.default_rng(seed).standard_normal(shape), 2.0)
    return (scale * a / a.std()).astype(np.float32)


# ------------------------------------------------------------------------------- volume I/O
@pytest.mark.parametrize("dtype", [np.float32, np.uint8, np.int16])
def test_volume_writer_writes_the_file_write_volume_writes(tmp_path, dtype):
    a = (np.random.default_rng(1).random((9, 6, 7)) * 100).astype(dtype)
    v = Volume(a, **GEOMETRY)
    write_volume(v, tmp_path / "whole.nii")
    with VolumeWriter(tmp_path / "slabs.nii", a.shape, dtype, v.spacing, v.origin, v.direction) as w:
        w[0] = a[0]
        w[1:5] = a[1:5]
        w[5:] = a[5:]
    assert (tmp_path / "slabs.nii").read_bytes() == (tmp_path / "whole.nii").read_bytes()
    r = read_volume(tmp_path / "slabs.nii")
    assert isinstance(r.array, np.memmap) and r.same_grid(v, atol=1e-6)
    np.testing.assert_array_equal(r.array, a)
    np.testing.assert_array_equal(w.array, a)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slabs.nii", "whole.nii"]


def test_volume_writer_leaves_nothing_on_error_or_missing_slices(tmp_path):
    with pytest.raises(OSError, match="simulated"):
        with VolumeWriter(tmp_path / "v.nii", (4, 3, 2), np.float32, (1, 1, 1), (0, 0, 0)) as w:
            w[0:2] = 1.0
            raise OSError("simulated")
    with pytest.raises(RuntimeError, match="1 slices never written"):
        with VolumeWriter(tmp_path / "v.nii", (4, 3, 2), np.float32, (1, 1, 1), (0, 0, 0)) as w:
            w[0:2] = 1.0
            w[3] = 2.0
    with pytest.raises(ValueError, match="uncompressed .nii"):
        VolumeWriter(tmp_path / "v.nii.gz", (4, 3, 2), np.float32, (1, 1, 1), (0, 0, 0))
    assert list(tmp_path.iterdir()) == []


def test_slab_reads_of_a_memory_map_equal_numpy(tmp_path):
    a = _smooth_random((11, 8, 9), seed=2)
    a[4, 2, 3] = 5000.0
    v = read_volume(write_volume(Volume(a, **GEOMETRY), tmp_path / "v.nii"))
    assert isinstance(v.array, np.memmap)
    s = read_slab(v.array, 3, 7)
    np.testing.assert_array_equal(s, a[3:7])
    s[:] = 0  # a copy: the file is untouched
    np.testing.assert_array_equal(v.array[3:7], a[3:7])
    assert value_range(v.array, slab_voxels=100) == (float(a.min()), 5000.0)
    for axis, index in ((0, 4), (1, 2), (2, 8)):
        np.testing.assert_array_equal(take_plane(v.array, axis, index, slab_voxels=100), np.take(a, index, axis=axis))


# ---------------------------------------------------------------------------- HR rendering
def test_render_hr_in_slabs_equals_one_slab(tmp_path):
    syn = small_synthetic(scale=0.3, voxel=0.3)["synthetic"]
    subj = phantom.draw_subject(syn, 3, 1, "S001")
    shape, spacing, origin = phantom.hr_grid(subj, syn)
    whole = phantom.render_hr(subj, syn, phantom.subject_rng(3, 1), slab_voxels=10**9)
    plane = shape[1] * shape[2]
    slabs = phantom.render_hr(subj, syn, phantom.subject_rng(3, 1), slab_voxels=5 * plane)  # 5 slices per slab
    with VolumeWriter(tmp_path / "hr.nii", shape, np.float32, spacing, origin) as w:
        streamed = phantom.render_hr(subj, syn, phantom.subject_rng(3, 1), image_out=w, slab_voxels=7 * plane)
    assert whole[0].shape == shape and shape[0] > 20
    assert (whole[1].array == 2).sum() > 1000, "the test volume must hold trabecular bone"
    for a, b, c in zip(whole, slabs, streamed):
        np.testing.assert_array_equal(b.array, a.array)
        np.testing.assert_array_equal(c.array, a.array)
    np.testing.assert_array_equal(read_volume(tmp_path / "hr.nii").array, whole[0].array)


# ------------------------------------------------------------------------------ registration
@pytest.fixture(scope="module")
def lr_and_hr_grid():
    """A smooth random LR (1 x 1 x 0.8 mm) and a finer, rotated HR grid (0.35 mm) that reaches
    past the LR's field of view on one side, with the rigid transform between them."""
    lr = Volume(_smooth_random((30, 34, 32), seed=4), (1.0, 1.0, 0.8), (-16.0, -17.0, -12.0))
    hr = Volume(np.zeros((64, 50, 56), np.float32), (0.35, 0.35, 0.35), (-9.0, -8.0, -10.0), rotation_matrix([0.2, 1, 0.3], 0.4))
    t = sitk.Euler3DTransform()
    t.SetRotation(0.1, -0.2, 0.15)
    t.SetTranslation((2.0, -1.5, 3.0))
    return lr, hr, t


@pytest.mark.parametrize("interpolator, atol", [("bspline", 1e-3), ("linear", 1e-3), ("nearest", 0.0)])
def test_resample_onto_in_slabs_equals_one_shot(lr_and_hr_grid, tmp_path, interpolator, atol):
    lr, hr, t = lr_and_hr_grid
    whole = reg.resample_onto(lr, hr, t, interpolator=interpolator, slab_voxels=10**9).array
    assert (whole == -1000.0).mean() > 0.05 and (whole != -1000.0).mean() > 0.5, "the grid must reach past the LR"
    slabs = reg.resample_onto(lr, hr, t, interpolator=interpolator, slab_voxels=3 * 50 * 56).array
    np.testing.assert_allclose(slabs, whole, rtol=0, atol=atol)
    np.testing.assert_array_equal(slabs == -1000.0, whole == -1000.0)
    with VolumeWriter(tmp_path / "lr.nii", hr.shape, np.float32, hr.spacing, hr.origin, hr.direction) as w:
        streamed = reg.resample_onto(lr, hr, t, interpolator=interpolator, out=w, slab_voxels=3 * 50 * 56)
    np.testing.assert_array_equal(streamed.array, slabs)
    assert read_volume(tmp_path / "lr.nii").same_grid(hr)


def test_work_image_in_slabs_equals_one_bin_shrink():
    hr = Volume(_smooth_random((47, 20, 23), seed=5), (0.2, 0.2, 0.2), (3.0, 1.0, -4.0), rotation_matrix([1, 0, 1], 0.2))
    one = sitk.BinShrink(reg._image(hr), [2, 2, 2])  # round(0.5 / 0.2) = 2 voxels per bin
    slabs = reg._work_image(hr, 0.5, slab_voxels=4 * 20 * 23)
    assert slabs.GetSize() == one.GetSize() == (11, 10, 23)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(slabs), sitk.GetArrayFromImage(one))
    assert slabs.GetOrigin() == one.GetOrigin() and slabs.GetSpacing() == one.GetSpacing()
    assert slabs.GetDirection() == one.GetDirection()


def test_qc_figure_from_the_lr_resamples_the_slices_of_the_whole_grid(lr_and_hr_grid, tmp_path):
    lr, hr, t = lr_and_hr_grid
    whole = reg.resample_onto(lr, hr, t, interpolator="linear").array
    moving = reg._image(lr)
    for axis, index in ((0, 30), (1, 20), (2, 5)):
        start, size = [0, 0, 0], list(hr.shape[::-1])
        start[2 - axis], size[2 - axis] = index, 1
        plane = np.take(reg._resample_grid(moving, hr, start, size, t, "linear", -1000.0), 0, axis=axis)
        np.testing.assert_allclose(plane, np.take(whole, index, axis=axis), rtol=0, atol=1e-3)
    femur = Volume((np.abs(whole) < 300).astype(np.uint8)[::2, ::2, ::2], [2 * s for s in hr.spacing], hr.origin, hr.direction)
    result = reg.RegistrationResult(t, -0.5, 0.9, {}, {"subject": "S01"}, 0.4, femur)
    paths = [tmp_path / n for n in ("t.tfm", "qc.json", "qc.png")]
    with pytest.raises(ValueError, match="lr_resampled .* or lr"):
        reg.write_registration_outputs(result, *paths, hr)
    assert list(tmp_path.iterdir()) == []
    reg.write_registration_outputs(result, *paths, hr, lr=lr)
    assert all(p.stat().st_size > 0 for p in paths)
    assert json.loads(paths[1].read_text())["subject"] == "S01"


# ----------------------------------------------------------------------------- normalization
def test_normalize_to_file_equals_normalize(tmp_path):
    vol = read_volume(write_volume(Volume(_smooth_random((13, 9, 10), seed=6), **GEOMETRY), tmp_path / "v.nii"))
    mask = read_volume(write_volume(Volume((_smooth_random((13, 9, 10), seed=7) > 0).astype(np.uint8), **GEOMETRY), tmp_path / "m.nii"))
    want = normalize(vol, (-200, 1800), mask).array
    got = normalize_to_file(vol, (-200, 1800), mask, tmp_path / "out.nii", slab_voxels=2 * 9 * 10)
    np.testing.assert_array_equal(got.array, want)
    np.testing.assert_array_equal(read_volume(tmp_path / "out.nii").array, want)
    assert 0 < (want > 0).mean() < 1
    empty = Volume(np.zeros((13, 9, 10), np.uint8), **GEOMETRY)
    with pytest.raises(NormalizationError, match="S01: the femur mask is empty"):
        normalize_to_file(vol, (0, 1), empty, tmp_path / "empty.nii", label="S01", slab_voxels=2 * 9 * 10)
    assert not (tmp_path / "empty.nii").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------------------------ import
def test_streamed_import_equals_the_import_in_memory(tmp_path):
    vol = hu_volume(nz=12)
    write_series(tmp_path / "lr", vol)
    z, y, x = np.meshgrid(np.arange(5), np.arange(6), np.arange(7), indexing="ij")
    isq = write_isq(tmp_path / "hr.isq", (1000 * z + 100 * y + x).astype(np.int16), mu_scaling=8192, mu_water=0.2409)
    for scan, name in ((tmp_path / "lr", "lr"), (isq, "hr")):
        in_memory = import_scan(scan, label=name)
        streamed = import_to_file(scan, tmp_path / "out" / f"{name}.nii", tmp_path / "out" / f"{name}.json", label=name)
        assert isinstance(streamed.array, np.memmap) and not isinstance(in_memory.array, np.memmap)
        np.testing.assert_array_equal(streamed.array, in_memory.array)
        assert streamed.same_grid(in_memory, atol=1e-9)
        assert json.loads((tmp_path / "out" / f"{name}.json").read_text()) == json.loads(json.dumps(in_memory.meta))
    np.testing.assert_array_equal(read_volume(tmp_path / "out" / "lr.nii").array, vol)
