"""Rule figure1: Figure 1 of one test subject (LR, each SR variant and HR on the axial slice
through the femoral head centre, with enlarged insets; femursr.plots)."""

from femursr.workflow import limit_threads, script_logging

limit_threads(snakemake.threads)  # noqa: F821  (before numpy is imported)

import json

from femursr.atomic import atomic_file
from femursr.plots import write_figure1

with script_logging(snakemake.log[0]) as log:  # noqa: F821
    sm = snakemake  # noqa: F821
    volumes = dict(zip(sm.params.methods, sm.input.volumes))
    record = write_figure1(sm.input.mask, volumes, sm.output.png, inset_mm=sm.params.inset_mm, subject=sm.wildcards.subject)
    record["volumes"] = {m: str(p) for m, p in volumes.items()}
    with atomic_file(sm.output.view) as tmp:
        tmp.write_text(json.dumps(record, indent=2))
    log.info("Figure 1 of %s: slice %d, inset centre %s mm (head radius %.1f mm), grey window %s, methods %s",
             sm.wildcards.subject, record["slice"], [round(v, 2) for v in record["centre_mm"]], record["head_radius_mm"],
             [round(v, 3) for v in record["window"]], ", ".join(record["methods"]))  # fmt: skip
