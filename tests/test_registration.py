"""Rigid LR -> HR registration, QC and resampling (femursr.registration).

Answers known from first principles: the synthetic cohort's true pose (truth/pose.tfm), a rigid
transform applied here to an HR, a linear intensity ramp that cubic B-spline interpolation
reproduces, translations and rotations of known size for the target registration error.
"""

import json
import time

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage as ndi

from femursr import registration as reg
from femursr.figures import read_series
from femursr.geometry import rotation_matrix
from femursr.phantom import synthesize_subject
from femursr.registration import (
    RegistrationError,
    check_registration,
    register_rigid,
    resample_onto,
    target_registration_error,
    write_registration_outputs,
)
from femursr.volume import Volume

from conftest import load_config, small_synthetic

HALF_LR_VOXEL_MM = 0.5


def _read(folder) -> Volume:
    img = read_series(folder)
    return Volume(sitk.GetArrayFromImage(img).astype(np.float32), img.GetSpacing(), img.GetOrigin(), img.GetDirection())


def _femur_points(truth_dir, n=20000) -> np.ndarray:
    """LPS points (HR space) of the truth femur mask, about ``n`` of them."""
    mask = sitk.ReadImage(str(truth_dir / "femur_mask.nii.gz"))
    kji = np.argwhere(sitk.GetArrayViewFromImage(mask) > 0)
    kji = kji[:: max(1, len(kji) // n)]
    vol = Volume(np.zeros((1, 1, 1)), mask.GetSpacing(), mask.GetOrigin(), mask.GetDirection())
    return vol.index_to_physical(kji[:, ::-1])


def _make_subjects(cfg, ids, root):
    out = {}
    for i, sid in ids:
        d = root / sid
        rec = synthesize_subject(sid, i, cfg["synthetic"], cfg["seed"], d / "lr", d / "hr", d / "truth")
        out[sid] = {"lr": _read(d / "lr"), "hr": _read(d / "hr"), "truth": d / "truth", "record": rec}
    return out


@pytest.fixture(scope="module")
def subjects(small_subject, tmp_path_factory):
    """Two small synthetic subjects (anatomy 0.45), read back from their DICOM: conftest's S001
    (HR voxel 0.25 mm, shared with other tests) and an S002 with an HR voxel of 0.3 mm."""
    rec, lr_dir, hr_dir, truth_dir, _ = small_subject
    out = {"S001": {"lr": _read(lr_dir), "hr": _read(hr_dir), "truth": truth_dir, "record": rec}}
    cfg = small_synthetic(n_subjects=2, scale=0.45, voxel=0.3)
    out.update(_make_subjects(cfg, [(2, "S002")], tmp_path_factory.mktemp("registration")))
    return out


@pytest.fixture(scope="module")
def registered(subjects):
    out = {}
    for sid, s in subjects.items():
        t = time.perf_counter()
        out[sid] = register_rigid(s["hr"], s["lr"], label=sid)
        out[sid].qc["test_seconds"] = time.perf_counter() - t
    return out


# ------------------------------------------------------------------ accuracy on the cohort
@pytest.mark.parametrize("sid", ["S001", "S002"])
def test_tre_over_the_femur_is_below_half_an_lr_voxel(subjects, registered, sid):
    res = registered[sid]
    truth = sitk.ReadTransform(str(subjects[sid]["truth"] / "pose.tfm"))
    tre = target_registration_error(res.transform, truth, _femur_points(subjects[sid]["truth"]))
    print(f"{sid}: TRE mean {tre.mean():.3f} mm, max {tre.max():.3f} mm; Dice {res.dice:.3f}, structure NCC "
          f"{res.structure_ncc:.3f}, initial NCC {res.initial['ncc']:.3f}; {res.qc['test_seconds']:.1f} s")  # fmt: skip
    assert tre.mean() < HALF_LR_VOXEL_MM
    assert tre.max() < 2 * HALF_LR_VOXEL_MM
    # the automatic initial alignment alone lands within a few mm (the pose is up to 20 deg and tens of mm)
    init = reg._euler(np.reshape(res.initial["matrix"], (3, 3)), res.initial["centre_mm"], res.initial["translation_mm"])
    assert target_registration_error(init, truth, _femur_points(subjects[sid]["truth"], 2000)).mean() < 5.0
    check_registration(res, label=sid)  # a matched pair passes QC


def test_a_known_rigid_transform_applied_to_an_hr_is_recovered(subjects):
    """The HR, moved by a rigid transform chosen here onto a clinical-CT-like grid with other axes
    (x and y swapped and z reversed) plus noise, registers back to that transform."""
    hr = subjects["S001"]["hr"]
    hr_img = hr.to_sitk()
    centre = hr.index_to_physical((np.asarray(hr.shape[::-1]) - 1) / 2)
    known = reg._euler(rotation_matrix([1.0, 2.0, -1.0], np.deg2rad(12.0)), centre, [25.0, -15.0, 30.0])
    # the LR grid: other axes, clinical spacing, covering the moved HR with 10 mm to spare
    direction = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])
    spacing = np.array([0.98, 0.98, 0.65])
    corners = np.array([hr.index_to_physical(np.array(c) * (np.asarray(hr.shape[::-1]) - 1)) for c in np.ndindex(2, 2, 2)])
    moved = np.array([known.TransformPoint(c.tolist()) for c in corners])
    in_grid = (moved - moved.mean(0)) @ direction  # grid-axis coordinates
    lo, hi = in_grid.min(0) - 10.0, in_grid.max(0) + 10.0
    size = np.ceil((hi - lo) / spacing).astype(int) + 1
    ref = sitk.Image([int(v) for v in size], sitk.sitkFloat32)
    ref.SetSpacing(spacing.tolist())
    ref.SetDirection(direction.ravel().tolist())
    ref.SetOrigin((moved.mean(0) + direction @ lo).tolist())
    blurred = sitk.SmoothingRecursiveGaussian(sitk.Cast(hr_img, sitk.sitkFloat32), 0.6)
    lr_img = sitk.Resample(blurred, ref, known.GetInverse(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    lr = Volume.from_sitk(lr_img)
    lr.array = lr.array + np.random.default_rng(3).normal(0, 100, lr.shape).astype(np.float32)
    res = register_rigid(hr, lr, label="known transform")
    tre = target_registration_error(res.transform, known, _femur_points(subjects["S001"]["truth"]))
    assert tre.mean() < 0.15, f"mean TRE {tre.mean():.3f} mm"
    assert res.dice > 0.9 and res.structure_ncc > 0.5
    check_registration(res)


def test_an_lr_and_hr_of_different_subjects_raise_a_registration_error(subjects):
    res = register_rigid(subjects["S002"]["hr"], subjects["S001"]["lr"], label="S001 (HR of S002)")
    with pytest.raises(RegistrationError) as err:
        check_registration(res)
    msg = str(err.value)
    assert "S001 (HR of S002)" in msg
    assert f"Dice {res.dice:.3f}" in msg and f"Mattes MI {res.metric:.4f}" in msg
    assert f"structure NCC {res.structure_ncc:.3f}" in msg


def test_a_femur_outside_the_lr_field_of_view_raises(subjects):
    """An LR cropped to the pelvis and femoral head cannot hold the HR femur."""
    lr = subjects["S001"]["lr"]
    head_lr = np.asarray(subjects["S001"]["record"]["pose"]["head_centre_lr"])
    k0 = int(np.floor(lr.physical_to_index(head_lr)[2])) - 5  # 3 mm below the head centre upwards
    cropped = Volume(lr.array[k0:], lr.spacing, lr.index_to_physical([0, 0, k0]), lr.direction)
    with pytest.raises(RegistrationError, match="S001.*field of view"):
        register_rigid(subjects["S001"]["hr"], cropped, label="S001")


def test_an_lr_without_the_femur_fails_qc(subjects):
    """The LR's femur (truth mask, and 3 mm around it) replaced by noisy muscle: whatever pose the
    search settles on, the QC stops it."""
    s = subjects["S001"]
    femur = sitk.GetArrayFromImage(sitk.ReadImage(str(s["truth"] / "femur_mask_lr.nii.gz"))) > 0
    gone = ndi.distance_transform_edt(~femur, sampling=s["lr"].spacing[::-1]) < 3.0
    arr = s["lr"].array.copy()
    arr[gone] = 45.0 + np.random.default_rng(5).normal(0.0, 150.0, int(gone.sum()))
    res = register_rigid(s["hr"], s["lr"].with_array(arr), label="S001 (femur erased)")
    with pytest.raises(RegistrationError, match=r"S001 \(femur erased\).*failed QC"):
        check_registration(res)


def test_unknown_parameter_is_an_error(subjects):
    with pytest.raises(TypeError, match="histogram_bin"):
        register_rigid(subjects["S001"]["hr"], subjects["S001"]["lr"], histogram_bin=32)


# ---------------------------------------------------------------------------- resampling
def test_resampled_lr_has_exactly_the_hr_grid(subjects, registered):
    s = subjects["S001"]
    out = resample_onto(s["lr"], s["hr"], registered["S001"].transform, default_hu=-1024.0)
    assert out.array.shape == s["hr"].array.shape and out.array.dtype == np.float32
    assert out.spacing == s["hr"].spacing and out.origin == s["hr"].origin and out.direction == s["hr"].direction
    # the registered LR is bright where the HR femur is, and no voxel was outside the LR field of view
    femur = sitk.GetArrayFromImage(sitk.ReadImage(str(s["truth"] / "femur_mask.nii.gz"))) > 0
    assert out.array[femur].mean() > out.array[~femur].mean() + 150
    assert not (out.array == -1024.0).any()
    # an HR grid far from the LR gets the default value everywhere
    away = sitk.TranslationTransform(3, (500.0, 0.0, 0.0))
    assert (resample_onto(s["lr"], s["hr"], away, default_hu=-1024.0).array == -1024.0).all()


def test_bspline_resampling_reproduces_a_linear_ramp_through_a_rigid_transform():
    """Cubic B-spline interpolation is exact for a linear function; the transform maps output (HR)
    points to input (LR) points, so the HR voxel at p holds f(T(p))."""
    g = np.array([2.0, -1.0, 3.0])  # HU per mm along x, y, z
    lr_vol = Volume(np.zeros((60, 50, 50), np.float32), (0.98, 0.98, 0.65), (-24.0, -20.0, -18.0))
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in lr_vol.shape[::-1]], indexing="ij"), -1)  # x, y, z
    lr_vol.array = (lr_vol.index_to_physical(ijk) @ g).transpose(2, 1, 0).astype(np.float32)
    hr = Volume(np.zeros((40, 44, 48), np.float32), (0.3, 0.3, 0.3), (-7.0, -6.0, -5.0))
    t = reg._euler(rotation_matrix([0.3, -1.0, 0.5], np.deg2rad(17.0)), (0.0, 0.0, 0.0), (3.0, -2.0, 1.5))
    out = resample_onto(lr_vol, hr, t)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in hr.shape[::-1]], indexing="ij"), -1).reshape(-1, 3)
    p = hr.index_to_physical(ijk)
    expected = (p @ np.reshape(t.GetMatrix(), (3, 3)).T + np.asarray(t.GetTranslation())) @ g  # f(T(p)), centre 0
    got = out.array.transpose(2, 1, 0).reshape(-1)
    np.testing.assert_allclose(got, expected, atol=0.05)


