"""Rule synthesize_cohort: the synthetic cohort's subjects sheet, truth tables and a preview."""

import os

# one BLAS/OpenMP thread per declared rule thread: parallel jobs must not oversubscribe cores
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = str(snakemake.threads)  # noqa: F821

from femursr.phantom import summarize_cohort
from femursr.workflow import script_logging

with script_logging(snakemake.log[0]):  # noqa: F821 (snakemake is injected)
    sm = snakemake  # noqa: F821
    summarize_cohort(
        subjects=sm.params.subjects,
        lr_dirs=sm.input.lr,
        hr_dirs=sm.input.hr,
        truth_dirs=sm.input.truth,
        sheet=sm.output.sheet,
        morphometry=sm.output.morphometry,
        summary=sm.output.summary,
        ranges=sm.output.ranges,
        preview=sm.output.preview,
        preview_subject=sm.params.preview_subject,
    )
