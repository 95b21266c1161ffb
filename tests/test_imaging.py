"""Scan import: DICOM series (selection, sorting, checks, resampling), NIfTI/MHA, Scanco ISQ,
and the atomic file output. Every series is written by the tests, so the answer is known."""

import json
import shutil
import struct

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from femursr import imaging
from femursr.dicomio import write_ct_series
from femursr.geometry import rotation_matrix
from femursr.imaging import ScanImportError, import_scan, import_to_file, read_isq_header
from femursr.volume import Volume, read_volume, write_volume

SPACING = (0.7, 0.9, 0.65)


def hu_volume(nz=10, ny=7, nx=6, seed=0):
    """Integer HU: a random in-plane pattern plus 10 HU per slice (linear along z)."""
    rng = np.random.default_rng(seed)
    plane = np.round(rng.uniform(-1000, 2000, size=(ny, nx)))
    return (plane[None] + 10.0 * np.arange(nz)[:, None, None]).astype(np.float32)


def write_series(
    folder, vol, *, spacing=SPACING, origin=(-12.5, 30.25, 9.15), direction=np.eye(3), key="a", number=1, description="LR", **kw
):
    paths = write_ct_series(
        vol, spacing, origin, direction, folder, patient_id="P01", series_description=description,
        uid_key=key, series_number=number, **kw,
    )  # fmt: skip
    return paths, str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)


def edit(path, **tags):
    ds = pydicom.dcmread(path)
    for k, v in tags.items():
        setattr(ds, k, v)
    ds.save_as(path)


def merge(dst, *folders):
    """Copy the files of several series folders into one folder (prefixed, so names differ)."""
    dst.mkdir()
    for i, f in enumerate(folders):
        for p in sorted(f.iterdir()):
            shutil.copy(p, dst / f"s{i}_{p.name}")
    return dst


# ------------------------------------------------------------------------------------------
# plain series


def test_oblique_series_round_trip_in_hu_with_geometry(tmp_path):
    vol = hu_volume()
    direction = rotation_matrix([1, 2, 0.5], np.deg2rad(17))
    origin = (-12.5, 30.25, 101.0)
    _, uid = write_series(tmp_path / "lr", vol, origin=origin, direction=direction)
    v = import_scan(tmp_path / "lr", label="subject S01 LR")
    assert v.array.dtype == np.float32
    np.testing.assert_array_equal(v.array, vol)
    np.testing.assert_allclose(v.spacing, SPACING, atol=1e-6)
    np.testing.assert_allclose(v.origin, origin, atol=1e-5)
    np.testing.assert_allclose(v.direction_matrix, direction, atol=1e-6)
    m = v.meta
    assert m["series_instance_uid"] == uid and m["modality"] == "CT" and m["format"] == "dicom"
    assert m["n_slices"] == 10 and m["selection"]["rule"] == "only" and m["other_series"] == []
    assert m["label"] == "subject S01 LR" and m["units"] == "HU" and m["resampled"] is False
    assert m["pixel_decoder"] == {"pydicom": 10} and m["warnings"] == []
    assert m["max_position_error_mm"] < 1e-4
    json.dumps(m, allow_nan=False)  # JSON-serializable as it is


def test_rescale_slope_and_intercept_of_each_slice_are_applied(tmp_path):
    vol = hu_volume()
    paths, _ = write_series(tmp_path / "lr", vol)
    edit(paths[2], RescaleSlope="2", RescaleIntercept="-3000")
    v = import_scan(tmp_path / "lr")
    expected = vol.copy()
    expected[2] = 2 * (vol[2] + 1024) - 3000  # stored = HU + 1024, read back with the new rescale
    np.testing.assert_array_equal(v.array, expected)
    assert {(r["slope"], r["intercept"], r["n_slices"]) for r in v.meta["rescale"]} == {(1.0, -1024.0, 9), (2.0, -3000.0, 1)}


