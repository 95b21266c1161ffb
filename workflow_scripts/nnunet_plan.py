"""Rule nnunet_plan: nnU-Net fingerprint, experiment planning and preprocessing of one configuration.

nnU-Net's integrity check, fingerprint and preprocessing run in worker processes started with
``spawn``, which run this file again as ``__mp_main__`` (Snakemake points ``__file__`` at it):
all the work stays under ``if __name__ == "__main__":``, and the top level only imports.
"""

from pathlib import Path

from femursr.workflow import limit_threads, script_logging, stdout_to_log

if __name__ == "__main__":
    limit_threads(snakemake.threads)  # noqa: F821  (before numpy is imported)

    from femursr.nnunet import plan_and_preprocess

    with script_logging(snakemake.log[0]) as log, stdout_to_log(snakemake.log[0]):  # noqa: F821
        sm = snakemake  # noqa: F821
        out = Path(sm.output.preprocessed)
        root = out.parents[1]  # root/nnUNet_preprocessed/Dataset{id}_{name}
        if Path(sm.input.dataset).resolve() != (root / "nnUNet_raw" / out.name).resolve():
            raise RuntimeError(f"{sm.input.dataset}: expected the raw dataset beside {out}")
        folder = plan_and_preprocess(root, sm.params.dataset_id, sm.params.configuration, num_processes=sm.threads)
        log.info("nnU-Net %s planned and preprocessed (%s)", folder, sm.params.configuration)
