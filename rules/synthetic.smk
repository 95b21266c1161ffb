# The synthetic cohort (config `cohort: synthetic`): femur phantoms with known truth, written as
# clinical-CT and HR-pQCT DICOM series.


rule synthesize_subject:
    output:
        lr=directory(f"{SYNTH_ROOT}/{{subject}}/lr_dicom"),
        hr=directory(f"{SYNTH_ROOT}/{{subject}}/hr_dicom"),
        truth=directory(f"{SYNTH_ROOT}/{{subject}}/truth"),
    log:
        "logs/synthetic/{subject}.log",
    benchmark:
        "benchmarks/results/synthesize_subject/{subject}.tsv"
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=synthesize_mem_mb,
        runtime=20,
    params:
        code=code_version("synthesize_subject"),
        synthetic=SYNTH_SUBJECT_PARAMS,
        seed=config["seed"],
        index=subject_index,
    script:
        "../workflow_scripts/synthesize_subject.py"


rule truth_morphometry:
    input:
        truth=rules.synthesize_subject.output.truth,
    output:
        table=f"{SYNTH_ROOT}/{{subject}}/truth_morphometry.tsv",
    log:
        "logs/synthetic/truth_morphometry_{subject}.log",
    benchmark:
        "benchmarks/results/truth_morphometry/{subject}.tsv"
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=synthesize_mem_mb,
        runtime=20,
    params:
        code=code_version("truth_morphometry"),
    script:
        "../workflow_scripts/truth_morphometry.py"


rule synthesize_cohort:
    input:
        lr=synthetic_outputs("lr"),
        hr=synthetic_outputs("hr"),
        truth=synthetic_outputs("truth"),
        truth_tables=expand(rules.truth_morphometry.output.table, subject=SUBJECTS),
    output:
        sheet=f"{SYNTH_ROOT}/subjects.tsv",
        morphometry=report(
            f"{SYNTH_ROOT}/truth_morphometry.tsv",
            caption="../report/truth_morphometry.rst",
            category="Synthetic cohort",
        ),
        summary=f"{SYNTH_ROOT}/subjects_summary.tsv",
        ranges=report(
            f"{SYNTH_ROOT}/truth_ranges.tsv",
            caption="../report/truth_ranges.rst",
            category="Synthetic cohort",
        ),
        preview=report(
            f"{SYNTH_ROOT}/preview.png",
            caption="../report/preview.rst",
            category="Synthetic cohort",
        ),
    log:
        "logs/synthetic/cohort.log",
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        code=code_version("synthesize_cohort"),
        subjects=SUBJECTS,
        preview_subject=SUBJECTS[0],
    script:
        "../workflow_scripts/synthesize_cohort.py"
