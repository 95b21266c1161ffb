"""Rule nnunet_train: train one fold of the femur nnU-Net (trainer, configuration and budget from config).

Data-augmentation workers (when the rule has more than 2 threads) are separate processes: the
work stays under ``if __name__ == "__main__":`` so that a worker started with ``spawn``, which
runs this file again, only imports.
"""

from pathlib import Path

from femursr.workflow import limit_threads, script_logging, stdout_to_log

if __name__ == "__main__":
    limit_threads(snakemake.threads)  # noqa: F821  (before numpy and torch are imported)

    from femursr.nnunet import train

    with script_logging(snakemake.log[0]) as log, stdout_to_log(snakemake.log[0]):  # noqa: F821
        sm = snakemake  # noqa: F821
        o = sm.params.options
        out = Path(sm.output.checkpoint)
        root = out.parents[4]  # root/nnUNet_results/Dataset/model/fold_k/checkpoint_final.pth
        if Path(sm.input.preprocessed).resolve() != (root / "nnUNet_preprocessed" / out.parents[2].name).resolve():
            raise RuntimeError(f"{sm.input.preprocessed}: expected the preprocessed dataset beside {out}")
        model = train(
            root, sm.params.dataset_id, o["configuration"], o["fold"], trainer=o["trainer"], epochs=o["epochs"],
            iterations_per_epoch=o["iterations_per_epoch"], val_iterations=o["val_iterations"], device=o["device"],
            num_threads=sm.threads,
            # on 2 cores the augmentation runs in this process (and the CPU training is repeatable)
            augmentation_processes=max(0, sm.threads - 2), seed=o["seed"],
        )  # fmt: skip
        if not out.is_file():
            raise RuntimeError(f"nnU-Net training wrote {model}, but not {out}")
        log.info("nnU-Net model %s: %s", model, out)