def test_lr_in_the_hr_frame_resamples_like_the_transform():
    """Folding the HR -> LR transform into the LR's geometry (origin Aᵀ(o - b), direction AᵀD) puts
    every voxel where the transform does: resampling with the identity equals resample_onto."""
    rng = np.random.default_rng(3)
    c, s = np.cos(0.2), np.sin(0.2)
    lr_vol = Volume(rng.normal(0, 100, (30, 36, 40)).astype(np.float32), (0.98, 0.98, 0.65), (-20.0, -17.0, -9.0),
                    (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))  # fmt: skip
    hr = Volume(np.zeros((24, 28, 30), np.float32), (0.4, 0.4, 0.4), (-6.0, -5.0, -4.0))
    t = reg._euler(rotation_matrix([0.3, -1.0, 0.5], np.deg2rad(17.0)), (1.0, 2.0, -1.0), (3.0, -2.0, 1.5))
    folded = reg.in_fixed_frame(lr_vol, sitk.Transform(t))  # as read from a .tfm file
    assert folded.array is lr_vol.array and folded.spacing == lr_vol.spacing
    # voxel centres land where the transform's inverse sends them
    ijk = rng.uniform(0, 25, size=(50, 3))
    np.testing.assert_allclose(reg.transform_points(t, folded.index_to_physical(ijk)), lr_vol.index_to_physical(ijk), atol=1e-9)
    direct = resample_onto(lr_vol, hr, t, interpolator="linear")
    via_fold = resample_onto(folded, hr, sitk.Transform(3, sitk.sitkIdentity), interpolator="linear")
    np.testing.assert_allclose(via_fold.array, direct.array, atol=1e-3)
    with pytest.raises(ValueError, match="not a rotation"):
        reg.in_fixed_frame(lr_vol, sitk.AffineTransform((1.1, 0, 0, 0, 1, 0, 0, 0, 1), (0, 0, 0)))
    with pytest.raises(ValueError, match="rigid"):
        reg.in_fixed_frame(lr_vol, sitk.ScaleTransform(3, (1.1, 1.0, 1.0)))


