"""Rule nnunet_dataset: an nnU-Net raw dataset (1 mm, CT channel, label femur) from labelled CTs.

The cases are the synthetic subjects' LR scans with their truth LR-grid femur masks, or the
labelled CTs listed in config (preprocessing.mask.nnunet.training_cases).
"""

from femursr.workflow import limit_threads, script_logging

limit_threads(snakemake.threads)  # noqa: F821  (before numpy is imported)

from pathlib import Path

from femursr.nnunet import assemble_dataset, read_labelled_case

with script_logging(snakemake.log[0]) as log:  # noqa: F821
    sm = snakemake  # noqa: F821
    p = sm.params
    out = Path(sm.output.dataset)
    masks = [Path(m) / p.mask_in_folder if p.mask_in_folder else Path(m) for m in sm.input.masks]
    if not (len(p.cases) == len(sm.input.images) == len(masks)):
        raise ValueError(f"{len(p.cases)} case ids for {len(sm.input.images)} images and {len(masks)} masks")
    cases = (read_labelled_case(c, img, m) for c, img, m in zip(p.cases, sm.input.images, masks))
    root = out.parents[1]  # root/nnUNet_raw/Dataset{id}_{name}
    name = out.name.split("_", 1)[1]
    folder = assemble_dataset(
        cases, root, p.dataset_id, name, spacing_mm=p.spacing_mm,
        description="femur masks for femursr: " + ("synthetic LR scans" if p.mask_in_folder else "labelled CTs from config"),
    )  # fmt: skip
    if folder.resolve() != out.resolve():
        raise RuntimeError(f"nnU-Net dataset written to {folder}, expected {out}")
    log.info("nnU-Net dataset %s: %d cases at %s mm", folder, len(p.cases), p.spacing_mm)
