"""Rule clinical_sr: the portable SR model applied to a prepared clinical-only patient; the SR volume
(for a model sampled several times their mean, with every sample and their SD beside it) and T/V."""

from femursr.workflow import limit_threads, script_logging

limit_threads(snakemake.threads)  # noqa: F821  (before numpy and torch are imported)

import torch

from femursr.clinical import read_card, super_resolve

with script_logging(snakemake.log[0]):  # noqa: F821
    sm = snakemake  # noqa: F821
    torch.set_num_threads(sm.threads)
    opts = sm.params.options
    super_resolve(
        sm.input.prepared,
        sm.input.generator,
        sm.output.volume,
        sm.output.timing,
        sm.output.samples,
        samples=read_card(sm.input.card)["samples"],
        seed=sm.params.seed,
        device=opts["device"],
        amp=opts["amp"],
        batch_slices=opts["batch_slices"],
        tile_px=opts["tile_px"],
        overlap_px=opts["tile_overlap_px"],
        subject=sm.wildcards.subject,
    )