def test_shuffled_file_order_is_sorted_by_position(tmp_path):
    vol = hu_volume(nz=9)
    paths, _ = write_series(tmp_path / "lr", vol)
    perm = np.random.default_rng(1).permutation(len(paths))
    for k, p in enumerate(paths):
        edit(p, InstanceNumber=int(perm[k]) + 1)  # instance numbers scrambled too
        p.rename(p.with_name(f"x{perm[k]:03d}.dcm"))
    assert sorted(p.name for p in (tmp_path / "lr").iterdir())[0] != "x000.dcm" or perm[0] != 0
    v = import_scan(tmp_path / "lr")
    np.testing.assert_array_equal(v.array, vol)
    np.testing.assert_allclose(v.origin, (-12.5, 30.25, 9.15), atol=1e-5)


def test_stack_written_head_to_feet_stays_in_place(tmp_path):
    """Slices written with decreasing z: the volume is ordered along the slice normal (+z), and
    every voxel keeps its physical position."""
    vol = hu_volume(nz=6)
    origin = np.array([-12.5, 30.25, 9.15])
    write_series(tmp_path / "lr", vol, origin=origin, direction=np.diag([1.0, 1.0, -1.0]))
    v = import_scan(tmp_path / "lr")
    np.testing.assert_array_equal(v.array, vol[::-1])
    np.testing.assert_allclose(v.origin, origin - [0, 0, 5 * SPACING[2]], atol=1e-5)
    np.testing.assert_allclose(v.direction_matrix, np.eye(3), atol=1e-7)
    p = origin + [2 * SPACING[0], 3 * SPACING[1], -4 * SPACING[2]]  # voxel (x=2, y=3, z=4) as written
    i, j, k = np.round(v.physical_to_index(p)).astype(int)
    assert v.array[k, j, i] == vol[4, 3, 2]


# ------------------------------------------------------------------------------------------
# several series in one folder


@pytest.fixture
def three_series(tmp_path):
    """A folder with a CT series of 6 slices, one of 9, and an MR series of 12."""
    a, b, mr = hu_volume(nz=6, seed=1), hu_volume(nz=9, seed=2), hu_volume(nz=12, seed=3)
    _, uid_a = write_series(tmp_path / "a", a, key="a", number=2, description="soft")
    _, uid_b = write_series(tmp_path / "b", b, key="b", number=3, description="bone")
    _, uid_mr = write_series(tmp_path / "mr", mr, key="mr", number=4, description="t1", extra={"Modality": "MR"})
    folder = merge(tmp_path / "all", tmp_path / "a", tmp_path / "b", tmp_path / "mr")
    return folder, {"a": (uid_a, a), "b": (uid_b, b), "mr": (uid_mr, mr)}


def test_default_is_the_ct_series_with_most_slices(three_series):
    folder, s = three_series
    v = import_scan(folder, label="subject S02 LR")
    np.testing.assert_array_equal(v.array, s["b"][1])
    m = v.meta
    assert m["series_instance_uid"] == s["b"][0] and m["series_description"] == "bone"
    assert m["selection"]["rule"] == "most_slices" and "most slices" in m["selection"]["reason"]
    assert s["a"][0] in m["selection"]["reason"]  # names the runner-up
    assert {o["series_instance_uid"] for o in m["other_series"]} == {s["a"][0], s["mr"][0]}


def test_series_picked_by_uid_and_unknown_uid_lists_the_uids(three_series):
    folder, s = three_series
    v = import_scan(folder, series_uid=s["a"][0])
    np.testing.assert_array_equal(v.array, s["a"][1])
    assert v.meta["selection"]["rule"] == "series_uid"
    with pytest.raises(ScanImportError, match="no series 1.2.3 in the folder") as e:
        import_scan(folder, label="subject S02 LR", series_uid="1.2.3")
    msg = str(e.value)
    assert all(uid in msg for uid, _ in s.values()) and msg.startswith("subject S02 LR:") and str(folder) in msg


def test_non_ct_series_picked_by_uid_is_refused(three_series):
    folder, s = three_series
    with pytest.raises(ScanImportError, match=r"is MR, not CT"):
        import_scan(folder, series_uid=s["mr"][0])


def test_only_series_not_ct_is_refused(tmp_path):
    write_series(tmp_path / "mr", hu_volume(), extra={"Modality": "MR"})
    with pytest.raises(ScanImportError, match=r"the only series .* is MR, not CT"):
        import_scan(tmp_path / "mr", label="subject S03 LR")


