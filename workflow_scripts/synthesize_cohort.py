"""Rule synthesize_cohort: the synthetic cohort's subjects sheet, truth tables and a preview."""

from femursr.workflow import limit_threads, script_logging

limit_threads(snakemake.threads)  # noqa: F821  (before numpy is imported)

from femursr.phantom import summarize_cohort

with script_logging(snakemake.log[0]):  # noqa: F821 (snakemake is injected)
    sm = snakemake  # noqa: F821
    summarize_cohort(
        subjects=sm.params.subjects,
        lr_dirs=sm.input.lr,
        hr_dirs=sm.input.hr,
        truth_dirs=sm.input.truth,
        truth_tables=sm.input.truth_tables,
        sheet=sm.output.sheet,
        morphometry=sm.output.morphometry,
        summary=sm.output.summary,
        ranges=sm.output.ranges,
        preview=sm.output.preview,
        preview_subject=sm.params.preview_subject,
    )
