"""Rules nnunet_dataset and bone_nnunet_dataset: an nnU-Net raw dataset.

femur (preprocessing.mask.nnunet): CTs at 1 mm with the label femur; the cases are the synthetic
subjects' LR scans with their truth LR-grid femur masks, or the labelled CTs listed in config.

bone (evaluation.bone_mask.nnunet): the training subjects' normalized HR volumes at their own voxel
size, cropped to the femur mask's bounding box, with the label bone: the synthetic truth
(trabecular bone and cortex) or the HR's threshold mask (femursr.bonemask.training_bone_label).
"""

from femursr.workflow import limit_threads, script_logging

limit_threads(snakemake.threads)  # noqa: F821  (before numpy is imported)

from pathlib import Path

from femursr.nnunet import assemble_dataset, read_labelled_case


def bone_cases(sm, log):
    """(case, HR, bone label) of each training subject, cropped to its femur's bounding box."""
    from femursr.bonemask import BoneThreshold, training_bone_label
    from femursr.volume import crop, nonzero_box, read_volume

    p = sm.params
    truth = list(sm.input.get("truth", [])) or [None] * len(p.cases)
    for case, image, femur_path, truth_dir in zip(p.cases, sm.input.images, sm.input.femurs, truth):
        label = f"bone nnU-Net training subject {case}"
        hr, femur = read_volume(image), read_volume(femur_path)
        box = nonzero_box(femur.array, 2)  # the femur's bounding box and 2 voxels
        if box is None:
            raise ValueError(f"{label}: the femur mask {femur_path} is empty; check the femur mask QC of {case}")
        tissue = read_volume(Path(truth_dir) / "tissue.nii.gz") if truth_dir else None
        bone = training_bone_label(p.labels, hr, femur, tissue, BoneThreshold(**p.threshold), label=label)
        if not bone.array.any():
            raise ValueError(f"{label}: the {p.labels} bone label is empty inside the femur mask {femur_path}")
        log.info("%s: %s labels, bone %.1f %% of the femur", label, p.labels, 100 * bone.array.sum() / max(1, femur.array.sum()))
        yield case, crop(hr, box), crop(bone, box)


with script_logging(snakemake.log[0]) as log:  # noqa: F821
    sm = snakemake  # noqa: F821
    p = sm.params
    out = Path(sm.output.dataset)
    root = out.parents[1]  # root/nnUNet_raw/Dataset{id}_{name}
    name = out.name.split("_", 1)[1]
    if p.task == "bone":
        if not (len(p.cases) == len(sm.input.images) == len(sm.input.femurs)):
            raise ValueError(f"{len(p.cases)} case ids for {len(sm.input.images)} images and {len(sm.input.femurs)} femur masks")
        cases = bone_cases(sm, log)
        description = f"bone-structure masks for femursr: normalized HR volumes, {p.labels} labels"
        label = "bone"
    else:
        masks = [Path(m) / p.mask_in_folder if p.mask_in_folder else Path(m) for m in sm.input.masks]
        if not (len(p.cases) == len(sm.input.images) == len(masks)):
            raise ValueError(f"{len(p.cases)} case ids for {len(sm.input.images)} images and {len(masks)} masks")
        cases = (read_labelled_case(c, img, m) for c, img, m in zip(p.cases, sm.input.images, masks))
        description = "femur masks for femursr: " + ("synthetic LR scans" if p.mask_in_folder else "labelled CTs from config")
        label = "femur"
    folder = assemble_dataset(cases, root, p.dataset_id, name, spacing_mm=p.spacing_mm, description=description, label=label)
    if folder.resolve() != out.resolve():
        raise RuntimeError(f"nnU-Net dataset written to {folder}, expected {out}")
    log.info("nnU-Net dataset %s: %d cases (%s) at %s mm", folder, len(p.cases), label, p.spacing_mm or "native")
