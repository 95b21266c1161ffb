"""Rule clinical_table: the metrics of every clinical-only patient in one table (error records
included), results/clinical/metrics.tsv."""

from femursr.workflow import limit_threads, script_logging

limit_threads(snakemake.threads)  # noqa: F821  (before numpy is imported)

from femursr.atomic import write_tsv
from femursr.clinical import collect_tables

with script_logging(snakemake.log[0]) as log:  # noqa: F821
    sm = snakemake  # noqa: F821
    table = collect_tables(list(sm.input.metrics))
    write_tsv(table, sm.output.table, float_format="%.6g")
    failed = sorted(set(table.loc[table.status != "ok", "subject"]))
    log.info("%d patient(s), %d without metrics%s", table.subject.nunique(), len(failed), f": {', '.join(failed)}" if failed else "")
