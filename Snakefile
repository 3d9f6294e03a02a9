# medtx: raw brain MRI -> model-ready volumes -> fold manifests -> pre-training,
# fine-tuning and evaluation tables of each backbone (the Medical Transformer,
# PUMIT); predictions for datasets with role predict; defaced copies to share on
# request (`snakemake defaced`).
# Read as a table of contents; logic lives in the medtx package.

from snakemake.utils import min_version

# the workflow API (include:, default_target, the executor plugin interface)
min_version("9.0")


configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/preprocess.smk"
include: "workflow/rules/folds.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/predict.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/share.smk"


rule all:
    default_target: True
    input:
        get_final_output(),
