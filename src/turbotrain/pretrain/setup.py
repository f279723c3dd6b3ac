"""What a pretraining variant trains: its data (one cache or a union) and its seeded, untrained
objective around the fine-tuning model (masked LiDAR reconstruction, trajectory SSL, or both)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from turbotrain.build import build_model, fused_dataset, grid_of
from turbotrain.data.augment import GlobalAugmentation
from turbotrain.data.dataset import FusedDataset, UnionDataset
from turbotrain.data.sample import collate
from turbotrain.contract import FUSION_MODES, LIDAR_TYPES, TRAJECTORY_TYPES
from turbotrain.pretrain.chamfer import ChamferOptions
from turbotrain.pretrain.objective import VARIANT_INPUT, CombinedPretraining, MaskedReconstruction
from turbotrain.pretrain.trajectory import TrajectorySSL
from turbotrain.utils.errors import ConfigError
from turbotrain.utils.seed import seed_everything


def _vfe_and_map_channels(model, data) -> tuple[int, int, int]:
    """Feature widths of the voxel encoder, the 3D encoder's BEV map and the fused BEV map, read off
    one real batch.

    Probed in eval mode: a training-mode pass would fold this sample into BatchNorm's running
    statistics before training starts.
    """
    batch = collate([data[0]])
    model.eval()
    try:
        with torch.no_grad():
            vfe = model.encoder.voxel_features(batch.voxels, batch.num_points).shape[1]
            encoder = model.encoder_bev(batch).shape[1]
            bev = model.forward_bev(batch)["bev"].shape[1]
    finally:
        model.train()
    return vfe, encoder, bev


def decode_from(variant_name: str, variant: dict, fusion_mode: str) -> str:
    """Where the variant's decoder reads (``auto``: by type, objective.VARIANT_INPUT)."""
    chosen = variant.get("decode_from", "auto")
    chosen = VARIANT_INPUT[variant["type"]]["decode_from"] if chosen == "auto" else chosen
    if chosen == "encoder" and fusion_mode not in ("early", "none"):
        raise ConfigError(f"pretrain.variants.{variant_name}.decode_from: 'encoder' decodes one ego-frame cloud per "
                          f"sample (ego_only, multi_agent); a {variant['type']} variant fuses agents after the "
                          "encoder: use 'fused' or 'auto'")
    return chosen


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
    # CooPre augments the fused cloud (pretrain.augmentation; tracks are not augmented)
    augmentation = GlobalAugmentation.from_config(config["pretrain"]["augmentation"]) if split == "train" else None
    # CooPre's targets are the raw fused points of a masked pillar, not what the per-voxel cap leaves
    raw_targets = config["pretrain"]["reconstruction_targets"] == "raw_points" and fusion_mode != "tracks"
    members = [fused_dataset(config, root, split, fusion_mode, history=history, augmentation=augmentation,
                             augmentation_seed=config["seed"], target_points=raw_targets) for root in cache_roots]
    for root, member in zip(cache_roots, members):
        if raw_targets and not member.manifest["config"]["target_points_per_cell"]:
            raise ConfigError(f"{member.split_dir}: pretrain.reconstruction_targets is raw_points, but this cache "
                              "keeps no raw target points (cache.target_points_per_cell: 0); rebuild it with a "
                              "positive cache.target_points_per_cell or use reconstruction_targets: voxel_points")
    return members[0] if len(members) == 1 else UnionDataset(members, sources)


def trajectory_objective(config: dict, variant_name: str, model) -> TrajectorySSL:
    """SmartPretrain around the prediction head's track encoder and interaction layer."""
    head = model.prediction_head
    if not getattr(head, "motion", False):
        raise ConfigError(f"pretrain.variants.{variant_name}: trajectory pretraining needs the prediction head's "
                          "motion branch (model.prediction_head.motion: true), which it pretrains")
    options = dict(config["pretrain"]["variants"][variant_name]["trajectory"])
    track_steps = config["cache"]["history"] + config["cache"]["future"]
    # SmartPretrain ties the window to the history the model reads (our prediction head's motion
    # encoder reads tracks of cache.history steps in fine-tuning)
    options["window"] = options.get("window") or config["cache"]["history"]
    if 2 * options["window"] > track_steps:
        raise ConfigError(f"pretrain.variants.{variant_name}.trajectory.window: two non-overlapping windows of "
                          f"{options['window']} steps need tracks of {2 * options['window']} steps; the cache has "
                          f"{track_steps} (cache.history + cache.future)")
    return TrajectorySSL(head.motion_encoder, head.interaction, head.history_gru.hidden_size, track_steps, **options)


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
        vfe, encoder_channels, bev_channels = _vfe_and_map_channels(model, data)
        section = config["pretrain"]
        source = decode_from(variant_name, variant, fusion_mode)
        parts.append(MaskedReconstruction(
            model, grid_of(config), variant, history, vfe, encoder_channels if source == "encoder" else bev_channels,
            section["points_per_cell"], section["max_target_points"], transfer=spec["transfer"], decode_from=source,
            chamfer=ChamferOptions(**section["chamfer"])))
    if variant["type"] in TRAJECTORY_TYPES:
        parts.append(trajectory_objective(config, variant_name, model))
    objective = parts[0] if len(parts) == 1 else CombinedPretraining(*parts)
    return PretrainSetup(variant, fusion_mode, history, data, objective, list(sources))
