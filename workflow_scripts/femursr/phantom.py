"""Synthetic cohort: left proximal femur phantoms with known truth, as clinical-CT and HR-pQCT scans.

For each subject a continuous femur (``femursr.geometry``) with a per-subject size, neck-shaft
angle, anteversion, cortical thickness and an oriented trabecular network of plates and rods
(``femursr.trabecular``, BV/TV and spacing per region scaled by a per-subject bone-loss factor)
is sampled twice:

* HR-pQCT-like: isotropic grid aligned with the femur frame, the specimen alone (ex situ, cut
  below the lesser trochanter, in water), a mild Gaussian blur and white noise;
* clinical-CT-like: 0.98 x 0.98 x 0.65 mm grid in the patient frame, the femur in a random
  rigid pose, with surrounding soft tissue, fat, air and the pelvis (acetabulum, ilium,
  ischium, pubis), box-integrated over each voxel, blurred by a clinical point-spread function
  and given spatially correlated noise at the configured SNR in the femur.

The truth (tissue and region maps on the HR grid, the femur mask on both grids, the rigid pose
HR -> LR) is written beside the DICOM series; its Hildebrand morphometry per region is
:mod:`femursr.truth` (rule truth_morphometry).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk
from scipy.ndimage import gaussian_filter

from .atomic import atomic_dir, replace_dir, write_tsv
from .dicomio import write_ct_series
from .geometry import REGION_IDS, Body, FemurShape, Pelvis, rotation_angle_deg, rotation_matrix
from .trabecular import RegionStructure, TrabecularNetwork, blended_structure
from .volume import Volume, slab_ranges, slab_thickness, write_volume

log = logging.getLogger(__name__)

FWHM_TO_SIGMA = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))
REGION_ORDER = ("head", "neck", "trochanter", "shaft")


@dataclass
class Subject:
    """Everything drawn for one synthetic subject."""

    subject_id: str
    shape: FemurShape
    networks: list
    structure: dict  # region -> RegionStructure
    size: float
    bone_loss: float
    rotation: np.ndarray  # HR (femur) frame -> LR (patient) frame
    translation: np.ndarray
    z_cut: float
    pelvis: Pelvis
    body: Body


def subject_rng(seed: int, index: int) -> np.random.Generator:
    """Independent, reproducible random stream of subject ``index`` in a cohort of ``seed``."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))


def draw_subject(cfg: dict, seed: int, index: int, subject_id: str) -> Subject:
    """Draw the anatomy, bone quality and pose of one subject from the ``synthetic`` config."""
    rng = subject_rng(seed, index)
    size = float(np.clip(1.0 + cfg["size_sd"] * rng.normal(), 0.8, 1.2))
    s = cfg["anatomy_scale"] * size
    nsa = rng.uniform(*cfg["neck_shaft_angle_deg"])
    av = rng.uniform(*cfg["anteversion_deg"])
    shape = FemurShape(
        head_radius=23.0 * s,
        neck_length=52.0 * s,
        neck_shaft_angle_deg=nsa,
        anteversion_deg=av,
        neck_radius_base=15.5 * s,
        neck_radius_head=13.0 * s,
        shaft_radius=14.0 * s,
        scale=s,
        cortex_mm={k: float(v) * float(np.clip(1 + 0.1 * rng.normal(), 0.75, 1.25)) for k, v in cfg["cortex_mm"].items()},
        cortex_min_mm=cfg["cortex_min_mm"],
    )
    bone_loss = float(rng.uniform(*cfg["bone_loss"]))
    jit = cfg["region_jitter"]
    directions = {
        # principal compressive group: from the superior head down to the medial cortex
        "head": np.array([-np.sin(np.deg2rad(20)), 0.0, np.cos(np.deg2rad(20))]),
        "neck": shape.neck_axis,
        "trochanter": np.array([0.15, 0.0, 1.0]),
        "shaft": np.array([0.0, 0.0, 1.0]),
    }
    structure = {}
    for r in REGION_ORDER:
        t = cfg["trabecular"][r]
        bvtv = t["bvtv"] * bone_loss * float(np.clip(1 + jit * rng.normal(), 0.7, 1.3))
        period = t["period_mm"] * bone_loss**-0.5 * float(np.clip(1 + 0.5 * jit * rng.normal(), 0.8, 1.2))
        structure[r] = RegionStructure(min(bvtv, 0.9), period, t["rod_fraction"], directions[r])
    networks = [TrabecularNetwork(rng, structure[r], n_waves=cfg["n_waves"]) for r in REGION_ORDER]

    lr = cfg["lr"]
    axis = rng.normal(size=3)
    angle = np.deg2rad(rng.uniform(0, lr["max_rotation_deg"]))
    rot = rotation_matrix(axis, angle)
    shift = rng.normal(size=3)
    shift *= rng.uniform(0, lr["max_translation_mm"]) / np.linalg.norm(shift)
    # the patient lies shifted in the scanner by `shift`; the left hip is 85 mm (adult) from
    # the midline, and the leg is turned about the hip by `rot`
    head_nominal = np.array([85.0 * s, 0.0, 0.0])
    head_pat = head_nominal + shift
    # the leg turns about the hip: p_LR = R (p_HR - c_head) + c_head_patient
    translation = head_pat - rot @ shape.head_center
    z_cut = shape.lt_bottom - cfg["hr"]["cut_below_lesser_trochanter_mm"] * s
    pelvis = Pelvis(head_pat, shape.head_radius, lr["joint_gap_mm"], s, lr["pelvis_cortex_mm"] * s)
    body = Body((190.0 * s, 125.0 * s), lr["fat_mm"] * s, centre=(float(shift[0]), float(shift[1])))
    return Subject(subject_id, shape, networks, structure, size, bone_loss, rot, translation, z_cut, pelvis, body)


