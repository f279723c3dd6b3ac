# Shared helpers: the experiment grid and the effective config file every `turbotrain` call reads.
import hashlib
import json
import os
import re
import sys
from pathlib import Path

import yaml

from turbotrain.config import check_config
from turbotrain.utils.hashing import config_hash
from turbotrain.experiments import LIDAR_TYPES, TRAJECTORY_TYPES, Run, expand_runs, pretrain_path, pretrain_settings, variant_datasets
from turbotrain.stages.data import (cache_data_hash, dataset_names, download_data_hash, raw_data_hash, raw_root,
                                    with_dataset)
from turbotrain.utils.errors import ConfigError

check_config(config, "snakemake config")  # what the schema (Snakefile `validate`) cannot express

DATASET = config["dataset"]["name"]
# Every dataset the data rules can build: the primary (fine-tuning, evaluation) first, then
# `extra_datasets` (pretraining data). Each one's config is the pipeline config with it as `dataset`.
DATASETS = dataset_names(config)
DATASET_CONFIGS = {name: with_dataset(config, name) for name in DATASETS}
RUNS = expand_runs(config)
TABLES = sorted({t for g in config["experiments"]["groups"] for t in g["tables"]})
EFFECTIVE_CONFIG = ".turbotrain/config.yaml"


def effective_config(dataset=None):
    """The config file a job passes to `turbotrain --config`: EFFECTIVE_CONFIG for the primary
    dataset, `.turbotrain/datasets/<name>.yaml` (`with_dataset(config, name)`) for an extra one."""
    if dataset is None or dataset == DATASET:
        return EFFECTIVE_CONFIG
    return f".turbotrain/datasets/{dataset}.yaml"


def _write_effective_config(path, cfg):
    """The validated config (with --config overrides) that rules pass to `turbotrain --config`.

    Rewritten only when its content changes, so its mtime never triggers reruns by itself; rules
    declare the config sections they depend on as params, which is what Snakemake tracks.
    """
    text = yaml.safe_dump(json.loads(json.dumps(cfg)), sort_keys=True)
    if os.path.exists(path) and open(path).read() == text:
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.partial"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _plans_only():
    """Whether this Snakemake invocation only plans (dry run, lint) and runs no job.

    Such invocations must not rewrite the effective config: a dry run with another --configfile
    while a pipeline runs in the same folder would hand that pipeline's next jobs the other config
    (Snakemake locks the folder against a second real run, not against dry runs). Snakemake does not
    tell a Snakefile that it is a dry run while parsing, so read the command line.
    """
    short_flags = [a for a in sys.argv[1:] if re.fullmatch(r"-[A-Za-z]+", a)]
    return (any(a in ("--dry-run", "--dryrun", "--lint") for a in sys.argv[1:])
            or any("n" in flags for flags in short_flags))


if not _plans_only():
    for _name in DATASETS:
        _write_effective_config(effective_config(_name), DATASET_CONFIGS[_name])


def datasets_from(source):
    """Names of the datasets whose raw data comes from `source` (synthetic | download | local)."""
    return [n for n in DATASETS if DATASET_CONFIGS[n]["dataset"]["source"] == source]


def one_of(values):
    """Wildcard constraint matching exactly these values."""
    return "|".join(re.escape(v) for v in values)


def raw_dir(dataset):
    """Raw (OpenCOOD-layout) folder of a dataset: `<root>/<name>`, or `local_path` for a local one."""
    return raw_root(DATASET_CONFIGS[dataset])


def raw_pattern(source):
    """`<root>/{dataset}`, where generate (or download) writes the raw data of `source` datasets
    (one root per source, as `check_config` makes sure)."""
    (root,) = {DATASET_CONFIGS[n]["dataset"]["root"] for n in datasets_from(source)}
    return str(Path(root) / "{dataset}")


def section_hash(*keys):
    return config_hash({k: config[k] for k in keys})


def dataset_hash(dataset=None):
    """What a dataset's raw data depends on: its own section and seed, nothing of the other datasets."""
    return raw_data_hash(DATASET_CONFIGS[dataset or DATASET])