def test_equal_slice_counts_are_a_warning_naming_both(tmp_path):
    _, uid_a = write_series(tmp_path / "a", hu_volume(nz=5, seed=1), key="a", number=7)
    _, uid_b = write_series(tmp_path / "b", hu_volume(nz=5, seed=2), key="b", number=3)
    v = import_scan(merge(tmp_path / "all", tmp_path / "a", tmp_path / "b"))
    assert v.meta["series_instance_uid"] == uid_b  # the lower SeriesNumber
    assert any(uid_a in w and uid_b in w and "give series_uid" in w for w in v.meta["warnings"])


def test_dicom_file_as_path_imports_its_series(three_series):
    folder, s = three_series
    v = import_scan(sorted(folder.glob("s0_*"))[3])  # a file of the 6-slice series
    assert v.meta["series_instance_uid"] == s["a"][0] and v.meta["selection"]["rule"] == "file"


# ------------------------------------------------------------------------------------------
# spacing, tilt, inconsistent slices


def test_missing_slice_refused_with_the_spacings_found(tmp_path):
    paths, uid = write_series(tmp_path / "lr", hu_volume())
    paths[5].unlink()  # slice at z = 9.15 + 5 * 0.65 = 12.40
    with pytest.raises(ScanImportError) as e:
        import_scan(tmp_path / "lr", label="subject S07 LR")
    msg = str(e.value)
    assert msg.startswith(f"subject S07 LR: series {uid} ('LR') has 2 slice spacings (0.65, 1.30 mm)")
    assert "a missing slice near z = 12.40 mm?" in msg and "allow_resample_nonuniform" in msg


def test_missing_slices_resampled_when_allowed(tmp_path):
    vol = hu_volume()
    paths, _ = write_series(tmp_path / "lr", vol)
    paths[5].unlink()
    paths[6].unlink()  # a gap of 3 spacings: slices 5 and 6 are interpolated at 1/3 and 2/3
    v = import_scan(tmp_path / "lr", allow_resample_nonuniform=True)
    assert v.shape == vol.shape
    np.testing.assert_allclose(v.spacing, SPACING, atol=1e-6)
    np.testing.assert_allclose(v.origin, (-12.5, 30.25, 9.15), atol=1e-5)
    # HU is linear along z, so the interpolated slices equal the ones removed; the others are copies
    np.testing.assert_allclose(v.array, vol, atol=1e-3)
    assert v.meta["resampled"] is True and v.meta["interpolated_slices"] == [5, 6]
    assert any("2 missing slices near z = 12.40, 13.05 mm?" in w and "resampled" in w for w in v.meta["warnings"])


def test_two_stacks_of_different_spacing_refused(tmp_path):
    paths, _ = write_series(tmp_path / "lr", hu_volume(nz=8))
    for k, p in enumerate(paths[4:], start=4):  # upper half: 1.0 mm apart instead of 0.65
        edit(p, ImagePositionPatient=[-12.5, 30.25, 9.15 + 3 * 0.65 + (k - 3) * 1.0])
    with pytest.raises(ScanImportError, match=r"2 slice spacings \(0.65, 1.00 mm\): the spacing changes near z ="):
        import_scan(tmp_path / "lr")


def test_gantry_tilt_refused_naming_the_tag(tmp_path):
    paths, _ = write_series(tmp_path / "lr", hu_volume())
    tilt = np.deg2rad(10.0)
    for k, p in enumerate(paths):  # table advances along z, slices stay axial: sheared stack
        edit(p, GantryDetectorTilt="10", ImagePositionPatient=[-12.5, 30.25 + k * 0.65 * np.tan(tilt), 9.15 + k * 0.65])
    with pytest.raises(ScanImportError, match=r"sheared against ImageOrientationPatient: they advance at 10.00 deg") as e:
        import_scan(tmp_path / "lr")
    assert "GantryDetectorTilt = 10 deg" in str(e.value) and "gantry tilt" in str(e.value)


