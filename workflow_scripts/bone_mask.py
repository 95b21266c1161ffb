"""Rule bone_mask: the bone-structure mask of one evaluated volume (LR on the HR grid, HR or an SR
output), inside the subject's femur mask (femursr.bonemask: threshold or nnunet backend)."""

import json

from femursr.workflow import limit_threads, script_logging

limit_threads(snakemake.threads)  # noqa: F821  (before numpy and torch are imported)

from pathlib import Path

from femursr.atomic import atomic_file
from femursr.bonemask import bone_segmenter, volume_ml
from femursr.volume import read_volume, write_volume

with script_logging(snakemake.log[0]) as log:  # noqa: F821
    sm = snakemake  # noqa: F821
    opts = sm.params.options
    label = f"subject {sm.wildcards.subject}, {sm.wildcards.method} ({sm.input.volume})"
    report = {"subject": sm.wildcards.subject, "method": sm.wildcards.method, "volume": str(sm.input.volume),
              "backend": opts["backend"]}  # fmt: skip
    if opts["backend"] == "nnunet":
        import torch

        torch.set_num_threads(sm.threads)
        model_folder = Path(sm.input.model).parents[1]  # {model}/fold_{k}/checkpoint_final.pth
        report.update(model_folder=str(model_folder), fold=opts["nnunet"]["fold"], checkpoint=str(sm.input.model))
        segment = bone_segmenter(opts, model_folder)
    else:
        report.update(sigma_mm=opts["sigma_mm"], threshold=opts["threshold"])
        segment = bone_segmenter(opts)
    femur = read_volume(sm.input.femur)
    bone = segment(read_volume(sm.input.volume), femur, label)
    femur_ml, bone_ml = volume_ml(femur), volume_ml(bone)
    if bone_ml == 0:
        # a result, not a failure (an SR model can lose all bone); the HR's ROI placement stops
        why = (f"no voxel inside the femur mask exceeds the threshold {opts['threshold']} (evaluation.bone_mask.threshold, "
               "on the normalized intensity)" if opts["backend"] == "threshold" else "the nnU-Net bone model found no bone")  # fmt: skip
        log.warning("%s: %s: the bone mask is empty", label, why)
    report.update(bone_ml=bone_ml, femur_ml=femur_ml, bone_fraction_of_femur=bone_ml / femur_ml if femur_ml else float("nan"))
    write_volume(bone, sm.output.mask)
    with atomic_file(sm.output.report) as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    log.info("%s: bone %.2f mL, %.1f %% of the femur mask (%s)", label, bone_ml, 100 * report["bone_fraction_of_femur"], opts["backend"])
