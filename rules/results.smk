# The study's results (paper section 3.2): image quality of the LR and of every SR variant against
# the HR on the test subjects, Table 1 and the Friedman/Conover statistics.
# `snakemake results/table1.csv` asks for the whole study: its rule (results_tables) waits for the
# figures and writes the tables and their HTML page (results/results.html).


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
        "../envs/torch.yaml"
    threads: 1
    resources:
        mem_mb=preprocess_mem_mb,
        runtime=60,
    params:
        code=code_version("image_quality"),
        options=QUALITY_OPTIONS,
    script:
        "../workflow_scripts/image_quality.py"


# Figures (paper Fig. 1 and the agreement behind Table 1): results/figures/. Figure 1 of any
# test subject: `snakemake results/figures/figure1_{subject}.png`.
rule figure1:
    input:
        unpack(figure1_input),
    output:
        png=report(
            "results/figures/figure1_{subject}.png",
            caption="../report/figure1.rst",
            category="Results",
            subcategory="Figure 1",
            labels={"figure": "Figure 1", "subject": "{subject}"},
        ),
        view="results/figures/figure1_{subject}.json",
    log:
        "logs/figures/figure1_{subject}.log",
    wildcard_constraints:
        subject=one_of(RESULT_SUBJECTS),
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=figure_mem_mb,
        runtime=20,
    params:
        code=code_version("figure1"),
        methods=FIGURE_METHODS,
        inset_mm=FIGURE_INSET_MM,
    script:
        "../workflow_scripts/figure1.py"


rule figure_sample_sd:
    input:
        unpack(sample_sd_input),
    output:
        png=report(
            "results/figures/sample_sd_{subject}.png",
            caption="../report/sample_sd.rst",
            category="Results",
            subcategory="Figure 1",
            labels={"figure": "SD across samples", "subject": "{subject}"},
        ),
    log:
        "logs/figures/sample_sd_{subject}.log",
    wildcard_constraints:
        subject=one_of(RESULT_SUBJECTS),
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=figure_mem_mb,
        runtime=20,
    params:
        code=code_version("figure_sample_sd"),
        methods=SAMPLED_SR,
        inset_mm=FIGURE_INSET_MM,
    script:
        "../workflow_scripts/figure_sample_sd.py"


rule agreement_plots:
    input:
        morphometry=rules.morphometry_table.output.table,
    output:
        scatter=report(
            "results/figures/scatter_{method}.png",
            caption="../report/scatter.rst",
            category="Results",
            subcategory="Agreement with the HR",
            labels={"plot": "scatter", "method": "{method}"},
        ),
        bland_altman=report(
            "results/figures/bland_altman_{method}.png",
            caption="../report/bland_altman.rst",
            category="Results",
            subcategory="Agreement with the HR",
            labels={"plot": "Bland-Altman", "method": "{method}"},
        ),
    log:
        "logs/figures/agreement_{method}.log",
    wildcard_constraints:
        method=one_of(QUALITY_METHODS),
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        code=code_version("agreement_plots"),
        subjects=RESULT_SUBJECTS,
    script:
        "../workflow_scripts/agreement_plots.py"


rule results_tables:
    input:
        quality=expand(
            rules.image_quality.output.record,
            method=QUALITY_METHODS,
            subject=RESULT_SUBJECTS,
        ),
        morphometry=rules.morphometry_table.output.table,
        # the figures are made before the tables, so that asking for results/table1.csv gives
        # the whole study: Figure 1, the sample SD maps and the agreement plots too
        figures=results_figures(),
    output:
        quality=report(
            "results/image_quality.csv",
            caption="../report/image_quality.rst",
            category="Results",
            subcategory="Tables",
            labels={"table": "2. image quality (CSV)"},
        ),
        table1=report(
            "results/table1.csv",
            caption="../report/table1.rst",
            category="Results",
            subcategory="Tables",
            labels={"table": "3. Table 1, long form (CSV)"},
        ),
        markdown="results/table1.md",
        latex="results/table1.tex",
        statistics=report(
            "results/statistics.csv",
            caption="../report/statistics.rst",
            category="Results",
            subcategory="Tables",
            labels={"table": "4. statistics (CSV)"},
        ),
        summary="results/statistics_summary.csv",
        html=report(
            "results/results.html",
            caption="../report/results_page.rst",
            category="Results",
            subcategory="Tables",
            labels={"table": "1. Table 1, image quality, statistics"},
        ),
    log:
        "logs/results/tables.log",
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        code=code_version("results_tables"),
        statistics=config["statistics"],
        subjects=RESULT_SUBJECTS,
    script:
        "../workflow_scripts/results_tables.py"
