"""``turbotrain pretrain``: masked LiDAR reconstruction and/or trajectory SSL, then export with a model card."""
from __future__ import annotations

import json
import logging
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from turbotrain.data.dataset import FusedDataset, UnionDataset
from turbotrain.data.sample import collate
from turbotrain.experiments import FUSION_MODES, LIDAR_TYPES, TRAJECTORY_TYPES, pretrain_settings
from turbotrain.pretrain.objective import VARIANT_INPUT, CombinedPretraining, MaskedReconstruction
from turbotrain.pretrain.trajectory import TrajectorySSL
from turbotrain.pretrain.transfer import save_pretrained
from turbotrain.stages.common import (build_model, cache_fingerprint, claim_run_dir, dataset, grid_of, is_main_process,
                                     train_config, unwrap)
from turbotrain.train.balancers import build_balancer
from turbotrain.train.engine import fit
from turbotrain.utils.atomic import atomic_path, write_json
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
    fusion_mode: str
    history: int
    data: FusedDataset | UnionDataset
    objective: torch.nn.Module
    sources: list[str]


def variant_of(config: dict, variant_name: str) -> dict:
    variants = config["pretrain"]["variants"]
    if variant_name not in variants:
        raise ConfigError(f"pretrain.variants: no variant named {variant_name!r} (have {sorted(variants)})")
    if variants[variant_name]["type"] == "none":
        raise ConfigError(f"pretrain.variants.{variant_name}: type 'none' has nothing to pretrain")
    return variants[variant_name]


def pretraining_data(config: dict, cache_roots: list[str], sources: list[str], split: str, fusion_mode: str,
                     history: int) -> FusedDataset | UnionDataset:
    """One dataset's cache, or the union of several (each fused with its own class map)."""
    members = [dataset(config, root, split, fusion_mode, history=history) for root in cache_roots]
    return members[0] if len(members) == 1 else UnionDataset(members, sources)


def trajectory_objective(config: dict, variant_name: str, model) -> TrajectorySSL:
    """SmartPretrain around the prediction head's track encoder and interaction layer."""
    head = model.prediction_head
    if not getattr(head, "motion", False):
        raise ConfigError(f"pretrain.variants.{variant_name}: trajectory pretraining needs the prediction head's "
                          "motion branch (model.prediction_head.motion: true), which it pretrains")
    options = dict(config["pretrain"]["variants"][variant_name]["trajectory"])
    track_steps = config["cache"]["history"] + config["cache"]["future"]
    if 2 * options["window"] > track_steps:
        raise ConfigError(f"pretrain.variants.{variant_name}.trajectory.window: two non-overlapping windows of "
                          f"{options['window']} steps need tracks of {2 * options['window']} steps; the cache has "
                          f"{track_steps} (cache.history + cache.future)")
    return TrajectorySSL(head.motion_encoder, head.interaction, head.history_gru.hidden_size, **options)


def build_objective(config: dict, variant_name: str, fusion: str, cache_roots: list[str], sources: list[str] | None = None,
                    split: str = "train") -> PretrainSetup:
    """The seeded, untrained objective of ``variant_name`` and the data it reads (``cache_roots``, one per source)."""
    variant = variant_of(config, variant_name)
    sources = sources or [Path(root).name for root in cache_roots]
    spec = VARIANT_INPUT[variant["type"]]
    fusion_mode = spec["fusion_mode"] if spec["fusion_mode"] != "intermediate" else FUSION_MODES[fusion][0]
    history = spec["history"] or config["cache"]["history"]
    data = pretraining_data(config, cache_roots, sources, split, fusion_mode, history)
    # The engine seeds only once the model exists; seeding here makes the initial weights (and so
    # pretrained.pt) a function of the config seed too.
    seed_everything(config["seed"])
    model = build_model(config, fusion, history=history)
    parts = []
    if variant["type"] in LIDAR_TYPES:
        vfe, bev = _vfe_and_bev_channels(model, data)
        section = config["pretrain"]
        parts.append(MaskedReconstruction(model, grid_of(config), variant, history, vfe, bev, section["points_per_cell"],
                                          section["max_target_points"], transfer=spec["transfer"]))
    if variant["type"] in TRAJECTORY_TYPES:
        parts.append(trajectory_objective(config, variant_name, model))
    objective = parts[0] if len(parts) == 1 else CombinedPretraining(*parts)
    return PretrainSetup(variant, fusion_mode, history, data, objective, list(sources))


