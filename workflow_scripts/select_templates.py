"""Rule select_templates: the template subjects, at uniformly spaced quantiles of the bone volume
(HR femur-mask volume) of the candidates (femursr.templates.select_templates)."""

from femursr.workflow import limit_threads, script_logging

limit_threads(snakemake.threads)  # noqa: F821  (before numpy is imported)

import pandas as pd

from femursr.atomic import write_tsv
from femursr.bonemask import volume_ml
from femursr.templates import select_templates
from femursr.volume import read_volume

with script_logging(snakemake.log[0]) as log:  # noqa: F821
    sm = snakemake  # noqa: F821
    subjects = list(sm.params.subjects)
    bone_ml = {s: volume_ml(read_volume(p)) for s, p in zip(subjects, sm.input.masks)}
    empty = [s for s, v in bone_ml.items() if v == 0]
    if empty:
        raise ValueError(f"template candidates {', '.join(empty)}: empty femur mask (results/masks/<subject>/femur.nii.gz)")
    chosen = select_templates(bone_ml, sm.params.n_templates)
    rows = [{"subject": s, "bone_ml": bone_ml[s], "quantile": q, "bone_ml_at_quantile": target} for s, q, target in chosen]
    write_tsv(pd.DataFrame(rows), sm.output.table, float_format="%.6g")
    for r in rows:
        log.info("template %s: %.3f mL (quantile %.3f of %d candidates)", r["subject"], r["bone_ml"], r["quantile"], len(subjects))