def download_hash(dataset=None):
    """What a download depends on: the dataset's whole section (urls, checksums, names)."""
    return download_data_hash(DATASET_CONFIGS[dataset or DATASET])


def fusion_hash(dataset=None):
    """What a dataset's fusion cache depends on besides its raw data."""
    return cache_data_hash(DATASET_CONFIGS[dataset or DATASET])


def generator_workers(dataset):
    return DATASET_CONFIGS[dataset]["dataset"]["synthetic_overrides"].get("workers", 1)


CURVE_KEYS = ("curve_samples", "score_threshold", "nms_iou", "max_detections", "sort", "fde_threshold", "epa_alpha")


def curve_hash():
    """Evaluation settings the training curve (AP@0.5, EPA on val at each checkpoint) is scored with."""
    return config_hash({k: config["evaluation"][k] for k in CURVE_KEYS})


def evaluation_hash():
    """Evaluation settings that change metrics (the efficiency-table targets only change tables)."""
    return config_hash({k: v for k, v in config["evaluation"].items() if not k.startswith("target_")})


def pretrain_hash(variant):
    """What one pretraining job depends on (`pretrain_settings`): not the other variants."""
    return config_hash(pretrain_settings(config, variant))


def gpu_resources():
    """GPU request of a training job; `resources.use_gpu: false` turns it off (CI, CPU clusters)."""
    r = config["resources"]
    return r["gpus_per_training_job"] if r["use_gpu"] else 0


def run_from_wildcards(w) -> Run:
    return Run(DATASET, w.fusion, w.pretrain, w.recipe, w.balancer, float(w.fraction), int(w.seed))


def trained_checkpoint(w):
    """Late fusion evaluates the checkpoint trained without fusion."""
    return f"{run_from_wildcards(w).train_dir}/final.pt"


def cache_split(split, dataset=None):
    """Fusion cache folder of one split of a dataset (default: the primary dataset)."""
    if dataset is not None and dataset not in DATASETS:
        raise ConfigError(f"cache_split: no dataset {dataset!r}; configured: {', '.join(DATASETS)}")
    return f"{config['cache']['root']}/{dataset or DATASET}/{split}"


def table_targets():
    return [f"results/tables/{t}.csv" for t in TABLES]


def masking_figures():
    """One masking picture per (fusion, variant) pair of the grid whose pretraining masks LiDAR."""
    pairs = sorted({(r.trained_fusion, r.pretrain) for r in RUNS
                    if config["pretrain"]["variants"][r.pretrain]["type"] in LIDAR_TYPES})
    return [f"results/figures/{DATASET}_masking_{f}_{p}.png" for f, p in pairs]


def figure_targets():
    return masking_figures() + [
        "results/figures/learning_curves.png",
        "results/figures/gradient_conflict.png",
        "results/figures/ap_vs_time.png",
        "results/figures/data_efficiency.png",
        "results/figures/qualitative_bev.png",
    ] + trajectory_figure()


def trajectory_figure():
    """The trajectory-pretraining curves, when the grid pretrains with a trajectory objective."""
    types = {config["pretrain"]["variants"][r.pretrain]["type"] for r in RUNS}
    return ["results/figures/trajectory_pretraining.png"] if types & set(TRAJECTORY_TYPES) else []


def launcher(wildcards, resources):
    """`torchrun` with one process per GPU of the job, else a plain process (CPU or one GPU)."""
    gpus = int(resources.get("gpu", 0) or 0)
    if gpus > 1:
        return f"torchrun --standalone --nproc_per_node {gpus} -m turbotrain.cli"
    return "turbotrain"


def pretrained_input(w):
    """The pretrained weights a fine-tuning run starts from (none for scratch runs)."""
    if config["pretrain"]["variants"][w.pretrain]["type"] == "none":
        return []
    return pretrain_path(DATASET, w.fusion, w.pretrain)


TRAINING_RESOURCES = dict(
    gpu=gpu_resources(),
    cpus_per_task=config["resources"]["cpus_per_job"],
    mem_mb=config["resources"]["mem_mb_training"],
    runtime=config["resources"]["runtime_training_min"],
)
