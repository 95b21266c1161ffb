"""Rule normalize: HU window to [0, 1], femur mask applied, for the LR (on the HR grid) and the HR."""

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = str(snakemake.threads)  # noqa: F821

from femursr.normalize import normalize
from femursr.volume import read_volume, write_volume
from femursr.workflow import script_logging

with script_logging(snakemake.log[0]) as log:  # noqa: F821
    sm = snakemake  # noqa: F821
    opts = sm.params.options
    label = f"subject {sm.wildcards.subject}"
    mask = read_volume(sm.input.mask)
    for scan in ("lr", "hr"):
        vol = read_volume(sm.input[scan])
        out = normalize(vol, opts[f"{scan}_window_hu"], mask, label=f"{label} ({scan.upper()})")
        write_volume(out, sm.output[scan])
        log.info("%s %s normalized with window %s", label, scan.upper(), opts[f"{scan}_window_hu"])
