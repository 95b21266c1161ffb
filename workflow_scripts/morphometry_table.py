"""Rule morphometry_table: all per-volume morphometry tables in one (results/morphometry/all.tsv),
and the ROI placements of all volumes (results/evaluation/rois.tsv: centres, where they come
from, fractions outside the volume and the femur, distance of each volume's own centres to the
HR's in mm)."""

import json

from femursr.workflow import limit_threads, script_logging

limit_threads(snakemake.threads)  # noqa: F821  (before numpy is imported)

import pandas as pd

from femursr.atomic import write_tsv
from femursr.rois import roi_table_rows

with script_logging(snakemake.log[0]) as log:  # noqa: F821
    sm = snakemake  # noqa: F821
    tables = [pd.read_csv(p, sep="\t", dtype={"subject": str}) for p in sm.input.tables]
    all_rows = pd.concat(tables, ignore_index=True)
    write_tsv(all_rows, sm.output.table, float_format="%.6g")
    rows = [roi_table_rows(json.loads(open(p).read())) for p in sm.input.rois]
    rois = pd.concat(rows, ignore_index=True)
    write_tsv(rois, sm.output.rois, float_format="%.6g")
    summary = rois.groupby(["method", "region"])["own_to_hr_mm"].agg(["mean", "max"])
    log.info("%d volumes; own ROI centre to the HR's (mm):\n%s", len(tables), summary.to_string())