# ---------------------------------------------------------------------------- femur tissue
def femur_tissue(subj: Subject, q: np.ndarray, z_cut: float | None = None, candidates=None):
    """Tissue class (0 outside, 1 marrow, 2 trabecular bone, 3 cortex) at femur-frame points ``q``.

    Also returns the signed distance. With ``z_cut`` the femur ends there (the HR specimen).
    ``candidates`` (bool) restricts the evaluation to points that may be inside; the others are
    outside (their distance is reported as +inf).
    """
    shape = subj.shape
    if candidates is None:
        d = shape.sdf(q)
    else:
        d = np.full(q.shape[0], np.inf, np.float32)
        d[candidates] = shape.sdf(q[candidates])
    inside = d < 0
    if z_cut is not None:
        inside &= q[:, 2] > z_cut
    tissue = np.zeros(q.shape[0], np.uint8)
    idx = np.flatnonzero(inside)
    if idx.size:
        qi = q[idx]
        w = shape.region_weights(qi)
        cortex = d[idx] > -shape.cortex_thickness(qi, w)
        t = np.where(cortex, 3, 1).astype(np.uint8)
        comp = ~cortex
        if comp.any():
            trab = blended_structure(qi[comp].astype(np.float32), w[comp], subj.networks)
            t[np.flatnonzero(comp)[trab]] = 2
        tissue[idx] = t
    return tissue, d


def _grid_points(origin, spacing, shape_zyx, z0, z1, direction=None):
    """Physical points (M, 3) of grid slices z0:z1, ordered like array[z0:z1].ravel()."""
    nz, ny, nx = shape_zyx
    zz, yy, xx = np.meshgrid(np.arange(z0, z1), np.arange(ny), np.arange(nx), indexing="ij")
    ijk = np.stack([xx.ravel(), yy.ravel(), zz.ravel()], axis=1).astype(np.float64)
    ijk *= np.asarray(spacing, float)
    if direction is not None:
        ijk = ijk @ np.asarray(direction, float).T
    return (ijk + np.asarray(origin, float)).astype(np.float32)


def hr_grid(subj: Subject, cfg: dict):
    """The HR-pQCT grid of the specimen: (shape (z, y, x), spacing (x, y, z) mm, origin LPS mm)."""
    hr = cfg["hr"]
    vox = float(hr["voxel_mm"])
    lo, hi = subj.shape.bounding_box(subj.z_cut)
    lo = lo - hr["margin_mm"]
    hi = hi + hr["margin_mm"]
    n_xyz = np.ceil((hi - lo) / vox).astype(int) + 1
    return (int(n_xyz[2]), int(n_xyz[1]), int(n_xyz[0])), (vox, vox, vox), tuple(float(v) for v in lo)


