"""Rule normalize: HU window to [0, 1], femur mask applied, for the LR (on the HR grid) and the HR."""

from femursr.workflow import limit_threads, script_logging

limit_threads(snakemake.threads)  # noqa: F821  (before numpy is imported)

from femursr.normalize import normalize_to_file
from femursr.volume import read_volume

with script_logging(snakemake.log[0]) as log:  # noqa: F821
    sm = snakemake  # noqa: F821
    opts = sm.params.options
    label = f"subject {sm.wildcards.subject}"
    mask = read_volume(sm.input.mask)
    for scan in ("lr", "hr"):
        vol = read_volume(sm.input[scan])
        # slab by slab from the memory-mapped input into the output file
        normalize_to_file(vol, opts[f"{scan}_window_hu"], mask, sm.output[scan], label=f"{label} ({scan.upper()})")
        log.info("%s %s normalized with window %s", label, scan.upper(), opts[f"{scan}_window_hu"])
