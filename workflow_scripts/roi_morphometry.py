"""Rule roi_morphometry: BV/TV, Tb.Th, Tb.Sp and Tb.N (= 1 / (Tb.Th + Tb.Sp), the study's
convention) in the head, neck and trochanter ROIs of one evaluated volume, exact Hildebrand local
thickness in mm on each ROI with a margin of context (femursr.roimetrics.roi_morphometry); one tidy
table (subject, method, region, metric, value, unit, definition)."""

import json

from femursr.workflow import limit_threads, script_logging

limit_threads(snakemake.threads)  # noqa: F821  (before numpy is imported)

import numba

from femursr.atomic import write_tsv
from femursr.roimetrics import roi_morphometry, tidy_rows
from femursr.rois import Roi
from femursr.volume import read_volume

numba.set_num_threads(max(1, min(snakemake.threads, numba.config.NUMBA_NUM_THREADS)))  # noqa: F821

with script_logging(snakemake.log[0]) as log:  # noqa: F821
    sm = snakemake  # noqa: F821
    subject, method = sm.wildcards.subject, sm.wildcards.method
    record = json.loads(open(sm.input.rois).read())
    bone = read_volume(sm.input.bone)
    femur = read_volume(sm.input.femur)
    if not bone.same_grid(femur):
        raise ValueError(f"subject {subject}, {method}: the bone mask {sm.input.bone} and the femur mask {sm.input.femur} are not on the same grid")
    results = {}
    for r in record["rois"]:
        roi = Roi(**r)
        m = roi_morphometry(bone, femur, roi, sm.params.context_mm)
        results[roi.region] = m
        log.info("subject %s, %s, %s ROI (%.0f %% outside the femur): BV/TV %.3f, Tb.Th %.3f mm, Tb.Sp %.3f mm, Tb.N %.3f /mm",
                 subject, method, roi.region, 100 * roi.outside_femur, m.bv_tv, m.tb_th_mm, m.tb_sp_mm, m.tb_n_per_mm)  # fmt: skip
    table = tidy_rows(subject, method, results)
    table["definition"] = table["definition"] + f" (local thickness on the ROI with {sm.params.context_mm:g} mm of context)"
    write_tsv(table, sm.output.table, float_format="%.6g")