def render_hr(subj: Subject, cfg: dict, rng: np.random.Generator, *, image_out=None, slab_voxels: int | None = None):
    """HR-pQCT-like scan of the specimen. Returns (image HU, tissue map, region map) as Volumes.

    Rendered in slabs along z of about ``slab_voxels`` voxels (default
    :data:`femursr.volume.SLAB_VOXELS`): the tissue classes point by point, then the image with a
    halo of slices for the blur and the noise drawn slab after slab from ``rng``; the result is
    the same as rendering the whole grid at once. ``image_out`` takes the image slab by slab: None
    (a new array in memory) or an array-like with slab assignment on the grid of :func:`hr_grid`,
    such as a :class:`~femursr.volume.VolumeWriter` (the returned image is then its ``array``), so
    that a paper-scale image (5.6 GB of float32) need not be held in memory. The tissue and region
    maps (uint8) are held in memory.
    """
    hr = cfg["hr"]
    shp, spacing, origin = hr_grid(subj, cfg)
    vox = spacing[0]
    lo = np.asarray(origin)
    thick = slab_thickness(shp, slab_voxels)
    # coarse pass (every 4th voxel) to skip the points far outside the femur
    step = 4
    cshape = tuple(-(-n // step) for n in shp)
    c_spacing = np.array(spacing) * step
    # nearest coarse sample of every fine voxel
    sel = [np.minimum((np.arange(n) + step // 2) // step, c - 1) for n, c in zip(shp, cshape)]
    tissue = np.zeros(shp, np.uint8)
    regions = np.zeros(shp, np.uint8)
    for z0, z1 in slab_ranges(shp[0], thick):
        c0, c1 = int(sel[0][z0]), int(sel[0][z1 - 1]) + 1
        coarse = subj.shape.sdf(_grid_points(lo, c_spacing, cshape, c0, c1)).reshape((c1 - c0,) + cshape[1:])
        near = coarse < 1.0 + step * vox * np.sqrt(3)
        cand = near[np.ix_(sel[0][z0:z1] - c0, sel[1], sel[2])]
        idx = np.flatnonzero(cand)
        del coarse, near, cand
        t_slab = tissue[z0:z1].reshape(-1)  # views: written in place
        r_slab = regions[z0:z1].reshape(-1)
        for k0 in range(0, idx.size, 1_000_000):
            ci = idx[k0 : k0 + 1_000_000]
            kji = np.unravel_index(ci, (z1 - z0,) + shp[1:])
            kji = (kji[0] + z0, kji[1], kji[2])
            q = np.stack([lo[a] + kji[2 - a] * vox for a in range(3)], axis=1).astype(np.float32)
            t, _ = femur_tissue(subj, q, z_cut=subj.z_cut)
            inside = np.flatnonzero(t > 0)
            if inside.size:
                reg = np.zeros(ci.size, np.uint8)
                for name, m in subj.shape.region_masks(q[inside]).items():
                    reg[inside[m]] = REGION_IDS[name]
                r_slab[ci] = reg
            t_slab[ci] = t
    # image: tissue values, blur (a halo of `radius` slices makes each slab's blur exact), noise
    sigma = hr["psf_fwhm_mm"] * FWHM_TO_SIGMA / vox
    radius = int(4.0 * sigma + 0.5)  # gaussian_filter's reach at its default truncate=4
    img_out = np.empty(shp, np.float32) if image_out is None else image_out
    for z0, z1 in slab_ranges(shp[0], thick):
        a0, a1 = max(0, z0 - radius), min(shp[0], z1 + radius)
        t = tissue[a0:a1]
        img = np.full(t.shape, hr["medium_hu"], np.float32)
        img[t == 1] = hr["marrow_hu"]
        img[(t == 2) | (t == 3)] = hr["bone_hu"]
        img = gaussian_filter(img, sigma)[z0 - a0 : z1 - a0]
        img += np.float32(hr["noise_hu"]) * rng.standard_normal(size=img.shape, dtype=np.float32)
        img_out[z0:z1] = img
    image = img_out if isinstance(img_out, np.ndarray) else img_out.array
    return Volume(image, spacing, origin), Volume(tissue, spacing, origin), Volume(regions, spacing, origin)


def _lr_density(subj: Subject, cfg_lr: dict, p: np.ndarray):
    """HU of the noiseless in-situ object at patient-frame points ``p``; also the femur indicator."""
    q = ((p - subj.translation) @ subj.rotation).astype(np.float32)  # patient -> femur frame
    t_f, _ = femur_tissue(subj, q)
    hu = cfg_lr["tissue_hu"]
    d_body = subj.body.sdf(p)
    out = np.full(p.shape[0], hu["air"], np.float32)
    out[d_body < 0] = hu["muscle"]
    out[(d_body < 0) & (d_body > -subj.body.fat_mm)] = hu["fat"]
    d_p = subj.pelvis.sdf(p)
    # the pelvis keeps its joint gap from the femur whatever the leg's pose
    pel = d_p < 0
    out[pel] = hu["pelvis_trabecular"]
    out[pel & (d_p > -subj.pelvis.cortex_mm)] = hu["bone"]
    out[t_f == 1] = hu["marrow"]
    out[t_f >= 2] = hu["bone"]
    return out, (t_f > 0)


def render_lr(subj: Subject, cfg: dict, rng: np.random.Generator, hr_box: tuple):
    """Clinical-CT-like scan in the patient frame. Returns (image HU, femur mask, info dict)."""
    lr = cfg["lr"]
    sp = np.asarray(lr["spacing_mm"], float)  # x, y, z
    lo, hi = hr_box  # femur frame box of the specimen
    corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
    pc = corners @ subj.rotation.T + subj.translation
    centre = 0.5 * (pc.min(0) + pc.max(0))
    fov = np.maximum(np.asarray(lr["fov_mm"], float), pc.max(0) - pc.min(0) + 4 * sp)
    n_xyz = np.ceil(fov / sp).astype(int)
    origin = centre - 0.5 * (n_xyz - 1) * sp
    shp = (int(n_xyz[2]), int(n_xyz[1]), int(n_xyz[0]))
    p = _grid_points(origin, sp, shp, 0, shp[0])
    # box integration over each voxel: sub-sample only where an edge can fall inside the voxel
    half_diag = 0.5 * float(np.linalg.norm(sp)) + 0.5
    q = ((p - subj.translation) @ subj.rotation).astype(np.float32)
    near = (subj.shape.sdf(q) < half_diag) | (np.abs(subj.pelvis.sdf(p)) < half_diag)
    near |= np.abs(subj.body.sdf(p)) < half_diag
    near |= np.abs(subj.body.sdf(p) + subj.body.fat_mm) < half_diag
    dens, fem = _lr_density(subj, lr, p[~near])
    img = np.empty(p.shape[0], np.float32)
    femf = np.zeros(p.shape[0], np.float32)
    img[~near] = dens
    femf[~near] = fem
    f = np.asarray(lr["supersample"], int)
    offs = np.stack(
        np.meshgrid(*[((np.arange(f[a]) + 0.5) / f[a] - 0.5) * sp[a] for a in range(3)], indexing="ij"), -1
    ).reshape(-1, 3)
    idx = np.flatnonzero(near)
    for c0 in range(0, idx.size, 50_000):
        ci = idx[c0 : c0 + 50_000]
        pts = (p[ci, None, :] + offs[None].astype(np.float32)).reshape(-1, 3)
        d, fm = _lr_density(subj, lr, pts)
        img[ci] = d.reshape(ci.size, -1).mean(1)
        femf[ci] = fm.reshape(ci.size, -1).mean(1)
    img = img.reshape(shp)
    femur_mask = (femf.reshape(shp) >= 0.5).astype(np.uint8)
    sigma = np.asarray(lr["psf_fwhm_mm"], float) * FWHM_TO_SIGMA / sp  # x, y, z in voxels
    img = gaussian_filter(img, sigma[::-1])
    # noise: correlated (reconstruction kernel), scaled so that mean/std in the femur = SNR
    fm = femur_mask.astype(bool)
    mean, std_struct = float(img[fm].mean()), float(img[fm].std())
    if lr.get("noise_hu") is not None:
        noise_sd = float(lr["noise_hu"])  # a scanner property, in HU
    else:  # calibrated so that mean / SD in the femur is the configured SNR
        want = (mean / lr["snr"]) ** 2 - std_struct**2
        noise_sd = max(float(np.sqrt(want)) if want > 0 else 0.0, lr["noise_hu_min"])
    noise = gaussian_filter(rng.standard_normal(size=shp, dtype=np.float32), lr["noise_correlation_vox"])
    noise *= noise_sd / noise.std()
    img = img + noise
    snr = float(img[fm].mean() / img[fm].std())
    info = {"noise_hu": noise_sd, "snr_femur": snr, "femur_mean_hu": float(img[fm].mean())}
    vol = Volume(img.astype(np.float32), tuple(sp), tuple(origin))
    return vol, Volume(femur_mask, tuple(sp), tuple(origin)), info


def pose_transform(subj: Subject) -> sitk.Euler3DTransform:
    """The true rigid transform as ITK uses it for registration: HR (fixed) point -> LR (moving) point."""
    tfm = sitk.Euler3DTransform()
    tfm.SetMatrix([float(v) for v in subj.rotation.ravel()])
    tfm.SetTranslation([float(v) for v in subj.translation])
    return tfm


def write_scans(subject_id: str, cfg: dict, seed: int, lr_img: Volume, hr_img: Volume, lr_dir, hr_dir) -> None:
    """Write the clinical CT and the HR-pQCT of a subject as CT DICOM series (deterministic UIDs
    from ``seed`` and ``subject_id``). The HR image may be memory-mapped: it is written slice by
    slice."""
    write_ct_series(
        lr_img.array, lr_img.spacing, lr_img.origin, np.eye(3), lr_dir,
        patient_id=subject_id, series_description="synthetic clinical CT, hip",
        uid_key=f"{seed}/{subject_id}/lr", series_number=2,
        slice_thickness=cfg["lr"]["psf_fwhm_mm"][2], kvp=120, model_name="clinical CT phantom",
    )  # fmt: skip
    write_ct_series(
        hr_img.array, hr_img.spacing, hr_img.origin, np.eye(3), hr_dir,
        patient_id=subject_id, series_description="synthetic HR-pQCT, left proximal femur ex situ",
        uid_key=f"{seed}/{subject_id}/hr", series_number=3, kvp=59.4, model_name="HR-pQCT phantom",
        study_date="20260102",
    )  # fmt: skip


def synthesize_subject(
    subject_id: str, index: int, cfg: dict, seed: int, lr_dir, hr_dir, truth_dir
) -> dict:
    """Draw, render and write one subject. Outputs appear only once complete (temp + rename)."""
    subj = draw_subject(cfg, seed, index, subject_id)
    rng = subject_rng(seed, 10_000 + index)
    hr_img, tissue, regions = render_hr(subj, cfg, rng)
    log.info("%s: HR grid %s at %.3f mm", subject_id, hr_img.array.shape, cfg["hr"]["voxel_mm"])
    lo = np.asarray(hr_img.origin)
    hi = lo + (np.asarray(hr_img.array.shape[::-1]) - 1) * np.asarray(hr_img.spacing)
    lr_img, lr_mask, lr_info = render_lr(subj, cfg, rng, (lo, hi))
    log.info("%s: LR grid %s, SNR in femur %.2f", subject_id, lr_img.array.shape, lr_info["snr_femur"])

    with atomic_dir(truth_dir) as tmp:
        femur = Volume((tissue.array > 0).astype(np.uint8), tissue.spacing, tissue.origin)
        write_volume(femur, tmp / "femur_mask.nii.gz")
        write_volume(tissue, tmp / "tissue.nii.gz")
        write_volume(regions, tmp / "regions.nii.gz")
        write_volume(lr_mask, tmp / "femur_mask_lr.nii.gz")
        sitk.WriteTransform(pose_transform(subj), str(tmp / "pose.tfm"))
        record = {
            "subject": subject_id,
            "index": index,
            "seed": seed,
            "size_factor": subj.size,
            "anatomy_scale": cfg["anatomy_scale"],
            "neck_shaft_angle_deg": subj.shape.neck_shaft_angle_deg,
            "anteversion_deg": subj.shape.anteversion_deg,
            "head_radius_mm": subj.shape.head_radius,
            "bone_loss_factor": subj.bone_loss,
            "structure": {
                r: {"bvtv_target": s.bvtv, "period_mm": s.period_mm, "rod_fraction": s.rod_fraction}
                for r, s in subj.structure.items()
            },
            "cortex_mm": {k: v * subj.shape.scale for k, v in subj.shape.cortex_mm.items()},
            "pose": {
                "convention": "p_LR = R @ p_HR + t (LPS mm); the ITK transform HR(fixed) -> LR(moving)",
                "R": subj.rotation.tolist(),
                "t": subj.translation.tolist(),
                "rotation_deg": rotation_angle_deg(subj.rotation),
                "head_centre_hr": subj.shape.head_center.tolist(),
                "head_centre_lr": (subj.rotation @ subj.shape.head_center + subj.translation).tolist(),
            },
            "hr_cut_z_mm": subj.z_cut,
            "hr_grid": {"shape_zyx": list(hr_img.array.shape), "spacing": hr_img.spacing, "origin": hr_img.origin},
            "lr_grid": {"shape_zyx": list(lr_img.array.shape), "spacing": lr_img.spacing, "origin": lr_img.origin},
            "lr_noise": lr_info,
        }
        (tmp / "subject.json").write_text(json.dumps(record, indent=2))
        write_scans(subject_id, cfg, seed, lr_img, hr_img, tmp / "lr_dicom", tmp / "hr_dicom")
        # everything is complete: move the series, then (on leaving the block) the truth, into place
        replace_dir(tmp / "lr_dicom", lr_dir)
        replace_dir(tmp / "hr_dicom", hr_dir)
    return record


# The HR column of the paper's Table 1 (mean, SD over 50 subjects; lengths in mm).
PAPER_HR = {
    ("head", "BV/TV"): (0.56, 0.06), ("head", "Tb.Th"): (0.58, 0.08),
    ("head", "Tb.Sp"): (0.64, 0.05), ("head", "Tb.N"): (0.82, 0.06),
    ("neck", "BV/TV"): (0.11, 0.10), ("neck", "Tb.Th"): (0.35, 0.14),
    ("neck", "Tb.Sp"): (3.5, 6.0), ("neck", "Tb.N"): (0.53, 0.25),
    ("trochanter", "BV/TV"): (0.11, 0.09), ("trochanter", "Tb.Th"): (0.30, 0.05),
    ("trochanter", "Tb.Sp"): (1.6, 0.8), ("trochanter", "Tb.N"): (0.60, 0.18),
}  # fmt: skip


def truth_ranges(morph: pd.DataFrame) -> pd.DataFrame:
    """Cohort mean, SD, min and max of the truth morphometry per region and metric, beside the
    paper's HR column."""
    g = morph.groupby(["region", "metric"])["value"]
    out = g.agg(["mean", "std", "min", "max"]).reset_index()
    out["paper_hr_mean"] = [PAPER_HR.get((r, m), (np.nan, np.nan))[0] for r, m in zip(out.region, out.metric)]
    out["paper_hr_sd"] = [PAPER_HR.get((r, m), (np.nan, np.nan))[1] for r, m in zip(out.region, out.metric)]
    order = {r: i for i, r in enumerate(REGION_ORDER)}
    morder = {m: i for i, m in enumerate(("BV/TV", "Tb.Th", "Tb.Sp", "Tb.N"))}
    out = out.sort_values(["region", "metric"], key=lambda c: c.map(order if c.name == "region" else morder))
    return out.reset_index(drop=True)


def summarize_cohort(subjects, lr_dirs, hr_dirs, truth_dirs, truth_tables, sheet, morphometry, summary, ranges, preview, preview_subject):
    """Write the synthetic cohort's subjects sheet, all truth morphometry (long form), the
    per-subject parameters with the truth ranges next to the paper's, and a preview PNG."""
    from .cohort import load_subjects
    from .figures import subject_preview

    subjects = list(subjects)
    sheet_df = pd.DataFrame({"subject": subjects, "lr": list(lr_dirs), "hr": list(hr_dirs), "split": ""})
    recs, morphs = [], []
    for s, t, table in zip(subjects, truth_dirs, truth_tables):
        rec = json.loads((Path(t) / "subject.json").read_text())
        recs.append(
            {
                "subject": s,
                "size_factor": rec["size_factor"],
                "neck_shaft_angle_deg": rec["neck_shaft_angle_deg"],
                "anteversion_deg": rec["anteversion_deg"],
                "bone_loss_factor": rec["bone_loss_factor"],
                "pose_rotation_deg": rec["pose"]["rotation_deg"],
                "lr_snr_femur": rec["lr_noise"]["snr_femur"],
                "lr_noise_hu": rec["lr_noise"]["noise_hu"],
            }
        )
        morphs.append(pd.read_csv(table, sep="\t"))
    morph = pd.concat(morphs, ignore_index=True)
    for col in ("size_factor", "neck_shaft_angle_deg", "bone_loss_factor"):
        sheet_df[col] = [round(r[col], 4) for r in recs]
    write_tsv(sheet_df, sheet)
    load_subjects(sheet)  # the sheet we wrote must pass the same checks as a user's
    write_tsv(morph, morphometry, float_format="%.6g")
    write_tsv(pd.DataFrame(recs), summary, float_format="%.5g")
    write_tsv(truth_ranges(morph), ranges, float_format="%.4g")
    i = subjects.index(preview_subject) if preview_subject in subjects else 0
    subject_preview(lr_dirs[i], hr_dirs[i], truth_dirs[i], preview)