# --------------------------------------------------------------------- small known answers
def test_target_registration_error_of_known_motions():
    pts = np.random.default_rng(0).uniform(-30, 30, size=(500, 3))
    ident = reg._euler(np.eye(3), (0, 0, 0), (0, 0, 0))
    shift = reg._euler(np.eye(3), (0, 0, 0), (3.0, 4.0, 0.0))
    np.testing.assert_allclose(target_registration_error(shift, ident, pts), 5.0)
    # a rotation by theta about an axis through c moves a point at distance r from it by 2 r sin(theta/2)
    c, axis = np.array([1.0, -2.0, 3.0]), np.array([0.0, 0.0, 1.0])
    turn = reg._euler(rotation_matrix(axis, np.deg2rad(10.0)), c, (0, 0, 0))
    r = np.linalg.norm((pts - c)[:, :2], axis=1)
    np.testing.assert_allclose(target_registration_error(turn, ident, pts), 2 * r * np.sin(np.deg2rad(5.0)), rtol=1e-9)
    # a transform read from a file (a plain sitk.Transform) works the same
    assert target_registration_error(sitk.Transform(shift), ident, pts[:3]) == pytest.approx([5.0] * 3)


def test_cut_faces_finds_the_saw_cut_and_not_the_rounded_end():
    """A capsule (cylinder with a hemispherical cap on top) sawn flat at the bottom."""
    z, y, x = np.mgrid[0:60, 0:30, 0:30]
    r2 = (x - 14.5) ** 2 + (y - 14.5) ** 2
    capsule = ((r2 < 100) & (z >= 5) & (z < 40)) | (r2 + (z - 40) ** 2 < 100)
    cuts = reg.cut_faces(capsule, spacing_zyx=(0.5, 0.5, 0.5), ratio=0.8, depth_mm=1.5)
    assert cuts == {0: (5, None)}
    keep = reg._slab(capsule.shape, cuts, inset=2)
    assert not keep[:7].any() and keep[7:].all()


