"""Rule split: subjects with both scans into train, validation and test (results/split.tsv)."""

from femursr.workflow import limit_threads, script_logging

limit_threads(snakemake.threads)  # noqa: F821  (before numpy is imported)

from femursr.split import PARTS, split_subjects, write_split

with script_logging(snakemake.log[0]) as log:  # noqa: F821
    sm = snakemake  # noqa: F821
    split = split_subjects(sm.params.subjects, sm.params.fractions, sm.params.seed, fixed=sm.params.fixed)
    write_split(split, sm.output.table)
    for part in PARTS:
        members = split.part(part)
        log.info("%s: %d subject(s): %s", part, len(members), ", ".join(members))
