"""Rule truth_morphometry: Hildebrand BV/TV, Tb.Th, Tb.Sp and Tb.N of one synthetic subject's
truth tissue map, per region (femursr.truth)."""

from femursr.workflow import limit_threads, script_logging

limit_threads(snakemake.threads)  # noqa: F821  (before numpy is imported)

from pathlib import Path

from femursr.atomic import write_tsv
from femursr.truth import truth_morphometry
from femursr.volume import read_volume

with script_logging(snakemake.log[0]) as log:  # noqa: F821 (snakemake is injected)
    sm = snakemake  # noqa: F821
    truth = Path(sm.input.truth)
    table = truth_morphometry(sm.wildcards.subject, read_volume(truth / "tissue.nii.gz"), read_volume(truth / "regions.nii.gz"))
    write_tsv(table, sm.output.table, float_format="%.6g")
    log.info("%s: truth morphometry of %d regions", sm.wildcards.subject, table["region"].nunique())
