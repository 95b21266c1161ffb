"""DICOM round trip: what is written reads back the same with SimpleITK and pydicom."""

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import CTImageStorage

from femursr.dicomio import read_ct_series_pydicom, write_ct_series
from femursr.geometry import rotation_matrix


@pytest.fixture
def oblique_series(tmp_path):
    rng = np.random.default_rng(3)
    vol = np.round(rng.uniform(-1000, 2500, size=(12, 20, 17))).astype(np.float32)
    spacing = (0.7, 0.9, 1.3)
    origin = (-12.5, 30.25, 101.0)
    direction = rotation_matrix([1, 2, 0.5], np.deg2rad(17))
    paths = write_ct_series(
        vol, spacing, origin, direction, tmp_path / "series",
        patient_id="P01", series_description="round trip", uid_key="test/key",
    )  # fmt: skip
    return vol, spacing, origin, direction, tmp_path / "series", paths


def test_simpleitk_reads_back_array_and_geometry(oblique_series):
    vol, spacing, origin, direction, folder, _ = oblique_series
    reader = sitk.ImageSeriesReader()
    names = reader.GetGDCMSeriesFileNames(str(folder))
    assert len(names) == vol.shape[0]
    reader.SetFileNames(names)
    img = reader.Execute()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), vol)
    np.testing.assert_allclose(img.GetSpacing(), spacing, atol=1e-6)
    np.testing.assert_allclose(img.GetOrigin(), origin, atol=1e-5)
    np.testing.assert_allclose(np.reshape(img.GetDirection(), (3, 3)), direction, atol=1e-7)


def test_pydicom_reads_back_array_and_geometry(oblique_series):
    vol, spacing, origin, direction, folder, _ = oblique_series
    hu, sp, org, dr = read_ct_series_pydicom(folder)
    np.testing.assert_array_equal(hu, vol)
    np.testing.assert_allclose(sp, spacing, atol=1e-6)
    np.testing.assert_allclose(org, origin, atol=1e-5)
    np.testing.assert_allclose(dr, direction, atol=1e-7)


def test_tags_and_uids_are_consistent(oblique_series, tmp_path):
    *_, folder, paths = oblique_series
    dss = [pydicom.dcmread(p) for p in paths]
    assert {d.SOPClassUID for d in dss} == {CTImageStorage}
    assert {d.file_meta.MediaStorageSOPClassUID for d in dss} == {CTImageStorage}
    assert len({d.SeriesInstanceUID for d in dss}) == 1
    assert len({d.StudyInstanceUID for d in dss}) == 1
    assert len({d.FrameOfReferenceUID for d in dss}) == 1
    assert len({d.SOPInstanceUID for d in dss}) == len(dss)
    assert all(d.SOPInstanceUID == d.file_meta.MediaStorageSOPInstanceUID for d in dss)
    assert all(pydicom.uid.UID(d.SOPInstanceUID).is_valid and pydicom.uid.UID(d.SeriesInstanceUID).is_valid for d in dss)
    assert [d.InstanceNumber for d in dss] == list(range(1, len(dss) + 1))
    assert all(d.Modality == "CT" and float(d.RescaleSlope) == 1 and float(d.RescaleIntercept) == -1024 for d in dss)
    # deterministic: the same key gives the same UIDs
    vol = np.zeros((2, 4, 4), np.float32)
    a = write_ct_series(vol, (1, 1, 1), (0, 0, 0), np.eye(3), tmp_path / "a", patient_id="P", series_description="x", uid_key="k")
    b = write_ct_series(vol, (1, 1, 1), (0, 0, 0), np.eye(3), tmp_path / "b", patient_id="P", series_description="x", uid_key="k")
    assert [pydicom.dcmread(p).SOPInstanceUID for p in a] == [pydicom.dcmread(p).SOPInstanceUID for p in b]


def test_out_of_range_values_are_refused_and_nothing_written(tmp_path):
    vol = np.full((2, 4, 4), 40000, np.float32)
    with pytest.raises(ValueError, match="int16"):
        write_ct_series(vol, (1, 1, 1), (0, 0, 0), np.eye(3), tmp_path / "bad", patient_id="P", series_description="x", uid_key="k")
    assert list(tmp_path.iterdir()) == []
