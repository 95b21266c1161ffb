"""Rule resample_lr: the clinical CT onto the HR grid (B-spline, registered pose); HR untouched."""

from femursr.workflow import limit_threads, script_logging

limit_threads(snakemake.threads)  # noqa: F821  (before numpy is imported)

import SimpleITK as sitk

from femursr.registration import resample_onto
from femursr.volume import VolumeWriter, read_volume

with script_logging(snakemake.log[0]) as log:  # noqa: F821
    sm = snakemake  # noqa: F821
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(sm.threads)
    lr = read_volume(sm.input.lr)
    hr = read_volume(sm.input.hr)
    tfm = sitk.ReadTransform(sm.input.transform)
    opts = sm.params.options
    # slab by slab into the output file: a paper-scale HR grid (5.6 GB) is never whole in memory
    with VolumeWriter(sm.output.volume, hr.shape, "float32", hr.spacing, hr.origin, hr.direction) as w:
        out = resample_onto(lr, hr, tfm, interpolator=opts["interpolator"], default_hu=opts["default_hu"], out=w)
    log.info("LR resampled onto the HR grid %s", out.shape)
