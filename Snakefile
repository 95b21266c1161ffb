# femursr: super-resolution of clinical CT of the proximal femur and standardized bone
# microstructure evaluation. Entry point only: config, validation, includes, `rule all`.
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config/config.yaml"


validate(config, "config/schemas/config.schema.yaml")


report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/synthetic.smk"
include: "rules/preprocess.smk"
include: "rules/nnunet.smk"
include: "rules/sr.smk"
include: "rules/evaluate.smk"
include: "rules/results.smk"
include: "rules/clinical.smk"


rule all:
    default_target: True
    input:
        final_targets(),
