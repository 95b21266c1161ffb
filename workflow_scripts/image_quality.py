"""Rule image_quality: SSIM, PSNR, GSSIM, LPIPS and T/V of one method's volume of one subject."""

from femursr.workflow import limit_threads, script_logging

limit_threads(snakemake.threads)  # noqa: F821  (before numpy is imported)

import json

from femursr.atomic import atomic_file
from femursr.quality import LpipsUnavailable, load_lpips, quality_record
from femursr.volume import read_volume

with script_logging(snakemake.log[0]) as log:  # noqa: F821
    sm = snakemake  # noqa: F821
    opts = sm.params.options
    method, subject = sm.wildcards.method, sm.wildcards.subject
    model, note = None, ""
    try:
        from femursr.sr.train import select_device

        model = load_lpips(opts["lpips_backbone"], device=str(select_device(opts["device"])))
    except LpipsUnavailable as err:
        note = str(err).split(".")[0]
        log.warning("%s; the table says so and the run goes on", err)
    timing = json.loads(open(sm.input.timing).read()) if "timing" in sm.input.keys() else None
    row = quality_record(
        read_volume(sm.input.volume), read_volume(sm.input.hr), read_volume(sm.input.mask),
        method=method, subject=subject, lpips_model=model, lpips_note=note, timing=timing, step=opts["slice_step"],
    )
    with atomic_file(sm.output.record) as tmp:
        tmp.write_text(json.dumps(row, indent=2) + "\n")
    log.info("subject %s, %s: %s", subject, method, {k: row[k] for k in ("ssim", "psnr", "gssim", "lpips")})
