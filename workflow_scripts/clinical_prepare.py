"""Checkpoint clinical_prepare: a clinical-only patient's LR onto its own isotropic grid (the femur
found on the native LR, its side, a field-of-view check), femur mask and normalization as for the
model's training data; or an error record when the scan cannot be used (the other patients go on).
"""

from femursr.workflow import limit_threads, script_logging

limit_threads(snakemake.threads)  # noqa: F821  (before numpy is imported)

import SimpleITK as sitk

from femursr.clinical import PrepareOptions, prepare_clinical, read_card

with script_logging(snakemake.log[0]) as log:  # noqa: F821
    sm = snakemake  # noqa: F821
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(sm.threads)
    record = prepare_clinical(
        sm.input.lr,
        sm.output.folder,
        card=read_card(sm.input.card),
        threshold=sm.params.threshold,
        resampling=sm.params.resampling,
        options=PrepareOptions(**sm.params.options),
        side=sm.params.side,
        subject=sm.wildcards.subject,
    )
    log.info("patient %s: %s%s", sm.wildcards.subject, record["status"], f" ({record['error']})" if record["error"] else "")
