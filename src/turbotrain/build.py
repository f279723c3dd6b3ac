"""Config sections -> the objects the stages run: the grid, the joint model, fused datasets, engine
settings and the device. Every stage builds through here, so one config value means one thing."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import torch

from turbotrain.data.cache.format import load_manifest
from turbotrain.data.dataset import FusedDataset
from turbotrain.contract import FUSION_MODES
from turbotrain.grid import Grid


def grid_of(config: dict) -> Grid:
    return Grid.from_config(config["grid"])


def device_of(config: dict) -> torch.device:
    """``device: auto`` is CUDA when one is visible, else the CPU."""
    wanted = config["device"]
    return torch.device("cuda" if wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available()) else "cpu")


def build_model(config: dict, fusion: str, history: int | None = None):
    """The joint model with the fuser the ``fusion`` wildcard names (late fusion = the ego model)."""
    from turbotrain.models.joint import CooperativePnP

    model_cfg = copy.deepcopy(config["model"])
    model_cfg["fusion"] = {"name": FUSION_MODES[fusion][1]}
    cache = config["cache"]
    return CooperativePnP(model_cfg, grid_of(config), config["classes"],
                          history=history or cache["history"], future=cache["future"])


def fused_dataset(config: dict, cache_root: str, split: str, fusion_mode: str, label_fraction: float = 1.0,
                  history: int | None = None, **pretraining) -> FusedDataset:
    """``intermediate`` reads as ``model.cooperator_alignment`` says: each agent in its own frame, its
    features warped by the model (``warp_features``), or its points moved into the ego frame before
    voxelising (``points_first``, OpenCOOD's ``proj_first``). ``pretraining``: FusedDataset's
    ``augmentation`` / ``augmentation_seed`` / ``target_points`` (pretraining only)."""
    if fusion_mode == "intermediate" and config["model"]["cooperator_alignment"] == "points_first":
        fusion_mode = "points_first"
    return FusedDataset(cache_root, split, fusion_mode=fusion_mode, label_fraction=label_fraction,
                        history=history, grid=grid_of(config), voxel_backend="auto", **pretraining)


def evaluation_dataset(config: dict, cache_root: str, fusion: str, split: str | None = None) -> FusedDataset:
    """The split a run is scored on, read as its fusion method needs (late fusion: every agent's
    frames in its own sensor frame, whose boxes are moved into the ego frame after detection)."""
    split = split or config["evaluation"]["split"]
    if fusion == "late":
        return FusedDataset(cache_root, split, fusion_mode="intermediate", grid=grid_of(config), voxel_backend="auto")
    return fused_dataset(config, cache_root, split, FUSION_MODES[fusion][0])


def cache_fingerprint(cache_root: str, split: str = "train") -> str:
    """What a cache split was built from (its manifest's config digest)."""
    return load_manifest(Path(cache_root) / split)["config_hash"]


def _warmup_steps(section: dict, steps_per_epoch: int) -> int:
    """``warmup_epochs`` (when set) in optimizer steps, else ``warmup_steps``."""
    if section["warmup_epochs"] is None:
        return section["warmup_steps"]
    return math.ceil(section["warmup_epochs"] * steps_per_epoch)


def train_config(section: dict, dataset_size: int, seed: int, device: str, epochs: float | None = None,
                 **extra) -> "TrainConfig":
    """Engine settings from a validated ``train`` section; fractional epochs become a step count."""
    # imported here: the engine pulls in every balancer (torchjd, cvxpy), which evaluation never needs
    from turbotrain.train.engine import TrainConfig

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
        weight_decay_start=section["weight_decay_start"],
        optimizer=section["optimizer"],
        eps=section["eps"],
        warmup_steps=min(_warmup_steps(section, steps_per_epoch), max_steps),
        warmup_start_ratio=section["warmup_start_ratio"],
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
