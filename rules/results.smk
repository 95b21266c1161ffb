# The study's results (paper section 3.2): image quality of the LR and of every SR variant against
# the HR on the test subjects, Table 1 and the Friedman/Conover statistics.
# `snakemake results/table1.csv` asks for the whole study.


rule image_quality:
    input:
        unpack(quality_input),
    output:
        record="results/quality/{method}/{subject}.json",
    log:
        "logs/quality/{method}_{subject}.log",
    benchmark:
        "benchmarks/results/image_quality/{method}_{subject}.tsv"
    conda:
        "../envs/femursr.yaml"
    threads: 1
    resources:
        mem_mb=preprocess_mem_mb,
        runtime=60,
    params:
        options=QUALITY_OPTIONS,
    script:
        "../workflow_scripts/image_quality.py"


rule results_tables:
    input:
        quality=expand(
            rules.image_quality.output.record,
            method=QUALITY_METHODS,
            subject=RESULT_SUBJECTS,
        ),
        morphometry=rules.morphometry_table.output.table,
    output:
        quality=report(
            "results/image_quality.csv",
            caption="../report/image_quality.rst",
            category="Results",
        ),
        table1=report(
            "results/table1.csv", caption="../report/table1.rst", category="Results"
        ),
        markdown="results/table1.md",
        latex="results/table1.tex",
        statistics=report(
            "results/statistics.csv",
            caption="../report/statistics.rst",
            category="Results",
        ),
        summary="results/statistics_summary.csv",
    log:
        "logs/results/tables.log",
    conda:
        "../envs/femursr.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        statistics=config["statistics"],
        subjects=RESULT_SUBJECTS,
    script:
        "../workflow_scripts/results_tables.py"