def pretrain(config: dict, variant_name: str, fusion: str, cache_roots: list[str] | str, out_dir: str,
             sources: list[str] | None = None) -> dict:
    """Train ``variant_name`` on the caches' train split in ``out_dir`` (resuming there); export pretrained.pt."""
    cache_roots = [cache_roots] if isinstance(cache_roots, str) else list(cache_roots)
    variant_of(config, variant_name)  # an unknown or `none` variant fails before anything is written
    run_dir = Path(out_dir)
    if is_main_process():
        inputs = {"variant": variant_name, "fusion": fusion, "train_cache": [cache_fingerprint(r) for r in cache_roots],
                  "config": pretrain_settings(config, variant_name)}
        claim_run_dir(run_dir, inputs)
    setup = build_objective(config, variant_name, fusion, cache_roots, sources)
    variant, data, objective, section = setup.variant, setup.data, setup.objective, config["pretrain"]
    engine = train_config({**section["train"], **variant["train"]}, len(data), config["seed"], config["device"],
                          final_name="objective.pt")
    for part in getattr(objective, "objectives", [objective]):
        if isinstance(part, TrajectorySSL):
            part.total_updates = engine.max_steps * engine.grad_accum_steps
    started = time.time()
    summary = fit(objective, lambda m, batch: unwrap(m)(batch), build_balancer("sum", list(objective.tasks)), data,
                  engine, run_dir, collate_fn=collate)
    meta = {"variant": variant_name, **variant, "fusion": fusion, "points_per_cell": section["points_per_cell"],
            "max_target_points": section["max_target_points"], "dataset": config["dataset"]["name"],
            "pretrain_data": _data_card(config, data, setup.sources), "fusion_mode": setup.fusion_mode,
            "history": setup.history, "samples": len(data), "steps": summary["steps"], "wall_s": summary["wall_s"],
            "elapsed_s": time.time() - started, "commit": git_commit()}
    if is_main_process():
        save_pretrained(run_dir / "pretrained.pt", objective.export(), objective.export_groups, meta)
        write_model_card(run_dir, meta, objective.export_groups, summary)
    return meta


def _data_card(config: dict, data, sources: list[str]) -> list[dict]:
    """Per source: its name, samples, fusion-cache hash and the class map it was read with."""
    members = getattr(data, "datasets", [data])
    return [{"name": name, "samples": len(member), "cache_config_hash": member.manifest["config_hash"],
             "class_map": member.manifest["config"].get("class_map", {})}
            for name, member in zip(sources, members)]


def write_model_card(run_dir: Path, meta: dict, groups, summary: dict) -> None:
    """``pretrain_summary.json`` (machine-readable) and ``MODEL_CARD.md``: what data, which objective, which commit."""
    write_json(run_dir / "pretrain_summary.json", {"meta": meta, "transferred_groups": list(groups), "training": summary})
    data = "\n".join(f"| {d['name']} | {d['samples']} | `{d['cache_config_hash'][:12]}` | {d['class_map'] or 'identity'} |"
                     for d in meta["pretrain_data"])
    card = f"""# Pretrained weights: `{meta['variant']}` ({meta['type']}, {meta['fusion']} model)

- Objective: {OBJECTIVE_TEXT[meta['type']]}
- Settings: {json.dumps({k: v for k, v in meta.items() if k in ('mask_ratio', 'temporal_masking', 'trajectory')})}
- Transferred parts: {', '.join(f'`{g}`' for g in groups)} (load with `turbotrain train --pretrained pretrained.pt`,
  or as a pipeline input: see README "Pretrained checkpoints")
- Training: {meta['steps']} steps on {meta['samples']} samples, {meta['wall_s']:.0f} s; history {meta['history']}, fusion
  mode `{meta['fusion_mode']}`
- Code: commit `{meta['commit']}`

| pretraining data | samples | fusion cache | class map |
|---|---|---|---|
{data}
"""
    with atomic_path(run_dir / "MODEL_CARD.md") as tmp:
        Path(tmp).write_text(card)


OBJECTIVE_TEXT = {
    "ego_only": "BEV-MAE-style masked reconstruction of the ego's own current cloud (Chamfer)",
    "multi_agent": "CooPre: BEV-guided masked reconstruction of the early-fused multi-agent cloud (Chamfer)",
    "spatiotemporal": "TurboTrain: masked reconstruction through multi-agent and temporal fusion over the history",
    "trajectory": "SmartPretrain: trajectory contrast between two non-overlapping windows (MoCo) + masked-segment "
                  "reconstruction (SmoothL1), on object tracks only",
    "lidar_trajectory": "spatiotemporal LiDAR reconstruction and SmartPretrain trajectory SSL, losses summed",
}