def test_tilt_tag_with_consistent_positions_is_a_warning(tmp_path):
    paths, _ = write_series(tmp_path / "lr", hu_volume())
    for p in paths:
        edit(p, GantryDetectorTilt="12")
    v = import_scan(tmp_path / "lr")
    assert any("GantryDetectorTilt = 12 deg" in w for w in v.meta["warnings"])


@pytest.mark.parametrize(
    "tag,value",
    [
        ("PixelSpacing", ["0.8", "0.8"]),
        (
            "ImageOrientationPatient",
            [f"{x:.8f}" for x in (*rotation_matrix([0, 0, 1], 0.1)[:, 0], *rotation_matrix([0, 0, 1], 0.1)[:, 1])],
        ),
        ("Rows", None),
    ],
)
def test_inconsistent_slices_refused_naming_the_tag(tmp_path, tag, value):
    paths, _ = write_series(tmp_path / "lr", hu_volume())
    if tag == "Rows":
        ds = pydicom.dcmread(paths[3])
        edit(paths[3], Rows=ds.Rows - 1, PixelData=ds.PixelData[: (ds.Rows - 1) * ds.Columns * 2])
        tag = "Rows/Columns"
    else:
        edit(paths[3], **{tag: value})
    with pytest.raises(ScanImportError, match=f"{tag} differs across the 10 slices") as e:
        import_scan(tmp_path / "lr")
    assert paths[3].name in str(e.value)


def test_duplicate_slice_refused(tmp_path):
    paths, _ = write_series(tmp_path / "lr", hu_volume())
    shutil.copy(paths[4], paths[4].with_name("copy.dcm"))
    with pytest.raises(ScanImportError, match="1 pair of slices share a position"):
        import_scan(tmp_path / "lr")


def test_localizer_in_the_series_is_left_out(tmp_path):
    vol = hu_volume()
    paths, _ = write_series(tmp_path / "lr", vol)
    loc = paths[0].with_name("scout.dcm")
    shutil.copy(paths[0], loc)
    edit(
        loc,
        ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"],
        ImageOrientationPatient=["1", "0", "0", "0", "0", "-1"],
        SOPInstanceUID="1.2.3.4",
    )
    v = import_scan(tmp_path / "lr")
    np.testing.assert_array_equal(v.array, vol)
    assert v.meta["n_localizers_left_out"] == 1 and any("localizer" in w for w in v.meta["warnings"])


def test_pixel_data_pydicom_cannot_decode_is_read_by_simpleitk(tmp_path, monkeypatch):
    vol = hu_volume(nz=4)
    write_series(tmp_path / "lr", vol)

    def no_decoder(self):
        raise NotImplementedError("no decoder for this transfer syntax")

    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(no_decoder))
    v = import_scan(tmp_path / "lr")
    np.testing.assert_array_equal(v.array, vol)
    assert v.meta["pixel_decoder"] == {"SimpleITK": 4}


# ------------------------------------------------------------------------------------------
# paths that are not a scan


def test_folder_without_dicom_and_missing_path(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ScanImportError, match="no DICOM image found in the folder: 0 files"):
        import_scan(tmp_path / "empty", label="subject S04 HR")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not an image")
    (tmp_path / "notes" / "hr.nii.gz").write_bytes(b"")
    with pytest.raises(ScanImportError, match=r"readme.txt \(not DICOM\).*give that file as the scan path") as e:
        import_scan(tmp_path / "notes", label="subject S04 HR")
    assert str(e.value).startswith("subject S04 HR: ") and "Fix: give the folder" in str(e.value)
    with pytest.raises(ScanImportError, match="scan not found"):
        import_scan(tmp_path / "nope")
    (tmp_path / "scan.xyz").write_text("?")
    with pytest.raises(ScanImportError, match="unknown scan format '.xyz'"):
        import_scan(tmp_path / "scan.xyz")


# ------------------------------------------------------------------------------------------
# NIfTI, MHA, Scanco


