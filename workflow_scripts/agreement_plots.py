"""Rule agreement_plots: scatter and Bland-Altman plots of one method (LR or an SR variant)
against the HR, per metric and ROI, over the test subjects (femursr.plots)."""

from femursr.workflow import limit_threads, script_logging

limit_threads(snakemake.threads)  # noqa: F821  (before numpy is imported)

import pandas as pd

from femursr.plots import write_agreement_plots

with script_logging(snakemake.log[0]) as log:  # noqa: F821
    sm = snakemake  # noqa: F821
    tidy = pd.read_csv(sm.input.morphometry, sep="\t")
    agree = write_agreement_plots(tidy, sm.wildcards.method, sm.output.scatter, sm.output.bland_altman, subjects=sm.params.subjects)
    cols = ["metric", "region", "n", "r", "ccc", "bias", "loa_low", "loa_high"]
    log.info("%s against the HR:\n%s", sm.wildcards.method, agree[cols].to_string(index=False))
