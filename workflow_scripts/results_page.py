"""Rule results_page: the study's tables (Table 1 in the paper's layout, image quality,
statistics) as one HTML page for `snakemake --report` (femursr.plots.results_page)."""

from femursr.workflow import limit_threads, script_logging

limit_threads(snakemake.threads)  # noqa: F821  (before numpy is imported)

import pandas as pd

from femursr.atomic import atomic_file
from femursr.plots import results_page

with script_logging(snakemake.log[0]) as log:  # noqa: F821
    sm = snakemake  # noqa: F821
    st = sm.params.statistics
    read = lambda p: pd.read_csv(p, keep_default_na=True)  # noqa: E731
    page = results_page(read(sm.input.quality), read(sm.input.table1), read(sm.input.statistics), read(sm.input.summary),
                        alpha=st["alpha"], p_adjust=st["p_adjust"], subjects=sm.params.subjects)  # fmt: skip
    with atomic_file(sm.output.html) as tmp:
        tmp.write_text(page, encoding="utf-8")
    log.info("results page: %d characters, %d test subjects", len(page), len(sm.params.subjects))
