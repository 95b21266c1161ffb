"""Rule clinical_export_model: a trained SR model as a portable folder (weights, ROI templates and
model.json with the normalization, the training grid's voxel, the training data and the validation
figures), to be copied to a machine without the training data (config clinical.model_dir)."""

from femursr.workflow import limit_threads, script_logging

limit_threads(snakemake.threads)  # noqa: F821  (before numpy is imported)

from femursr.portable import export_model

with script_logging(snakemake.log[0]) as log:  # noqa: F821
    sm = snakemake  # noqa: F821
    masks = sm.input.train_masks
    card = export_model(
        generator=sm.input.generator,
        record=sm.input.record,
        templates=sm.input.templates,
        train_volumes=[masks] if isinstance(masks, str) else list(masks),
        out_generator=sm.output.generator,
        out_card=sm.output.card,
        out_templates=sm.output.templates,
        method=sm.params.method,
        normalization=sm.params.normalization,
        evaluation=sm.params.evaluation,
        template_side=sm.params.template_side,
        samples=sm.params.samples,
        seed=sm.params.seed,
        cohort=sm.params.cohort,
    )
    log.info("%s exported: training grid %g mm, %d training subjects, validation %s", card["method"], card["voxel_mm"],
             len(card["training"]["train_subjects"]), card["validation"])  # fmt: skip
