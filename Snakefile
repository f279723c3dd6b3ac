# TurboTrain-Repro: one DAG from data to tables. Rules are thin: each calls one `turbotrain` verb.
#   snakemake -c2 all                           # embedded synthetic default, CPU
#   snakemake --profile slurm all               # every job through SLURM (see slurm/config.yaml)
#   snakemake -c2 results/tables/ablation.csv   # one product and only its subgraph
import os
import re

from snakemake.utils import min_version

from turbotrain.config import validate_config

min_version("9.0")


configfile: "config/config.yaml"


# The schema (workflow/schemas/config.schema.yaml) fills defaults and rejects unknown keys; our
# validator rather than snakemake.utils.validate, whose error prints the whole schema (1000+ lines)
# where ours names the key, what was expected and the allowed keys.
validate_config(config, "snakemake config")


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        table_targets(),
        figure_targets(),
        path("sample_figure"),


onstart:
    require_cluster_tools(workflow.executor_plugin)