# ---------------------------------------------------------------------------- outputs
def test_outputs_read_back_and_are_written_atomically(subjects, registered, tmp_path, monkeypatch):
    s, res = subjects["S001"], registered["S001"]
    out = resample_onto(s["lr"], s["hr"], res.transform)
    paths = tmp_path / "S001.tfm", tmp_path / "S001_qc.json", tmp_path / "S001_qc.png"
    write_registration_outputs(res, *paths, s["hr"], out)
    back = sitk.ReadTransform(str(paths[0])).Downcast()
    assert isinstance(back, sitk.Euler3DTransform)
    np.testing.assert_allclose(back.GetParameters(), res.transform.GetParameters(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(back.GetFixedParameters(), res.transform.GetFixedParameters(), rtol=0, atol=1e-12)
    assert target_registration_error(back, res.transform, _femur_points(s["truth"], 100)).max() < 1e-9
    qc = json.loads(paths[1].read_text())
    assert qc["subject"] == "S001"
    assert qc["femur_dice"] == pytest.approx(res.dice) and qc["final_metric"] == pytest.approx(res.metric)
    assert qc["structure_ncc"] == pytest.approx(res.structure_ncc)
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(RegistrationError, match=str(paths[2])):  # the message points at the figure
        check_registration(res, min_dice=1.01)

    # a failure while writing leaves none of the three outputs and no temporary files
    target = tmp_path / "failed"

    def broken(*args, **kw):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(reg, "qc_figure", broken)
    failed = target / "S001.tfm", target / "S001_qc.json", target / "S001_qc.png"
    with pytest.raises(OSError, match="simulated"):
        write_registration_outputs(res, *failed, s["hr"], out)
    assert list(target.iterdir()) == []
    # an LR that is not on the HR grid is refused before anything is written
    with pytest.raises(ValueError, match="HR grid"):
        write_registration_outputs(res, *failed, s["hr"], s["lr"])
    assert list(target.iterdir()) == []


# ------------------------------------------------------------------------------- slow
@pytest.mark.slow
@pytest.mark.parametrize("noise_hu", [150.0, None], ids=["noise150HU", "snr0.93"])
def test_default_scale_cohort_registers_below_half_an_lr_voxel(tmp_path, noise_hu):
    """Five subjects at the demo scale (config/config.yaml: HR 0.2 mm, anatomy 0.45), with the
    default scanner noise and with the noise calibrated to the paper's SNR of 0.93 in the femur
    (300-400 HU): TRE per subject, time per registration, and the QC of each matched pair and of
    mismatched pairs."""
    cfg = load_config()
    cfg["synthetic"]["lr"]["noise_hu"] = noise_hu
    ids = [(i, f"S{i:03d}") for i in range(1, 6)]
    subj = _make_subjects(cfg, ids, tmp_path)
    rows = []
    for _, sid in ids:
        s = subj[sid]
        t, c = time.perf_counter(), time.process_time()
        res = register_rigid(s["hr"], s["lr"], label=sid)
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        t = time.perf_counter()
        resample_onto(s["lr"], s["hr"], res.transform)
        t_resample = time.perf_counter() - t
        tre = target_registration_error(res.transform, sitk.ReadTransform(str(s["truth"] / "pose.tfm")), _femur_points(s["truth"]))
        rows.append((sid, tre.mean(), tre.max(), res.dice, res.structure_ncc, res.metric, wall, cpu, t_resample))
        check_registration(res, label=sid)
    print("\nsubject  TRE mean  TRE max  Dice   struct  Mattes MI  wall s  cpu s  resample s")
    for r in rows:
        print(f"{r[0]}    {r[1]:.3f}     {r[2]:.3f}    {r[3]:.3f}  {r[4]:.3f}  {r[5]:.4f}    {r[6]:.1f}    {r[7]:.1f}   {r[8]:.1f}")
    assert all(r[1] < HALF_LR_VOXEL_MM for r in rows), rows
    for (_, a), (_, b) in zip(ids, ids[1:] + ids[:1]):
        res = register_rigid(subj[b]["hr"], subj[a]["lr"], label=f"{a} LR with {b} HR")
        print(f"mismatch {a} LR / {b} HR: Dice {res.dice:.3f}, structure NCC {res.structure_ncc:.3f}, Mattes MI {res.metric:.4f}")
        with pytest.raises(RegistrationError):
            check_registration(res)
