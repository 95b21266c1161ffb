"""Rules sr_infer and sr_infer_sampled: apply a trained SR model to one subject's prepared LR
volume; write the SR volume (HR grid, masked) and the time per volume (T/V) beside it, and for a
diffusion model sampled several times the voxel-wise standard deviation of the samples."""

from femursr.workflow import limit_threads, script_logging

limit_threads(snakemake.threads)  # noqa: F821  (before numpy and torch are imported)

import torch

from femursr.sr.infer import run_inference

with script_logging(snakemake.log[0]):  # noqa: F821
    sm = snakemake  # noqa: F821
    torch.set_num_threads(sm.threads)
    opts = sm.params.options
    run_inference(
        sm.input.generator,
        sm.input.lr,
        sm.input.hr,
        sm.input.mask,
        sm.output.volume,
        sm.output.timing,
        device=opts["device"],
        amp=opts["amp"],
        batch_slices=opts["batch_slices"],
        tile_px=opts["tile_px"],
        overlap_px=opts["tile_overlap_px"],
        subject=sm.wildcards.subject,
        samples=sm.params.samples,
        seed=sm.params.seed,
        std_out=sm.output.get("std"),
    )
