"""Rule import_scan: one raw scan (DICOM folder, NIfTI, Scanco) to a memory-mappable volume in HU."""

from femursr.workflow import limit_threads, script_logging

limit_threads(snakemake.threads)  # noqa: F821  (before numpy is imported)

from femursr.imaging import import_to_file

with script_logging(snakemake.log[0]) as log:  # noqa: F821
    sm = snakemake  # noqa: F821
    opts = sm.params.options
    vol = import_to_file(
        sm.input.scan,
        sm.output.volume,
        sm.output.report,
        label=f"subject {sm.wildcards.subject} ({sm.wildcards.scan.upper()})",
        series_uid=sm.params.series_uid or None,
        allow_resample_nonuniform=opts["allow_resample_nonuniform"],
        spacing_tolerance_mm=opts["spacing_tolerance_mm"],
    )
    log.info("imported %s: shape %s, spacing %s mm", sm.input.scan, vol.shape, vol.spacing)
