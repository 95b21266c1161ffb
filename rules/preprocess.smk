# Preprocessing (paper section 2.1): import, automatic rigid registration of the clinical CT (LR)
# to the HR-pQCT (HR), B-spline resampling onto the HR grid, femur masks, normalization.


rule import_scan:
    input:
        scan=scan_source,
    output:
        volume="results/imported/{subject}/{scan}.nii",
        report="results/imported/{subject}/{scan}.json",
    log:
        "logs/import/{subject}_{scan}.log",
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=preprocess_mem_mb,
        runtime=20,
    params:
        code=code_version("import_scan"),
        series_uid=series_uid,
        options=config["preprocessing"]["import"],
    script:
        "../workflow_scripts/import_scan.py"


rule register:
    input:
        lr="results/imported/{subject}/lr.nii",
        hr="results/imported/{subject}/hr.nii",
    output:
        transform="results/registration/{subject}/lr_to_hr.tfm",
        qc="results/registration/{subject}/qc.json",
        png=report(
            "results/registration/{subject}/qc.png",
            caption="../report/registration_qc.rst",
            category="Quality control",
            subcategory="Registration",
            labels={"subject": "{subject}"},
        ),
    log:
        "logs/registration/{subject}.log",
    benchmark:
        "benchmarks/results/register/{subject}.tsv"
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=preprocess_mem_mb,
        runtime=30,
    params:
        code=code_version("register"),
        options=config["preprocessing"]["registration"],
    script:
        "../workflow_scripts/register.py"


rule resample_lr:
    input:
        lr="results/imported/{subject}/lr.nii",
        hr="results/imported/{subject}/hr.nii",
        transform=rules.register.output.transform,
    output:
        volume=temp("results/resampled/{subject}/lr.nii"),
    log:
        "logs/resample/{subject}.log",
    benchmark:
        "benchmarks/results/resample_lr/{subject}.tsv"
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=preprocess_mem_mb,
        runtime=30,
    params:
        code=code_version("resample_lr"),
        options=config["preprocessing"]["resampling"],
    script:
        "../workflow_scripts/resample_lr.py"


rule femur_mask:
    input:
        # threshold: the LR on the HR grid; nnunet: the native LR, HR, transform and model
        unpack(femur_mask_input),
    output:
        mask="results/masks/{subject}/femur.nii.gz",
        report="results/masks/{subject}/femur.json",
    log:
        "logs/masks/{subject}.log",
    conda:
        FEMUR_MASK_ENV
    threads: 1
    resources:
        mem_mb=preprocess_mem_mb,
        runtime=30,
        gpu=nnunet_predict_gpu,
    params:
        code=code_version("femur_mask"),
        options=MASK_OPTIONS,
    script:
        "../workflow_scripts/femur_mask.py"


rule normalize:
    input:
        lr=rules.resample_lr.output.volume,
        hr="results/imported/{subject}/hr.nii",
        mask=rules.femur_mask.output.mask,
    output:
        lr="results/prepared/{subject}/lr.nii",
        hr="results/prepared/{subject}/hr.nii",
    log:
        "logs/normalize/{subject}.log",
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=preprocess_mem_mb,
        runtime=20,
    params:
        code=code_version("normalize"),
        options=config["preprocessing"]["normalize"],
    script:
        "../workflow_scripts/normalize.py"


rule preprocessing_accuracy:
    input:
        transforms=expand(rules.register.output.transform, subject=PAIRED),
        qc=expand(rules.register.output.qc, subject=PAIRED),
        masks=expand(rules.femur_mask.output.mask, subject=PAIRED),
        truth=synthetic_outputs("truth"),
    output:
        table=report(
            f"{SYNTH_ROOT}/preprocessing_accuracy.tsv",
            caption="../report/preprocessing_accuracy.rst",
            category="Synthetic cohort",
        ),
    log:
        "logs/synthetic/preprocessing_accuracy.log",
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        code=code_version("preprocessing_accuracy"),
        subjects=PAIRED,
    script:
        "../workflow_scripts/preprocessing_accuracy.py"
