# Shared helpers: the experiment grid and the effective config file every `turbotrain` call reads.
import hashlib
import json
import os

import yaml

from turbotrain.config import config_hash
from turbotrain.experiments import Run, expand_runs, pretrain_path
from turbotrain.stages.data import raw_root

DATASET = config["dataset"]["name"]
RUNS = expand_runs(config)
TABLES = sorted({t for g in config["experiments"]["groups"] for t in g["tables"]})
EFFECTIVE_CONFIG = ".turbotrain/config.yaml"


def _write_effective_config():
    """The validated config (with --config overrides) that rules pass to `turbotrain --config`.

    Rewritten only when its content changes, so its mtime never triggers reruns by itself; rules
    declare the config sections they depend on as params, which is what Snakemake tracks.
    """
    text = yaml.safe_dump(json.loads(json.dumps(config)), sort_keys=True)
    if os.path.exists(EFFECTIVE_CONFIG) and open(EFFECTIVE_CONFIG).read() == text:
        return
    os.makedirs(os.path.dirname(EFFECTIVE_CONFIG), exist_ok=True)
    tmp = f"{EFFECTIVE_CONFIG}.partial"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, EFFECTIVE_CONFIG)


_write_effective_config()


def section_hash(*keys):
    return config_hash({k: config[k] for k in keys})


GENERATION_KEYS = ("name", "source", "preset", "synthetic_overrides", "urls", "local_path")


def dataset_hash():
    """What the raw data depends on; the generator's process count changes how fast, not what."""
    dataset = {k: config["dataset"][k] for k in GENERATION_KEYS}
    dataset["synthetic_overrides"] = {k: v for k, v in dataset["synthetic_overrides"].items() if k != "workers"}
    return config_hash({"dataset": dataset, "seed": config["seed"]})


def fusion_hash():
    """What the fusion cache depends on besides the raw data."""
    reading = {k: config["dataset"][k] for k in ("class_map", "on_bad_frame")}
    return config_hash({"reading": reading, **{k: config[k] for k in ("cache", "grid", "classes", "seed")}})


CURVE_KEYS = ("curve_samples", "score_threshold", "nms_iou", "max_detections", "sort", "fde_threshold", "epa_alpha")


def curve_hash():
    """Evaluation settings the training curve (AP@0.5, EPA on val at each checkpoint) is scored with."""
    return config_hash({k: config["evaluation"][k] for k in CURVE_KEYS})


def evaluation_hash():
    """Evaluation settings that change metrics (the efficiency-table targets only change tables)."""
    return config_hash({k: v for k, v in config["evaluation"].items() if not k.startswith("target_")})


def gpu_resources():
    """GPU request of a training job; `resources.use_gpu: false` turns it off (CI, CPU clusters)."""
    r = config["resources"]
    return r["gpus_per_training_job"] if r["use_gpu"] else 0


def run_from_wildcards(w) -> Run:
    return Run(DATASET, w.fusion, w.pretrain, w.recipe, w.balancer, float(w.fraction), int(w.seed))


def trained_checkpoint(w):
    """Late fusion evaluates the checkpoint trained without fusion."""
    return f"{run_from_wildcards(w).train_dir}/final.pt"


def cache_split(split):
    return f"{config['cache']['root']}/{DATASET}/{split}"


def table_targets():
    return [f"results/tables/{t}.csv" for t in TABLES]


def masking_figures():
    """One masking picture per pretrained (fusion, variant) pair of the grid."""
    pairs = sorted({(r.trained_fusion, r.pretrain) for r in RUNS
                    if config["pretrain"]["variants"][r.pretrain]["type"] != "none"})
    return [f"results/figures/{DATASET}_masking_{f}_{p}.png" for f, p in pairs]


def figure_targets():
    return masking_figures() + [
        "results/figures/learning_curves.png",
        "results/figures/gradient_conflict.png",
        "results/figures/ap_vs_time.png",
        "results/figures/data_efficiency.png",
        "results/figures/qualitative_bev.png",
    ]


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
