"""Rule synthesize_subject: one synthetic subject's LR and HR DICOM series and its truth."""

from femursr.workflow import limit_threads, script_logging

limit_threads(snakemake.threads)  # noqa: F821  (before numpy is imported)

from femursr.phantom import synthesize_subject

with script_logging(snakemake.log[0]) as log:  # noqa: F821 (snakemake is injected)
    sm = snakemake  # noqa: F821
    rec = synthesize_subject(
        sm.wildcards.subject,
        sm.params.index,
        sm.params.synthetic,
        sm.params.seed,
        lr_dir=sm.output.lr,
        hr_dir=sm.output.hr,
        truth_dir=sm.output.truth,
    )
    log.info("%s written: HR %s, LR %s", sm.wildcards.subject, rec["hr_grid"]["shape_zyx"], rec["lr_grid"]["shape_zyx"])
