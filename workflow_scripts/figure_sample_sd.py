"""Rule figure_sample_sd: for the SR variants whose inference drew several samples, the mean
and the voxel-wise SD of the samples on Figure 1's slice (femursr.plots)."""

from femursr.workflow import limit_threads, script_logging

limit_threads(snakemake.threads)  # noqa: F821  (before numpy is imported)

from femursr.plots import write_sample_sd_figure

with script_logging(snakemake.log[0]) as log:  # noqa: F821
    sm = snakemake  # noqa: F821
    sampled = {m: (mean, sd) for m, mean, sd in zip(sm.params.methods, sm.input.means, sm.input.sds)}
    record = write_sample_sd_figure(sm.input.mask, sm.input.hr, sampled, sm.output.png, inset_mm=sm.params.inset_mm, subject=sm.wildcards.subject)
    log.info("sample SD of %s on slice %d: SD colour scale 0 to %.4f (normalized intensity), methods %s",
             sm.wildcards.subject, record["slice"], record["sd_range"][1], ", ".join(record["methods"]))  # fmt: skip
