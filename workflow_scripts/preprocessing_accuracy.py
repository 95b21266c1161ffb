"""Rule preprocessing_accuracy: registration TRE and femur-mask Dice against the synthetic truth."""

from femursr.atomic import write_tsv
from femursr.validation import preprocessing_accuracy
from femursr.workflow import script_logging

with script_logging(snakemake.log[0]) as log:  # noqa: F821
    sm = snakemake  # noqa: F821
    df = preprocessing_accuracy(sm.params.subjects, sm.input.transforms, sm.input.masks, sm.input.truth, sm.input.qc)
    write_tsv(df, sm.output.table, float_format="%.4f")
    log.info("\n%s", df.to_string(index=False))
    log.info("TRE mean over subjects %.3f mm (max %.3f); mask Dice min %.4f", df.tre_mean_mm.mean(), df.tre_mean_mm.max(), df.mask_dice.min())
