"""Rule femur_mask: the femur mask on the HR grid from the clinical CT (threshold or nnU-Net backend).

threshold: from the LR already resampled onto the HR grid. nnunet: from the native LR, whose
geometry is put into the HR frame with the registration (no interpolation); nnU-Net predicts the
femur at 1 mm over the whole LR scan (framed like its training scans) and the probability is
brought onto the HR grid (linear, threshold 0.5).
"""

import json

from femursr.workflow import limit_threads, script_logging

limit_threads(snakemake.threads)  # noqa: F821  (before numpy and torch are imported)

from pathlib import Path

import numpy as np

from femursr.atomic import atomic_file
from femursr.volume import read_volume, write_volume


def nnunet_mask(sm, opts, label):
    import time

    import SimpleITK as sitk
    import torch

    from femursr.nnunet import load_model, predict_mask
    from femursr.registration import in_fixed_frame

    torch.set_num_threads(sm.threads)
    model_folder = Path(sm.input.model).parents[1]  # {model}/fold_{k}/checkpoint_final.pth
    lr = in_fixed_frame(read_volume(sm.input.lr), sitk.ReadTransform(sm.input.transform))
    hr = read_volume(sm.input.hr)  # memory-mapped: only its grid is used
    t0 = time.perf_counter()
    predictor = load_model(model_folder, folds=[opts["fold"]], device=opts["device"], mirroring=opts["mirroring"])
    mask = predict_mask(predictor, lr, hr, spacing_mm=opts["spacing_mm"])
    info = predictor.femursr_model
    report = {
        "subject": sm.wildcards.subject,
        "model_folder": str(model_folder),
        "configuration": info["configuration"],
        "fold": opts["fold"],
        "trainer": info["trainer"],
        "checkpoint": str(sm.input.model),
        "predicted_on": f"native LR at {opts['spacing_mm']} mm, placed in the HR frame by {sm.input.transform}",
        "spacing_mm": opts["spacing_mm"],
        "device": str(predictor.device),
        "mirroring": opts["mirroring"],
        "seconds": time.perf_counter() - t0,
    }
    femur_ml = float(np.count_nonzero(mask.array)) * float(np.prod(mask.spacing)) / 1000.0
    report["femur_ml"] = femur_ml
    if femur_ml == 0:
        raise ValueError(
            f"{label}: nnU-Net model {model_folder} found no femur in {sm.input.lr} (inside the HR box); "
            "check that the model was trained on CTs like this one, and the registration QC"
        )
    return mask, report


with script_logging(snakemake.log[0]) as log:  # noqa: F821
    sm = snakemake  # noqa: F821
    opts = sm.params.options
    label = f"subject {sm.wildcards.subject}"
    if opts["backend"] == "threshold":
        from femursr.masks import ThresholdParams, threshold_femur_mask

        mask, report = threshold_femur_mask(read_volume(sm.input.lr), ThresholdParams(**opts["threshold"]), label=label)
    elif opts["backend"] == "nnunet":
        mask, report = nnunet_mask(sm, opts, label)
    else:  # the config schema admits only the backends that exist
        raise ValueError(f"{label}: unknown femur-mask backend {opts['backend']!r}")
    report["backend"] = opts["backend"]
    write_volume(mask, sm.output.mask)
    with atomic_file(sm.output.report) as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    log.info("%s: femur mask %.2f ml (%s)", label, report.get("femur_ml", float("nan")), opts["backend"])
