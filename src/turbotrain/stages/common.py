"""Building blocks shared by the training and evaluation stages: model, data, engine settings."""
from __future__ import annotations

import copy
import math

from turbotrain.data.dataset import FusedDataset
from turbotrain.experiments import FUSION_MODES
from turbotrain.grid import Grid
from turbotrain.train.engine import TrainConfig

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
