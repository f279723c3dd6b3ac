"""``turbotrain pretrain``: masked multi-agent (spatio-temporal) reconstruction, then export."""
from __future__ import annotations

import logging
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from turbotrain.data.dataset import FusedDataset
from turbotrain.data.sample import collate
from turbotrain.experiments import FUSION_MODES
from turbotrain.pretrain.objective import VARIANT_INPUT, MaskedReconstruction
from turbotrain.pretrain.transfer import save_pretrained
from turbotrain.stages.common import (build_model, cache_fingerprint, claim_run_dir, dataset, grid_of, is_main_process,
                                     train_config, unwrap)
from turbotrain.train.balancers import build_balancer
from turbotrain.train.engine import fit
from turbotrain.utils.atomic import write_json
from turbotrain.utils.errors import ConfigError
from turbotrain.utils.seed import seed_everything

log = logging.getLogger(__name__)


def _vfe_and_bev_channels(model, data) -> tuple[int, int]:
    """Feature widths of the voxel encoder and of the fused BEV map, read off one real batch.

    Probed in eval mode: a training-mode pass would fold this sample into BatchNorm's running
    statistics before training starts.
    """
    batch = collate([data[0]])
    model.eval()
    try:
        with torch.no_grad():
            vfe = model.encoder.voxel_features(batch.voxels, batch.num_points).shape[1]
            bev = model.forward_bev(batch)["bev"].shape[1]
    finally:
        model.train()
    return vfe, bev


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@dataclass
class PretrainSetup:
    """What one pretraining variant trains: its data, the wrapped model and the choices behind them."""

    variant: dict
    transfer: tuple[str, ...]
    fusion_mode: str
    history: int
    data: FusedDataset
    objective: MaskedReconstruction


def build_objective(config: dict, variant_name: str, fusion: str, cache_root: str, split: str = "train") -> PretrainSetup:
    """The seeded, untrained :class:`MaskedReconstruction` of ``variant_name`` and the data it reads."""
    variants = config["pretrain"]["variants"]
    if variant_name not in variants:
        raise ConfigError(f"pretrain.variants: no variant named {variant_name!r} (have {sorted(variants)})")
    variant = variants[variant_name]
    if variant["type"] == "none":
        raise ConfigError(f"pretrain.variants.{variant_name}: type 'none' has nothing to pretrain")
    spec = VARIANT_INPUT[variant["type"]]
    fusion_mode = spec["fusion_mode"] if spec["fusion_mode"] != "intermediate" else FUSION_MODES[fusion][0]
    history = spec["history"] or config["cache"]["history"]
    data = dataset(config, cache_root, split, fusion_mode, history=history)
    # The engine seeds only once the model exists; seeding here makes the initial weights (and so
    # pretrained.pt) a function of the config seed too.
    seed_everything(config["seed"])
    model = build_model(config, fusion, history=history)
    vfe, bev = _vfe_and_bev_channels(model, data)
    section = config["pretrain"]
    objective = MaskedReconstruction(model, grid_of(config), variant, history, vfe, bev,
                                     section["points_per_cell"], section["max_target_points"])
    return PretrainSetup(variant, spec["transfer"], fusion_mode, history, data, objective)


def pretrain(config: dict, variant_name: str, fusion: str, cache_root: str, out_dir: str) -> dict:
    """Train ``variant_name`` on the cache's train split in ``out_dir`` (resuming there); export pretrained.pt."""
    run_dir = Path(out_dir)
    if is_main_process():
        inputs = {"variant": variant_name, "fusion": fusion, "seed": config["seed"], "train_cache": cache_fingerprint(cache_root),
                  "config": {k: config[k] for k in ("classes", "grid", "model", "pretrain")}}
        claim_run_dir(run_dir, inputs)
    setup = build_objective(config, variant_name, fusion, cache_root)
    variant, data, model, section = setup.variant, setup.data, setup.objective.model, config["pretrain"]
    started = time.time()
    summary = fit(
        setup.objective, lambda m, batch: unwrap(m)(batch), build_balancer("sum", ["reconstruction"]), data,
        train_config(section["train"], len(data), config["seed"], config["device"], final_name="objective.pt"),
        run_dir, collate_fn=collate,
    )
    meta = {"variant": variant_name, "type": variant["type"], "fusion": fusion, "mask_ratio": variant["mask_ratio"],
            "temporal_masking": variant["temporal_masking"], "points_per_cell": section["points_per_cell"],
            "max_target_points": section["max_target_points"], "dataset": config["dataset"]["name"],
            "cache_config_hash": data.manifest["config_hash"], "fusion_mode": setup.fusion_mode,
            "history": setup.history,
            "samples": len(data), "steps": summary["steps"], "wall_s": summary["wall_s"],
            "elapsed_s": time.time() - started, "commit": git_commit()}
    if is_main_process():
        save_pretrained(run_dir / "pretrained.pt", model, setup.transfer, meta)
        _write_model_card(run_dir, meta, setup.transfer, summary)
    return meta


def _write_model_card(run_dir: Path, meta: dict, groups, summary: dict) -> None:
    write_json(run_dir / "pretrain_summary.json", {"meta": meta, "transferred_groups": list(groups),
                                                   "training": summary})
