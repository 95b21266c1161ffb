"""Accuracy measures against the synthetic truth: TRE and Dice on cases with known answers."""

import numpy as np
import pytest
import SimpleITK as sitk

from femursr.validation import mask_dice, registration_error, transform_points
from femursr.volume import Volume, write_volume


@pytest.fixture
def cube_mask(tmp_path):
    a = np.zeros((10, 12, 14), np.uint8)
    a[2:8, 3:9, 4:10] = 1
    return write_volume(Volume(a, (0.5, 0.5, 0.5), (10, 20, 30)), tmp_path / "m.nii.gz")


def test_tre_of_a_pure_translation_is_its_length(cube_mask):
    true = sitk.Euler3DTransform()
    est = sitk.Euler3DTransform()
    est.SetTranslation((0.3, 0.4, 0.0))
    r = registration_error(est, true, cube_mask)
    assert r["tre_mean_mm"] == pytest.approx(0.5) and r["tre_max_mm"] == pytest.approx(0.5)
    assert registration_error(true, true, cube_mask)["tre_max_mm"] == 0.0


def test_tre_of_a_rotation_grows_with_distance_from_the_centre(cube_mask):
    est = sitk.Euler3DTransform()
    est.SetRotation(0, 0, np.deg2rad(1.0))
    pts = np.array([[0.0, 0.0, 0.0], [100.0, 0.0, 0.0]])
    moved = transform_points(est, pts)
    np.testing.assert_allclose(np.linalg.norm(moved - pts, axis=1), [0.0, 2 * 100 * np.sin(np.deg2rad(0.5))], atol=1e-9)



def test_transforms_read_back_from_files_give_the_same_points(tmp_path):
    est = sitk.Euler3DTransform((1.0, 2.0, 3.0), 0.1, -0.2, 0.3, (4.0, -5.0, 6.0))
    sitk.WriteTransform(est, str(tmp_path / "t.tfm"))
    generic = sitk.ReadTransform(str(tmp_path / "t.tfm"))
    pts = np.random.default_rng(0).uniform(-50, 50, size=(100, 3))
    np.testing.assert_allclose(transform_points(generic, pts), transform_points(est, pts), atol=1e-9)
    np.testing.assert_allclose(transform_points(est, pts[:1])[0], est.TransformPoint(pts[0].tolist()), atol=1e-9)


def test_mask_dice(tmp_path, cube_mask):
    a = np.zeros((10, 12, 14), np.uint8)
    a[2:8, 3:9, 4:7] = 1  # half of the cube
    half = write_volume(Volume(a, (0.5, 0.5, 0.5), (10, 20, 30)), tmp_path / "h.nii.gz")
    assert mask_dice(cube_mask, cube_mask) == 1.0
    assert mask_dice(half, cube_mask) == pytest.approx(2 * 108 / (108 + 216))
