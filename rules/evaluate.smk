# ROI evaluation (paper section 3.1, "Evaluation"): bone-structure masks of every evaluated volume
# (LR on the HR grid, HR, SR outputs), templates from the training subjects, ROIs in the femoral
# head, neck and trochanter placed by matching surface point clouds, and Hildebrand morphometry
# in every ROI, one tidy table per volume and one for all.


# a checkpoint: with automatic template labels, which subjects get labelled depends on its table
checkpoint select_templates:
    input:
        masks=expand(rules.femur_mask.output.mask, subject=TEMPLATE_CANDIDATES),
    output:
        table=f"{EVAL_ROOT}/templates/selection.tsv",
    log:
        "logs/evaluation/select_templates.log",
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=templates_mem_mb,
        runtime=20,
    params:
        code=code_version("select_templates"),
        subjects=TEMPLATE_CANDIDATES,
        n_templates=N_TEMPLATES,
    script:
        "../workflow_scripts/select_templates.py"


rule template_labels:
    input:
        mask=rules.femur_mask.output.mask,
    output:
        labels=f"{EVAL_ROOT}/templates/labels_{{subject}}.nii.gz",
        geometry=f"{EVAL_ROOT}/templates/labels_{{subject}}.json",
        png=report(
            f"{EVAL_ROOT}/templates/labels_{{subject}}.png",
            caption="../report/template_labels.rst",
            category="ROI evaluation",
            subcategory="template labels",
            labels={"subject": "{subject}"},
        ),
    log:
        "logs/evaluation/template_labels_{subject}.log",
    benchmark:
        "benchmarks/results/template_labels/{subject}.tsv"
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=evaluation_mem_mb,
        runtime=30,
    params:
        code=code_version("label_template"),
        options=EVAL["auto_labelling"],
    script:
        "../workflow_scripts/label_template.py"


rule templates:
    input:
        selection=rules.select_templates.output.table,
        masks=expand(rules.femur_mask.output.mask, subject=TEMPLATE_CANDIDATES),
        labels=template_label_input,
    output:
        templates=f"{EVAL_ROOT}/templates/templates.npz",
        png=report(
            f"{EVAL_ROOT}/templates/templates.png",
            caption="../report/templates.rst",
            category="ROI evaluation",
        ),
    log:
        "logs/evaluation/templates.log",
    benchmark:
        "benchmarks/results/templates.tsv"
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=templates_mem_mb,
        runtime=30,
    params:
        code=code_version("build_templates"),
        subjects=TEMPLATE_CANDIDATES,
        label_maps=template_label_maps(),
        auto_labels=AUTO_TEMPLATE_LABELS,
        points=EVAL["template_points"],
        surface_voxel_mm=EVAL["surface_voxel_mm"],
        seed=config["seed"],
    script:
        "../workflow_scripts/build_templates.py"


rule bone_mask:
    input:
        unpack(bone_model_input),
        volume=evaluated_volume,
        femur=rules.femur_mask.output.mask,
    output:
        mask=f"{EVAL_ROOT}/bone/{{method}}/{{subject}}.nii.gz",
        report=f"{EVAL_ROOT}/bone/{{method}}/{{subject}}.json",
    log:
        "logs/evaluation/bone_{method}_{subject}.log",
    benchmark:
        "benchmarks/results/bone_mask/{method}_{subject}.tsv"
    conda:
        BONE_MASK_ENV
    threads: 1
    resources:
        mem_mb=evaluation_mem_mb,
        runtime=20,
        gpu=bone_nnunet_predict_gpu,
    params:
        code=code_version("bone_mask"),
        options=BONE_MASK_OPTIONS,
    script:
        "../workflow_scripts/bone_mask.py"


rule place_rois:
    input:
        unpack(place_rois_input),
    output:
        rois=f"{EVAL_ROOT}/rois/{{method}}/{{subject}}.json",
        points=f"{EVAL_ROOT}/rois/{{method}}/{{subject}}.points.npz",
        png=report(
            f"{EVAL_ROOT}/rois/{{method}}/{{subject}}.png",
            caption="../report/rois.rst",
            category="ROI evaluation",
            subcategory="{method}",
            labels={"method": "{method}", "subject": "{subject}"},
        ),
    log:
        "logs/evaluation/rois_{method}_{subject}.log",
    benchmark:
        "benchmarks/results/place_rois/{method}_{subject}.tsv"
    conda:
        "../envs/open3d.yaml"
    threads: 1
    resources:
        mem_mb=evaluation_mem_mb,
        runtime=30,
    params:
        code=code_version("place_rois"),
        options=ROI_OPTIONS,
        seed=config["seed"],
    script:
        "../workflow_scripts/place_rois.py"


rule roi_morphometry:
    input:
        bone=rules.bone_mask.output.mask,
        femur=rules.femur_mask.output.mask,
        rois=rules.place_rois.output.rois,
    output:
        table="results/morphometry/{method}/{subject}.tsv",
    log:
        "logs/evaluation/morphometry_{method}_{subject}.log",
    benchmark:
        "benchmarks/results/roi_morphometry/{method}_{subject}.tsv"
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=evaluation_mem_mb,
        runtime=20,
    params:
        code=code_version("roi_morphometry"),
        context_mm=EVAL["context_mm"],
    script:
        "../workflow_scripts/roi_morphometry.py"


rule morphometry_table:
    input:
        tables=evaluation_outputs(rules.roi_morphometry.output.table),
        rois=evaluation_outputs(rules.place_rois.output.rois),
    output:
        table=report(
            "results/morphometry/all.tsv",
            caption="../report/morphometry.rst",
            category="ROI evaluation",
        ),
        rois=report(
            f"{EVAL_ROOT}/rois.tsv",
            caption="../report/roi_table.rst",
            category="ROI evaluation",
        ),
    log:
        "logs/evaluation/morphometry_table.log",
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        code=code_version("morphometry_table"),
    script:
        "../workflow_scripts/morphometry_table.py"


rule roi_accuracy:
    input:
        rois=expand(rules.place_rois.output.rois, method="HR", subject=EVAL_SUBJECTS),
        points=expand(
            rules.place_rois.output.points, method="HR", subject=EVAL_SUBJECTS
        ),
        truth=expand(rules.synthesize_subject.output.truth, subject=EVAL_SUBJECTS),
    output:
        table=report(
            f"{SYNTH_ROOT}/roi_accuracy.tsv",
            caption="../report/roi_accuracy.rst",
            category="Synthetic cohort",
        ),
    log:
        "logs/synthetic/roi_accuracy.log",
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=20,
    params:
        code=code_version("roi_accuracy"),
        subjects=EVAL_SUBJECTS,
    script:
        "../workflow_scripts/roi_accuracy.py"