@pytest.mark.parametrize("name", ["hr.nii.gz", "hr.mha"])
def test_nifti_and_mha_inputs_keep_values_and_lps_geometry(tmp_path, name):
    a = np.random.default_rng(5).normal(0, 500, size=(5, 6, 7)).astype(np.float32)
    ref = Volume(a, (0.082, 0.082, 0.09), (10.0, -20.0, 35.5), rotation_matrix([0, 1, 1], 0.4))
    if name.endswith(".mha"):
        sitk.WriteImage(ref.to_sitk(), str(tmp_path / name))
    else:
        write_volume(ref, tmp_path / name)
    v = import_scan(tmp_path / name, label="subject S05 HR", series_uid="1.2")
    np.testing.assert_allclose(v.array, a, atol=1e-6 * 500)
    assert v.same_grid(ref, atol=1e-5)
    assert v.meta["format"] == ("nifti" if name.endswith(".gz") else "metaimage") and v.meta["units"] == "as stored"
    assert any("series_uid 1.2 ignored" in w for w in v.meta["warnings"])


def vax(x):
    """A VAX G-float: an IEEE double of 4x, 16-bit words in reverse order."""
    b = struct.pack("<d", 4.0 * x)
    return b"".join(reversed([b[i : i + 2] for i in range(0, 8, 2)]))


def write_isq(path, arr, um_per_voxel=(82, 82, 82), mu_scaling=8192, mu_water=None, extra_blocks=0):
    """A Scanco ISQ file after the documented 512-byte header (int16, x fastest); with
    ``mu_water``, an extended header holding a Calibration sub-header."""
    nz, ny, nx = arr.shape
    cal_blocks = 2 if mu_water is not None else 0
    data_offset = (1 + cal_blocks) if mu_water is not None else extra_blocks
    head = bytearray(512)
    head[:16] = b"CTDATA-HEADER_V1"
    ints = {16: 3, 20: arr.size * 2, 24: arr.size * 2 // 512, 44: nx, 48: ny, 52: nz}
    ints.update({56: nx * um_per_voxel[0], 60: ny * um_per_voxel[1], 64: nz * um_per_voxel[2]})
    ints.update({68: um_per_voxel[2], 72: um_per_voxel[2], 88: mu_scaling, 168: 59400, 172: 900, 508: data_offset})
    for off, v in ints.items():
        struct.pack_into("<i", head, off, v)
    head[128:140] = b"PATIENT NAME"
    ext = bytearray(512 * data_offset)
    if mu_water is not None:
        ext[8:24] = b"Calibration     "
        struct.pack_into("<i", ext, 24, cal_blocks)
        cal = 512
        ext[cal + 648 : cal + 664] = b"mg HA/ccm".ljust(16, b"\0")
        ext[cal + 664 : cal + 672] = vax(1603.0)
        ext[cal + 672 : cal + 680] = vax(-391.0)
        ext[cal + 688 : cal + 696] = vax(mu_water)
    path.write_bytes(bytes(head) + bytes(ext) + arr.astype("<i2").tobytes())
    return path


def test_vax_g_float_decoding_from_its_definition():
    # 1.0 = 0.5 * 2**1: exponent 1 + 1024 = 0x401, fraction 0 -> high word 0x4010, stored first
    assert imaging._vax_double(bytes.fromhex("1040000000000000")) == 1.0
    assert imaging._vax_double(bytes.fromhex("10c0000000000000")) == -1.0  # sign bit set
    assert imaging._vax_double(vax(0.2409)) == pytest.approx(0.2409, rel=1e-15)


def test_isq_native_units_layout_and_spacing(tmp_path):
    z, y, x = np.meshgrid(np.arange(4), np.arange(5), np.arange(6), indexing="ij")
    arr = (1000 * z + 100 * y + x).astype(np.int16)  # tells x fastest from any other order
    path = write_isq(tmp_path / "C0001234.ISQ;1", arr, um_per_voxel=(82, 82, 90))
    v = import_scan(path, label="subject S06 HR")
    np.testing.assert_array_equal(v.array, arr)
    np.testing.assert_allclose(v.spacing, (0.082, 0.082, 0.090), atol=1e-9)
    assert v.meta["format"] == "scanco-isq" and v.meta["units"].startswith("scanco native")
    assert any("not HU" in w for w in v.meta["warnings"])
    assert "PATIENT" not in json.dumps(v.meta)  # the patient's name is not copied


def test_isq_with_calibration_is_converted_to_hu(tmp_path):
    mu_scaling, mu_water = 8192, 0.2409
    water, air = round(mu_water * mu_scaling), 0  # native values of water and air
    arr = np.array([water, air, 2 * water, water], np.int16).reshape(1, 2, 2).repeat(3, axis=0)
    path = write_isq(tmp_path / "hr.isq", arr, mu_scaling=mu_scaling, mu_water=mu_water)
    h = read_isq_header(path)
    assert h["mu_water_per_cm"] == pytest.approx(mu_water) and h["density_slope"] == pytest.approx(1603.0)
    assert h["density_unit"] == "mg HA/ccm" and h["header_bytes"] == 512 * 4
    v = import_scan(path)
    expected = 1000 * (arr / mu_scaling - mu_water) / mu_water
    np.testing.assert_allclose(v.array, expected, atol=0.05)
    assert v.array[0, 0, 1] == pytest.approx(-1000) and abs(v.array[0, 0, 0]) < 0.5  # air, water
    assert v.meta["units"] == "HU"


def test_truncated_isq_and_aim_are_refused(tmp_path):
    path = write_isq(tmp_path / "hr.isq", np.zeros((3, 4, 5), np.int16))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ScanImportError, match=r"ISQ file truncated: .* \(5 x 4 x 3 int16 voxels\)"):
        import_scan(path)
    aim = tmp_path / "hr.aim"
    aim.write_bytes(b"AIMDATA_V030   \0" + bytes(600))
    with pytest.raises(ScanImportError, match="AIM files are not read") as e:
        import_scan(aim, label="subject S08 HR")
    assert str(aim) in str(e.value) and "NIfTI/MHA" in str(e.value) and "itk-ioscanco" in str(e.value)


