# TurboTrain-Repro: one DAG from data to tables. Rules are thin: each calls one `turbotrain` verb.
#   snakemake -c2 all                           # embedded synthetic default, CPU
#   snakemake --profile slurm all               # every job through SLURM (see slurm/config.yaml)
#   snakemake -c2 results/tables/ablation.csv   # one product and only its subgraph
import os
import re

from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config/config.yaml"


validate(config, "workflow/schemas/config.schema.yaml")


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
