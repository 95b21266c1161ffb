"""Rule clinical_evaluate: a clinical-only patient's bone mask, ROIs (own placement) and
morphometry of the SR volume, written as metrics.csv with a one-page summary (PDF and PNG); for a
patient whose scan could not be used, the error record and a page that says why."""

from femursr.workflow import limit_threads, script_logging

limit_threads(snakemake.threads)  # noqa: F821  (before numpy and Open3D are imported)

from pathlib import Path

import numba

from femursr.clinical import EvaluationOptions, finish_patient

numba.set_num_threads(max(1, min(snakemake.threads, numba.config.NUMBA_NUM_THREADS)))  # noqa: F821

with script_logging(snakemake.log[0]) as log:  # noqa: F821
    sm = snakemake  # noqa: F821
    record = finish_patient(
        subject=sm.wildcards.subject,
        prepared_dir=sm.input.prepared,
        card_path=sm.input.card,
        templates=sm.input.get("templates"),
        sr=sm.input.get("sr"),
        timing=sm.input.get("timing"),
        samples_dir=sm.input.get("samples"),
        options=EvaluationOptions.from_config(sm.params.evaluation),
        seed=sm.params.seed,
        out_metrics=sm.output.metrics,
        out_record=sm.output.record,
        out_pdf=sm.output.pdf,
        out_png=sm.output.png,
        # the nnU-Net bone model folder ({model}/fold_{k}/checkpoint_final.pth), bone-mask backend nnunet
        bone_model=Path(sm.input.bone_model).parents[1] if sm.input.get("bone_model") else None,
    )
    log.info("patient %s: %s", sm.wildcards.subject, record["status"] if record["status"] == "ok" else record["error"])
