# Super-resolution (paper sections 2.2 and 3.1): the split, training of every model in
# training.models as 2D and 2.5D, and inference over the test volumes with the time per volume.
# A training run keeps its checkpoint, live metrics and TensorBoard events in
# results/models/{model}_{dims}/run/ (not declared as outputs, so that they survive a failed or
# killed job): rerunning the job resumes from the checkpoint.


rule split:
    output:
        table="results/split.tsv",
    log:
        "logs/sr/split.log",
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        code=code_version("split"),
        subjects=PAIRED,
        fractions=config["split"],
        seed=config["seed"],
        fixed=SR_FIXED_SPLIT,
    script:
        "../workflow_scripts/split.py"


rule train_autoencoder:
    input:
        split=rules.split.output.table,
        train_lr=sr_subject_files("train", "lr"),
        train_hr=sr_subject_files("train", "hr"),
        train_mask=sr_subject_files("train", "mask"),
        validation_lr=sr_subject_files("validation", "lr"),
        validation_hr=sr_subject_files("validation", "hr"),
        validation_mask=sr_subject_files("validation", "mask"),
        perceptual=sr_perceptual_weights,
    output:
        weights=f"{AE_RUN}/autoencoder.pt",
        record=f"{AE_RUN}/record.json",
        metrics=report(
            f"{AE_RUN}/metrics.csv",
            caption="../report/autoencoder_training.rst",
            category="SR models",
            labels={"model": "{autoencoder}", "dims": "2d"},
        ),
    log:
        "logs/sr/train_{autoencoder}.log",
    benchmark:
        "benchmarks/results/train_sr/{autoencoder}.tsv"
    conda:
        "../envs/torch.yaml"
    threads: TRAINING["threads"]
    resources:
        mem_mb=sr_train_mem_mb,
        runtime=TRAINING["runtime_min"],
        gpu=sr_gpu,
    params:
        code=sr_train_code,
        name="autoencoder",
        model=lookup(dpath="models/{autoencoder}", within=config),
        training=SR_TRAIN_OPTIONS,
        seed=config["seed"],
        train=SR_TRAIN,
        validation=SR_VALIDATION,
    script:
        "../workflow_scripts/train_sr.py"


rule train_sr:
    input:
        split=rules.split.output.table,
        train_lr=sr_subject_files("train", "lr"),
        train_hr=sr_subject_files("train", "hr"),
        train_mask=sr_subject_files("train", "mask"),
        validation_lr=sr_subject_files("validation", "lr"),
        validation_hr=sr_subject_files("validation", "hr"),
        validation_mask=sr_subject_files("validation", "mask"),
        perceptual=sr_perceptual_weights,
        autoencoder=sr_autoencoder_weights,
    output:
        generator=f"{SR_RUN}/generator.pt",
        record=f"{SR_RUN}/record.json",
        metrics=report(
            f"{SR_RUN}/metrics.csv",
            caption="../report/sr_training.rst",
            category="SR models",
            labels={"model": "{model}", "dims": "{dims}"},
        ),
    log:
        "logs/sr/train_{model}_{dims}.log",
    benchmark:
        "benchmarks/results/train_sr/{model}_{dims}.tsv"
    conda:
        "../envs/torch.yaml"
    threads: TRAINING["threads"]
    resources:
        mem_mb=sr_train_mem_mb,
        runtime=TRAINING["runtime_min"],
        gpu=sr_gpu,
    params:
        code=sr_train_code,
        name="{model}",
        model=sr_model_params,
        training=SR_TRAIN_OPTIONS,
        seed=config["seed"],
        train=SR_TRAIN,
        validation=SR_VALIDATION,
    script:
        "../workflow_scripts/train_sr.py"


rule sr_infer:
    input:
        generator=rules.train_sr.output.generator,
        lr=rules.normalize.output.lr,
        hr=rules.normalize.output.hr,
        mask=rules.femur_mask.output.mask,
    output:
        volume="results/sr/{model}_{dims}/{subject}.nii.gz",
        timing="results/sr/{model}_{dims}/{subject}.json",
    log:
        "logs/sr/infer_{model}_{dims}_{subject}.log",
    benchmark:
        "benchmarks/results/sr_infer/{model}_{dims}_{subject}.tsv"
    wildcard_constraints:
        model=one_of(SR_SINGLE),
    conda:
        "../envs/torch.yaml"
    threads: TRAINING["threads"]
    resources:
        mem_mb=sr_infer_mem_mb,
        runtime=120,
        gpu=sr_gpu,
    params:
        code=sr_infer_code,
        options=SR_INFER_OPTIONS,
        samples=1,
        seed=config["seed"],
    script:
        "../workflow_scripts/sr_infer.py"


# Diffusion models with models.<name>.samples > 1: the SR volume is the mean of the samples, and
# their voxel-wise standard deviation (where the model is unsure) is written beside it.
use rule sr_infer as sr_infer_sampled with:
    output:
        volume="results/sr/{model}_{dims}/{subject}.nii.gz",
        timing="results/sr/{model}_{dims}/{subject}.json",
        std="results/sr/{model}_{dims}/{subject}.std.nii.gz",
    log:
        "logs/sr/infer_{model}_{dims}_{subject}.log",
    benchmark:
        "benchmarks/results/sr_infer/{model}_{dims}_{subject}.tsv"
    wildcard_constraints:
        model=one_of(SR_SAMPLED),
    params:
        code=sr_infer_code,
        options=SR_INFER_OPTIONS,
        samples=sr_samples,
        seed=config["seed"],
