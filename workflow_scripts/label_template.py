"""Rule template_labels: automatic region labels (1 head, 2 neck, 3 trochanter, 4 shaft) of a
template subject's femur mask from its geometry (femursr.labelling: head sphere fit, neck and
shaft axes, lesser-trochanter level), the measured geometry (JSON) and a QC figure."""

from femursr.workflow import limit_threads, script_logging

limit_threads(snakemake.threads)  # noqa: F821  (before numpy is imported)

from femursr.labelling import LabellingParams, label_femur, labels_figure
from femursr.volume import read_volume, write_volume

with script_logging(snakemake.log[0]) as log:  # noqa: F821
    sm = snakemake  # noqa: F821
    subject = sm.wildcards.subject
    where = f"template {subject}: {sm.input.mask}"
    labels, geometry = label_femur(read_volume(sm.input.mask), LabellingParams(**sm.params.options), where=where)
    write_volume(labels, sm.output.labels)
    geometry.save(sm.output.geometry)
    labels_figure(labels, geometry, sm.output.png, title=f"template {subject}: automatic labels of {sm.input.mask}")
    log.info("template %s: labels %s, regions (mL) %s", subject, sm.output.labels, geometry.region_ml)
