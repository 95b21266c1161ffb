"""Rule templates: the labelled surface point clouds of the template subjects (their HR femur
masks, region labels from the synthetic truth, from the label maps given in config, or from the
automatic labelling of rule template_labels), and a PNG of the labelled templates
(femursr.templates)."""

from femursr.workflow import limit_threads, script_logging

limit_threads(snakemake.threads)  # noqa: F821  (before numpy is imported)

from pathlib import Path

import pandas as pd

from femursr.templates import build_template, save_templates, templates_figure
from femursr.volume import read_volume

with script_logging(snakemake.log[0]) as log:  # noqa: F821
    sm = snakemake  # noqa: F821
    selection = pd.read_csv(sm.input.selection, sep="\t", dtype={"subject": str})
    masks = dict(zip(sm.params.subjects, sm.input.masks))
    label_maps = dict(sm.params.label_maps)
    auto = bool(getattr(sm.params, "auto_labels", False))
    missing = [s for s in selection.subject if s not in label_maps]
    if missing:
        raise ValueError(
            f"templates {', '.join(selection.subject)} were chosen by bone volume ({sm.input.selection}), but "
            f"{', '.join(missing)} has no region label map. Label it (for example in 3D Slicer: 1 head, 2 neck, "
            "3 trochanter, 4 shaft, on that subject's HR scan), export the label map (NIfTI or NRRD) and add it "
            "to config evaluation.template_labels as {subject: path}; or name the subjects you labelled in "
            "evaluation.template_subjects; or set evaluation.template_labels to auto (labels from the femur "
            "masks' geometry)"
        )
    templates = []
    for row in selection.itertuples():
        path = Path(label_maps[row.subject])
        if not path.is_file():
            raise FileNotFoundError(f"template {row.subject}: region label map {path} not found")
        t = build_template(
            row.subject, read_volume(masks[row.subject]), read_volume(path), sm.params.points, sm.params.seed,
            sm.params.surface_voxel_mm, label_source=f"automatic ({path})" if auto else str(path),
            bone_ml=row.bone_ml, quantile=row.quantile,
        )  # fmt: skip
        counts = {int(k): int((t.cloud.labels == k).sum()) for k in range(5)}
        log.info("template %s (%.3f mL): %d points, per label %s, labels from %s", row.subject, row.bone_ml, len(t.cloud.labels), counts, path)
        templates.append(t)
    save_templates(templates, sm.output.templates)
    templates_figure(templates, sm.output.png)
