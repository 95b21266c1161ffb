"""Rule results_tables: image quality, Table 1 (CSV, Markdown, LaTeX), the statistics, and the
three on one HTML page for `snakemake --report` (femursr.plots.results_page)."""

from femursr.workflow import limit_threads, script_logging

limit_threads(snakemake.threads)  # noqa: F821  (before numpy is imported)

import json

import pandas as pd

from femursr.atomic import atomic_file, write_tsv
from femursr.plots import results_page
from femursr.quality import quality_table
from femursr.tables import better_counts, statistics_table, table1, table1_layout, to_latex, to_markdown

with script_logging(snakemake.log[0]) as log:  # noqa: F821
    sm = snakemake  # noqa: F821
    st = sm.params.statistics
    rows = [json.loads(open(p).read()) for p in sm.input.quality]
    quality = quality_table(rows)
    write_tsv(quality, sm.output.quality, sep=",")
    log.info("image quality:\n%s", quality.to_string(index=False))

    tidy = pd.read_csv(sm.input.morphometry, sep="\t")
    tidy = tidy[tidy.subject.isin(sm.params.subjects)]
    long = table1(tidy)
    write_tsv(long, sm.output.table1, sep=",")
    layout = table1_layout(long)
    with atomic_file(sm.output.markdown) as tmp:
        tmp.write_text(
            "Table 1. Mean ± SD over the test subjects and Pearson r against the HR; Tb.Th and Tb.Sp in mm, "
            "Tb.N in 1/mm (Tb.N = 1 / (Tb.Th + Tb.Sp)).\n\n" + to_markdown(layout)
        )
    with atomic_file(sm.output.latex) as tmp:
        tmp.write_text(to_latex(layout))
    log.info("Table 1:\n%s", to_markdown(layout))

    stats_long = statistics_table(tidy, alpha=st["alpha"], p_adjust=st["p_adjust"])
    write_tsv(stats_long, sm.output.statistics, sep=",")
    counts = better_counts(stats_long).reset_index()
    write_tsv(counts, sm.output.summary, sep=",")
    log.info("significantly better than the LR (of %d metric x ROI tables):\n%s", len(stats_long.groupby(["metric", "region"])), counts.to_string(index=False))

    # the page reads the tables back as written, so that it shows exactly what the CSVs hold
    read = lambda p: pd.read_csv(p, keep_default_na=True)  # noqa: E731
    page = results_page(read(sm.output.quality), read(sm.output.table1), read(sm.output.statistics), read(sm.output.summary),
                        alpha=st["alpha"], p_adjust=st["p_adjust"], subjects=sm.params.subjects)  # fmt: skip
    with atomic_file(sm.output.html) as tmp:
        tmp.write_text(page, encoding="utf-8")
    log.info("results page: %d characters, %d test subjects", len(page), len(sm.params.subjects))
