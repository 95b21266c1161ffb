"""Rule place_rois: the ROIs of one evaluated volume. Its own placement (femur outline of its
bone mask -> surface points -> nearest template by bone volume -> centroids, RANSAC on FPFH, ICP
with scaling -> labels -> region centres) is always computed; the ROIs used are its own
(roi_source own) or the HR's (roi_source hr, or when its bone mask outlines too little of the
femur). Writes the ROIs and the placement (JSON), the labelled surface points and a QC PNG."""

import json

from femursr.workflow import limit_threads, script_logging

limit_threads(snakemake.threads)  # noqa: F821  (before numpy and Open3D are imported)

from dataclasses import asdict

import numpy as np

from femursr.atomic import atomic_file
from femursr.bonemask import bone_outline, volume_ml
from femursr.pointcloud import MatchParams, PointCloud
from femursr.rois import place_from_outline, qc_figure, roi_boxes
from femursr.templates import load_templates
from femursr.volume import read_volume

with script_logging(snakemake.log[0]) as log:  # noqa: F821
    sm = snakemake  # noqa: F821
    opts = sm.params.options
    method, subject = sm.wildcards.method, sm.wildcards.subject
    label = f"subject {subject}, {method}"
    bone = read_volume(sm.input.bone)
    femur = read_volume(sm.input.femur)
    templates = load_templates(sm.input.templates)
    outline = bone_outline(bone, femur, opts["outline_closing_mm"], opts["surface_voxel_mm"])
    femur_ml, outline_ml = volume_ml(femur), volume_ml(outline)
    fraction = outline_ml / femur_ml if femur_ml else 0.0
    log.info("%s: the bone mask outlines %.2f mL, %.1f %% of the femur mask (%.2f mL)", label, outline_ml, 100 * fraction, femur_ml)

    own, own_error = None, None
    if outline_ml > 0:
        params = MatchParams(**{"seed": sm.params.seed, **opts["matching"]})
        try:
            own = place_from_outline(outline, templates, opts["template_points"], opts["surface_voxel_mm"], params,
                                     opts["refine_radius"], seed=sm.params.seed)  # fmt: skip
        except (ValueError, RuntimeError) as err:  # no usable surface, or a match that cannot run
            own_error = f"own placement failed: {err}"
    else:
        own_error = "the bone mask outlines no femur"
    if own is not None:
        m = own.match
        log.info("%s: template %s (%.2f mL), scale %.4f, fitness %.3f, symmetric RMS distance %.3f mm",
                 label, own.template, own.template_bone_ml, m["transform"]["scale"], m["fitness"], m["rmse_mm"])  # fmt: skip

    hr = None if method == "HR" else json.loads(open(sm.input.hr_rois).read())
    hr_centres = None if hr is None else {r["region"]: r["centre_mm"] for r in hr["rois"]}
    own_ok = own is not None and fraction >= opts["min_outline_fraction"]
    if method == "HR":
        if not own_ok:
            raise ValueError(
                f"{label}: the HR cannot place its ROIs ({own_error or 'outline too small'}): its bone mask "
                f"{sm.input.bone} outlines {100 * fraction:.0f} % of the femur mask {sm.input.femur} "
                f"(evaluation.min_outline_fraction {opts['min_outline_fraction']}). Check evaluation.bone_mask "
                "(sigma_mm, threshold) against the HR's intensities, and the femur mask"
            )
        placed_by, reason, centres = "own", "", own.centres
    elif opts["roi_source"] == "hr":
        placed_by, reason, centres = "hr", "roi_source hr", hr_centres
    elif own_ok:
        placed_by, reason, centres = "own", "", own.centres
    else:
        placed_by = "hr-fallback"
        reason = (own_error + "; " if own_error else "") + (
            f"the bone mask outlines {100 * fraction:.0f} % of the femur mask, below evaluation.min_outline_fraction "
            f"{opts['min_outline_fraction']}: the HR's ROIs are used"
        )
        centres = hr_centres
        log.warning("%s: %s", label, reason)

    rois = roi_boxes(centres, femur, opts["roi_edge_vox"])
    for r in rois:
        if r.outside_volume > 0 or r.outside_femur > 0:
            log.warning("%s: the %s ROI lies %.1f %% outside the volume and %.1f %% outside the femur mask; the "
                        "morphometry counts only its voxels inside both", label, r.region, 100 * r.outside_volume, 100 * r.outside_femur)  # fmt: skip
    own_to_hr = {}
    if own is not None and hr_centres is not None:
        own_to_hr = {k: float(np.linalg.norm(np.asarray(v) - np.asarray(hr_centres[k]))) for k, v in own.centres.items()}
    record = {
        "subject": subject,
        "method": method,
        "roi_source": opts["roi_source"],
        "placed_by": placed_by,
        "reason": reason,
        "outline": {"outline_ml": outline_ml, "femur_ml": femur_ml, "fraction": fraction},
        "own": None if own is None else own.to_dict(),
        "own_error": own_error,
        "own_to_hr_mm": own_to_hr,
        "grid": {"shape_zyx": list(femur.shape), "spacing": femur.spacing, "origin": femur.origin, "direction": femur.direction},
        "rois": [asdict(r) for r in rois],
    }
    with atomic_file(sm.output.rois) as tmp:
        tmp.write_text(json.dumps(record, indent=2))
    cloud = own.cloud if own is not None else PointCloud(np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0, np.uint8))
    cloud.save(sm.output.points)
    if own is not None:
        title = (f"{subject} {method}: template {own.template}, scale {own.match['transform']['scale']:.3f}, fitness "
                 f"{own.match['fitness']:.2f}, RMS {own.match['rmse_mm']:.2f} mm; ROIs: {placed_by}")  # fmt: skip
    else:
        title = f"{subject} {method}: no own placement ({own_error}); ROIs: {placed_by}"
    qc_figure(read_volume(sm.input.volume), cloud, rois, title, sm.output.png)
    log.info("%s: ROIs (%s) at %s", label, placed_by, {r.region: np.round(r.centre_mm, 2).tolist() for r in rois})
