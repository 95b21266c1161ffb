# The clinical branch (issue 9): bone microstructure of patients with a clinical CT and no
# HR-pQCT. A trained model is exported as a portable folder (weights, templates, model.json);
# each patient's LR is imported, put on its own isotropic grid around the femur, masked and
# normalized as the training data were (checkpoint clinical_prepare), super-resolved, and
# evaluated with the study's ROI code. A scan that cannot be used gives an error record in
# place of metrics, and the other patients go on.


rule clinical_export_model:
    input:
        generator=rules.train_sr.output.generator,
        record=rules.train_sr.output.record,
        templates=rules.templates.output.templates,
        train_masks=sr_subject_files("train", "mask"),
    output:
        generator=f"{SR_RUN}/portable/generator.pt",
        card=f"{SR_RUN}/portable/model.json",
        templates=f"{SR_RUN}/portable/templates.npz",
    log:
        "logs/clinical/export_{model}_{dims}.log",
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        code=code_version("clinical_export_model"),
        method="{model}_{dims}",
        samples=sr_samples,
        normalization=config["preprocessing"]["normalize"],
        evaluation=CLINICAL_EVAL_OPTIONS,
        template_side=CLINICAL_CFG["template_side"],
        seed=config["seed"],
        cohort=config["cohort"],
    script:
        "../workflow_scripts/clinical_export_model.py"


checkpoint clinical_prepare:
    input:
        lr=clinical_lr,
        card=clinical_model("card"),
    output:
        folder=directory(f"{CLINICAL_ROOT}/{{subject}}/prepared"),
    log:
        "logs/clinical/prepare_{subject}.log",
    benchmark:
        "benchmarks/results/clinical_prepare/{subject}.tsv"
    wildcard_constraints:
        subject=one_of(CLINICAL),
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=clinical_mem_mb,
        runtime=30,
    params:
        code=code_version("clinical_prepare"),
        threshold=MASK["threshold"],
        resampling=config["preprocessing"]["resampling"],
        options=CLINICAL_PREPARE_OPTIONS,
        side=clinical_side,
    script:
        "../workflow_scripts/clinical_prepare.py"


rule clinical_sr:
    input:
        prepared=rules.clinical_prepare.output.folder,
        generator=clinical_model("generator"),
        card=clinical_model("card"),
    output:
        volume=f"{CLINICAL_ROOT}/{{subject}}/sr.nii.gz",
        timing=f"{CLINICAL_ROOT}/{{subject}}/sr.json",
        samples=directory(f"{CLINICAL_ROOT}/{{subject}}/sr_samples"),
    log:
        "logs/clinical/sr_{subject}.log",
    benchmark:
        "benchmarks/results/clinical_sr/{subject}.tsv"
    wildcard_constraints:
        subject=one_of(CLINICAL),
    conda:
        "../envs/torch.yaml"
    threads: TRAINING["threads"]
    resources:
        mem_mb=clinical_sr_mem_mb,
        runtime=120,
        gpu=sr_gpu,
    params:
        code=code_version("clinical_sr", *SR_MODEL_MODULES),
        options=SR_INFER_OPTIONS,
        seed=config["seed"],
    script:
        "../workflow_scripts/clinical_sr.py"


rule clinical_evaluate:
    input:
        unpack(clinical_evaluate_input),
    output:
        metrics=f"{CLINICAL_ROOT}/{{subject}}/metrics.csv",
        record=f"{CLINICAL_ROOT}/{{subject}}/record.json",
        pdf=f"{CLINICAL_ROOT}/{{subject}}/summary.pdf",
        png=report(
            f"{CLINICAL_ROOT}/{{subject}}/summary.png",
            caption="../report/clinical_summary.rst",
            category="Clinical application",
            labels={"patient": "{subject}"},
        ),
    log:
        "logs/clinical/evaluate_{subject}.log",
    benchmark:
        "benchmarks/results/clinical_evaluate/{subject}.tsv"
    wildcard_constraints:
        subject=one_of(CLINICAL),
    conda:
        CLINICAL_EVALUATE_ENV
    threads: 1
    resources:
        mem_mb=clinical_mem_mb,
        runtime=30,
        gpu=bone_nnunet_predict_gpu,
    params:
        code=code_version("clinical_evaluate"),
        evaluation=CLINICAL_EVAL_OPTIONS,
        seed=config["seed"],
    script:
        "../workflow_scripts/clinical_evaluate.py"


rule clinical_table:
    input:
        metrics=expand(rules.clinical_evaluate.output.metrics, subject=CLINICAL),
    output:
        table=report(
            f"{CLINICAL_ROOT}/metrics.tsv",
            caption="../report/clinical_table.rst",
            category="Clinical application",
        ),
    log:
        "logs/clinical/table.log",
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        code=code_version("clinical_table"),
    script:
        "../workflow_scripts/clinical_table.py"
