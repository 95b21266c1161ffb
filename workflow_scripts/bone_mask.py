"""Rule bone_mask: the bone-structure mask of one evaluated volume (LR on the HR grid, HR or an SR
output), inside the subject's femur mask (femursr.bonemask, threshold backend)."""

import json

from femursr.workflow import limit_threads, script_logging

limit_threads(snakemake.threads)  # noqa: F821  (before numpy is imported)

import numpy as np

from femursr.atomic import atomic_file
from femursr.bonemask import BoneThreshold, threshold_bone_mask, volume_ml
from femursr.volume import read_volume, write_volume

with script_logging(snakemake.log[0]) as log:  # noqa: F821
    sm = snakemake  # noqa: F821
    opts = sm.params.options
    label = f"subject {sm.wildcards.subject}, {sm.wildcards.method} ({sm.input.volume})"
    if opts["backend"] != "threshold":  # the config schema admits only the backends that exist
        raise ValueError(f"{label}: unknown bone-mask backend {opts['backend']!r}")
    params = BoneThreshold(sigma_mm=opts["sigma_mm"], threshold=opts["threshold"])
    femur = read_volume(sm.input.femur)
    bone = threshold_bone_mask(read_volume(sm.input.volume), femur, params, label=label)
    femur_ml, bone_ml = volume_ml(femur), volume_ml(bone)
    if bone_ml == 0:
        # a result, not a failure (an SR model can lose all bone); the HR's ROI placement stops
        log.warning("%s: no voxel inside the femur mask exceeds the threshold %s (evaluation.bone_mask.threshold, "
                    "on the normalized intensity): the bone mask is empty", label, params.threshold)  # fmt: skip
    report = {
        "subject": sm.wildcards.subject,
        "method": sm.wildcards.method,
        "volume": str(sm.input.volume),
        "backend": "threshold",
        "sigma_mm": params.sigma_mm,
        "threshold": params.threshold,
        "bone_ml": bone_ml,
        "femur_ml": femur_ml,
        "bone_fraction_of_femur": bone_ml / femur_ml if femur_ml else float("nan"),
    }
    write_volume(bone, sm.output.mask)
    with atomic_file(sm.output.report) as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    log.info("%s: bone %.2f mL, %.1f %% of the femur mask", label, bone_ml, 100 * report["bone_fraction_of_femur"])
