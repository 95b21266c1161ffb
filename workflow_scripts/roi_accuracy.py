"""Rule roi_accuracy (synthetic cohort): how far the HR's own ROI centres lie from the centres
computed the same way (mean of the same surface points) from the truth region labels, per subject
and region, in mm (femursr.rois.truth_centre_errors)."""

import json

from femursr.workflow import limit_threads, script_logging

limit_threads(snakemake.threads)  # noqa: F821  (before numpy is imported)

from pathlib import Path

import pandas as pd

from femursr.atomic import write_tsv
from femursr.pointcloud import PointCloud
from femursr.rois import truth_centre_errors
from femursr.volume import read_volume

with script_logging(snakemake.log[0]) as log:  # noqa: F821
    sm = snakemake  # noqa: F821
    rows = []
    for subject, rois, points, truth in zip(sm.params.subjects, sm.input.rois, sm.input.points, sm.input.truth):
        rec = json.loads(Path(rois).read_text())
        regions = Path(truth) / "regions.nii.gz"
        errors = truth_centre_errors(PointCloud.load(points), read_volume(regions), rec["own"]["centres_mm"], where=f"subject {subject}: {regions}")
        glob = truth_centre_errors(PointCloud.load(points), read_volume(regions), rec["own"]["centres_global_mm"], where=f"subject {subject}: {regions}")
        for region, e in errors.items():
            rows.append({
                "subject": subject, "region": region, "distance_mm": e["distance_mm"],
                "distance_global_mm": glob[region]["distance_mm"], "template": rec["own"]["template"],
                "template_is_subject": rec["own"]["template"] == subject,
                "fitness": rec["own"]["match"]["fitness"], "rmse_mm": rec["own"]["match"]["rmse_mm"],
            })  # fmt: skip
    table = pd.DataFrame(rows)
    write_tsv(table, sm.output.table, float_format="%.4g")
    worst = table.groupby("region")["distance_mm"].agg(["mean", "max"])
    log.info("HR ROI centre to truth (mm), over %d subjects:\n%s", len(sm.params.subjects), worst.to_string())
