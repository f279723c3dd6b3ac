"""Building blocks shared by the training and evaluation stages: model, data, engine settings."""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import shutil
from pathlib import Path

from turbotrain.config import config_hash
from turbotrain.data.dataset import FusedDataset, load_manifest
from turbotrain.experiments import FUSION_MODES
from turbotrain.grid import Grid
from turbotrain.train.engine import TrainConfig
from turbotrain.utils.atomic import write_json

log = logging.getLogger(__name__)

TASKS = ("detection", "prediction")


def grid_of(config: dict) -> Grid:
    return Grid.from_config(config["grid"])


def build_model(config: dict, fusion: str, history: int | None = None):
    """The joint model with the fuser the ``fusion`` wildcard names (late fusion = the ego model)."""
    from turbotrain.models.joint import CooperativePnP

    model_cfg = copy.deepcopy(config["model"])
    model_cfg["fusion"] = {"name": FUSION_MODES[fusion][1]}
    cache = config["cache"]
    return CooperativePnP(model_cfg, grid_of(config), config["classes"],
                          history=history or cache["history"], future=cache["future"])


def dataset(config: dict, cache_root: str, split: str, fusion_mode: str, label_fraction: float = 1.0,
            history: int | None = None) -> FusedDataset:
    return FusedDataset(cache_root, split, fusion_mode=fusion_mode, label_fraction=label_fraction,
                        history=history, grid=grid_of(config),
                        voxel_backend="auto")


def train_config(section: dict, dataset_size: int, seed: int, device: str, epochs: float | None = None,
                 **extra) -> TrainConfig:
    """Engine settings from a validated ``train`` section; fractional epochs become a step count."""
    epochs = section["epochs"] if epochs is None else epochs
    steps_per_epoch = max(dataset_size // (section["batch_size"] * section["grad_accum_steps"]), 1)
    max_steps = section["max_steps"] or max(math.ceil(epochs * steps_per_epoch), 1)
    return TrainConfig(
        max_steps=max_steps,
        batch_size=min(section["batch_size"], dataset_size),
        grad_accum_steps=section["grad_accum_steps"],
        lr=section["lr"],
        min_lr=section["lr"] * section["min_lr_ratio"],
        weight_decay=section["weight_decay"],
        warmup_steps=min(section["warmup_steps"], max_steps),
        grad_clip=section["grad_clip"],
        amp={"off": "none"}.get(section["amp"], section["amp"]),
        seed=seed,
        checkpoint_every=section["checkpoint_every"],
        log_every=section["log_every"],
        diagnostics_every=section["diagnostics_every"],
        num_workers=section["num_workers"],
        device=device,
        **extra,
    )


def unwrap(model):
    """The module behind a DDP wrapper (the engine passes the wrapper to step functions)."""
    return getattr(model, "module", model)


def is_main_process() -> bool:
    """Rank 0 under torchrun (or the only process): the one that writes run outputs."""
    return int(os.environ.get("RANK", "0")) == 0


def cache_fingerprint(cache_root: str, split: str = "train") -> str:
    """What a cache split was built from (its manifest's config hash)."""
    return load_manifest(Path(cache_root) / split)["config_hash"]


def file_digest(path: str | None) -> str | None:
    if path is None:
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def claim_run_dir(run_dir: Path, inputs: dict) -> None:
    """Resume a run directory only if it was started from the same inputs; else move it aside.

    The engine resumes any ``last.pt`` it finds. After a change of data, pretrained weights or
    settings that Snakemake reruns a job for, resuming would silently return the old weights, so
    an attempt made from other inputs is kept as ``<dir>.stale-<digest>`` and training restarts.
    """
    digest = config_hash(inputs)
    marker = run_dir / "fingerprint.json"
    if marker.exists():
        previous = json.loads(marker.read_text())["digest"]
        if previous != digest:
            stale = run_dir.with_name(f"{run_dir.name}.stale-{previous}")
            if stale.exists():
                shutil.rmtree(stale)
            run_dir.rename(stale)
            log.warning("%s was started from other inputs; kept as %s, training from scratch", run_dir, stale)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(marker, {"digest": digest, "inputs": inputs})
