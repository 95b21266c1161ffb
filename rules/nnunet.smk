# The nnunet femur-mask backend (paper section 2.1; config preprocessing.mask.nnunet): an nnU-Net
# v2 raw dataset from labelled CTs at 1 mm, plan and preprocess, train one fold. femur_mask
# (rules/preprocess.smk) then predicts with the model. Nothing here runs when the backend is
# threshold, or when a model trained elsewhere is given (nnunet.model_folder).
#
# The nnunet bone-mask backend (paper section 3.1; config evaluation.bone_mask.nnunet) uses the
# same three rules as bone_nnunet_*: its dataset holds the training subjects' normalized HR volumes
# at their own voxel size with the label bone; bone_mask (rules/evaluate.smk) predicts with it.


rule nnunet_dataset:
    input:
        unpack(nnunet_dataset_input),
    output:
        dataset=directory(f"{NNUNET_ROOT}/nnUNet_raw/{NNUNET_DATASET}"),
    log:
        "logs/nnunet/dataset.log",
    benchmark:
        "benchmarks/results/nnunet_dataset.tsv"
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=largest_input_mem_mb,
        runtime=60,
    params:
        code=code_version("nnunet_dataset"),
        task="femur",
        cases=nnunet_case_ids(),
        # synthetic subjects: the truth folder holds the LR-grid femur mask under this name
        mask_in_folder="" if NNUNET_CASES else "femur_mask_lr.nii.gz",
        dataset_id=NNUNET["dataset_id"],
        spacing_mm=NNUNET["spacing_mm"],
    script:
        "../workflow_scripts/nnunet_dataset.py"


rule nnunet_plan:
    input:
        dataset=rules.nnunet_dataset.output.dataset,
    output:
        preprocessed=directory(f"{NNUNET_ROOT}/nnUNet_preprocessed/{NNUNET_DATASET}"),
    log:
        "logs/nnunet/plan.log",
    benchmark:
        "benchmarks/results/nnunet_plan.tsv"
    conda:
        "../envs/nnunet.yaml"
    threads: 4
    resources:
        mem_mb=8000,
        runtime=60,
    params:
        code=code_version("nnunet_plan"),
        dataset_id=NNUNET["dataset_id"],
        configuration=NNUNET["configuration"],
    script:
        "../workflow_scripts/nnunet_plan.py"


rule nnunet_train:
    input:
        preprocessed=rules.nnunet_plan.output.preprocessed,
    output:
        checkpoint=f"{NNUNET_TRAINED}/{NNUNET_FOLD_DIR}/{femur_nnunet.CHECKPOINT}",
    log:
        "logs/nnunet/train.log",
    benchmark:
        "benchmarks/results/nnunet_train.tsv"
    conda:
        "../envs/nnunet.yaml"
    threads: 8
    resources:
        mem_mb=12000,
        runtime=nnunet_train_runtime,
        gpu=nnunet_gpu,
    params:
        code=code_version("nnunet_train"),
        dataset_id=NNUNET["dataset_id"],
        options=NNUNET_TRAIN_OPTIONS,
    script:
        "../workflow_scripts/nnunet_train.py"


use rule nnunet_dataset as bone_nnunet_dataset with:
    input:
        unpack(bone_nnunet_dataset_input),
    output:
        dataset=directory(f"{NNUNET_ROOT}/nnUNet_raw/{BONE_NNUNET_DATASET}"),
    log:
        "logs/nnunet/bone_dataset.log",
    benchmark:
        "benchmarks/results/bone_nnunet_dataset.tsv"
    params:
        code=code_version("nnunet_dataset"),
        task="bone",
        cases=BONE_NNUNET_SUBJECTS,
        labels=BONE_NNUNET_LABELS,
        threshold={k: BONE_MASK[k] for k in ("sigma_mm", "threshold")},
        dataset_id=BONE_NNUNET["dataset_id"],
        spacing_mm=None,


use rule nnunet_plan as bone_nnunet_plan with:
    input:
        dataset=rules.bone_nnunet_dataset.output.dataset,
    output:
        preprocessed=directory(
            f"{NNUNET_ROOT}/nnUNet_preprocessed/{BONE_NNUNET_DATASET}"
        ),
    log:
        "logs/nnunet/bone_plan.log",
    benchmark:
        "benchmarks/results/bone_nnunet_plan.tsv"
    params:
        code=code_version("nnunet_plan"),
        dataset_id=BONE_NNUNET["dataset_id"],
        configuration=BONE_NNUNET["configuration"],


use rule nnunet_train as bone_nnunet_train with:
    input:
        preprocessed=rules.bone_nnunet_plan.output.preprocessed,
    output:
        checkpoint=f"{BONE_NNUNET_TRAINED}/fold_{BONE_NNUNET['fold']}/{femur_nnunet.CHECKPOINT}",
    log:
        "logs/nnunet/bone_train.log",
    benchmark:
        "benchmarks/results/bone_nnunet_train.tsv"
    resources:
        mem_mb=12000,
        runtime=bone_nnunet_train_runtime,
        gpu=bone_nnunet_gpu,
    params:
        code=code_version("nnunet_train"),
        dataset_id=BONE_NNUNET["dataset_id"],
        options=BONE_NNUNET_TRAIN_OPTIONS,
