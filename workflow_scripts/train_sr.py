"""Rules train_sr and train_autoencoder: train one SR model ({model}_{dims}), or the autoencoder
of the latent diffusion models, and write its weights for inference, its record and its metrics.
Resumes from the run folder's checkpoint (results/models/<run>/run/checkpoint.pt) if there."""

from femursr.workflow import limit_threads, script_logging

limit_threads(snakemake.threads)  # noqa: F821  (before numpy and torch are imported)

from pathlib import Path

import torch

from femursr.sr.data import SubjectFiles
from femursr.sr.train import train_sr


def files(sm, name):
    """A named input as a list (snakemake gives a single file as a string)."""
    value = sm.input.get(name, [])
    return [value] if isinstance(value, str) else list(value)


with script_logging(snakemake.log[0]) as log:  # noqa: F821
    sm = snakemake  # noqa: F821
    torch.set_num_threads(sm.threads)
    parts = {}
    for part in ("train", "validation"):
        ids = list(sm.params[part])
        lr, hr, mask = (files(sm, f"{part}_{k}") for k in ("lr", "hr", "mask"))
        parts[part] = [SubjectFiles(*row) for row in zip(ids, lr, hr, mask)]
    training = dict(sm.params.training)
    if training["perceptual_weights"] is None:
        log.warning("training.perceptual_weights is null: the perceptual loss terms are off")
    weights = sm.output.get("generator") or sm.output.weights
    autoencoder = files(sm, "autoencoder")
    train_sr(
        name=sm.params.name,
        dims=sm.wildcards.get("dims", "2d"),
        model_params=dict(sm.params.model),
        training=training,
        seed=sm.params.seed,
        train=parts["train"],
        validation=parts["validation"],
        run_dir=Path(weights).parent / "run",
        generator=weights,
        record=sm.output.record,
        metrics=sm.output.metrics,
        perceptual_weights=training["perceptual_weights"],
        autoencoder=autoencoder[0] if autoencoder else None,
        handle_signals=True,
    )
