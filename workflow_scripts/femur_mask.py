"""Rule femur_mask: the femur mask on the HR grid from the clinical CT (threshold or nnU-Net backend)."""

import json

from femursr.workflow import limit_threads, script_logging

limit_threads(snakemake.threads)  # noqa: F821  (before numpy is imported)

from femursr.atomic import atomic_file
from femursr.masks import ThresholdParams, threshold_femur_mask
from femursr.volume import read_volume, write_volume

with script_logging(snakemake.log[0]) as log:  # noqa: F821
    sm = snakemake  # noqa: F821
    opts = sm.params.options
    label = f"subject {sm.wildcards.subject}"
    lr = read_volume(sm.input.lr)
    if opts["backend"] != "threshold":  # the config schema admits only the backends that exist
        raise ValueError(f"{label}: unknown femur-mask backend {opts['backend']!r}")
    mask, report = threshold_femur_mask(lr, ThresholdParams(**opts["threshold"]), label=label)
    report["backend"] = opts["backend"]
    write_volume(mask, sm.output.mask)
    with atomic_file(sm.output.report) as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    log.info("%s: femur mask %.2f ml (%s)", label, report.get("femur_ml", float("nan")), opts["backend"])
