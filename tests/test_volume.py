"""Volumes keep their geometry through storage, and uncompressed ones come back memory-mapped."""

import numpy as np
import pytest

from femursr.geometry import rotation_matrix
from femursr.volume import Volume, read_volume, write_volume


@pytest.mark.parametrize("name", ["v.nii", "v.nii.gz"])
def test_round_trip_keeps_array_and_geometry(tmp_path, name):
    a = np.random.default_rng(0).random((5, 6, 7)).astype(np.float32)
    v = Volume(a, (0.5, 0.6, 0.7), (1, -2, 3.5), rotation_matrix([1, 1, 0], 0.3))
    r = read_volume(write_volume(v, tmp_path / name))
    np.testing.assert_array_equal(r.array, a)
    np.testing.assert_allclose(r.spacing, v.spacing, atol=1e-6)
    np.testing.assert_allclose(r.origin, v.origin, atol=1e-6)
    np.testing.assert_allclose(r.direction, v.direction, atol=1e-6)
    assert isinstance(r.array, np.memmap) == (name == "v.nii")


def test_index_and_physical_points_are_inverse():
    v = Volume(np.zeros((4, 5, 6)), (0.5, 0.6, 0.7), (10, 20, 30), rotation_matrix([0, 1, 1], 0.7))
    ijk = np.array([[1.0, 2.0, 3.0], [0.5, 0.0, 2.5]])
    np.testing.assert_allclose(v.physical_to_index(v.index_to_physical(ijk)), ijk, atol=1e-12)
    img = v.to_sitk()
    np.testing.assert_allclose(v.index_to_physical(ijk[0]), img.TransformContinuousIndexToPhysicalPoint(ijk[0].tolist()))


def test_bad_extension_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match=".nii"):
        write_volume(Volume(np.zeros((2, 2, 2)), (1, 1, 1), (0, 0, 0)), tmp_path / "x.mha")
    with pytest.raises(FileNotFoundError, match="not found"):
        read_volume(tmp_path / "nope.nii")