# ------------------------------------------------------------------------------------------
# import_to_file


def test_import_to_file_writes_memory_mappable_volume_and_report(tmp_path):
    vol = hu_volume()
    _, uid = write_series(tmp_path / "lr", vol)
    v = import_to_file(tmp_path / "lr", tmp_path / "out" / "lr.nii", tmp_path / "out" / "lr.json", label="subject S09 LR")
    r = read_volume(tmp_path / "out" / "lr.nii")
    assert isinstance(r.array, np.memmap) and r.same_grid(v, atol=1e-5)
    np.testing.assert_array_equal(r.array, vol)
    meta = json.loads((tmp_path / "out" / "lr.json").read_text())
    assert meta["series_instance_uid"] == uid and meta["label"] == "subject S09 LR"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["lr.json", "lr.nii"]


def test_import_to_file_leaves_no_output_on_error(tmp_path, monkeypatch):
    paths, _ = write_series(tmp_path / "lr", hu_volume())
    out = tmp_path / "out"
    out.mkdir()
    (out / "lr.nii").write_text("stale")  # from an earlier run
    (out / "lr.json").write_text("{}")
    paths[5].unlink()
    with pytest.raises(ScanImportError, match="missing slice"):
        import_to_file(tmp_path / "lr", out / "lr.nii", out / "lr.json")
    assert list(out.iterdir()) == []

    # a failure after the volume was written (disk full while finishing) removes it too: whether
    # the volume was written whole (.nii.gz) ...
    real = imaging.write_volume

    def write_then_fail(vol, path):
        real(vol, path)
        raise OSError("disk full")

    monkeypatch.setattr(imaging, "write_volume", write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        import_to_file(tmp_path / "lr", out / "lr.nii.gz", out / "lr.json", allow_resample_nonuniform=True)
    assert list(out.iterdir()) == []

    # ... or streamed slice by slice into a .nii
    real_commit = imaging.VolumeWriter.commit

    def commit_then_fail(self):
        real_commit(self)
        raise OSError("disk full")

    monkeypatch.setattr(imaging.VolumeWriter, "commit", commit_then_fail)
    with pytest.raises(OSError, match="disk full"):
        import_to_file(tmp_path / "lr", out / "lr.nii", out / "lr.json", allow_resample_nonuniform=True)
    assert list(out.iterdir()) == []
