"""Rule register: automatic rigid registration of the clinical CT (moving) to the HR (fixed), with QC.

A registration whose QC figures fail the checks stops this subject; its QC picture and record are
kept beside the log (not as outputs) so that the failure can be inspected.
"""

from femursr.workflow import limit_threads, script_logging

limit_threads(snakemake.threads)  # noqa: F821  (before numpy is imported)

from pathlib import Path

import SimpleITK as sitk

from femursr.registration import RegistrationError, check_registration, register_rigid, write_registration_outputs
from femursr.volume import read_volume

with script_logging(snakemake.log[0]) as log:  # noqa: F821
    sm = snakemake  # noqa: F821
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(sm.threads)
    opts = dict(sm.params.options)
    min_dice = opts.pop("min_dice")
    min_structure_ncc = opts.pop("min_structure_ncc")
    label = f"subject {sm.wildcards.subject}"
    hr = read_volume(sm.input.hr)
    lr = read_volume(sm.input.lr)
    result = register_rigid(hr, lr, label=label, **opts)
    try:
        check_registration(result, min_dice=min_dice, min_structure_ncc=min_structure_ncc, label=label)
    except RegistrationError:
        side = Path(sm.log[0]).with_suffix("")
        write_registration_outputs(result, f"{side}_failed.tfm", f"{side}_failed_qc.json", f"{side}_failed_qc.png", hr, lr=lr)
        log.error("QC of the failed registration kept in %s_failed_qc.{json,png}", side)
        raise
    # the QC figure resamples only its three slices of the HR grid, not the whole grid
    write_registration_outputs(result, sm.output.transform, sm.output.qc, sm.output.png, hr, lr=lr)
    log.info("%s registered: metric %.4f, femur Dice %.3f", label, result.metric, result.dice)
