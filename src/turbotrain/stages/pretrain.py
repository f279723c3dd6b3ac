"""``turbotrain pretrain``: masked multi-agent (spatio-temporal) reconstruction, then export."""
from __future__ import annotations

import json
import logging
import subprocess
import time
from pathlib import Path

import torch

from turbotrain.data.sample import collate
from turbotrain.experiments import FUSION_MODES
from turbotrain.pretrain.objective import VARIANT_INPUT, MaskedReconstruction
from turbotrain.pretrain.transfer import save_pretrained
from turbotrain.stages.common import build_model, dataset, grid_of, train_config, unwrap
from turbotrain.train.balancers import build_balancer
from turbotrain.train.engine import fit
from turbotrain.utils.atomic import write_json
from turbotrain.utils.errors import ConfigError

log = logging.getLogger(__name__)


def _vfe_and_bev_channels(model, data) -> tuple[int, int]:
    """Feature widths of the voxel encoder and of the fused BEV map, read off one real batch."""
    batch = collate([data[0]])
    with torch.no_grad():
        vfe = model.encoder.voxel_features(batch.voxels, batch.num_points).shape[1]
        bev = model.forward_bev(batch)["bev"].shape[1]
    return vfe, bev


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def pretrain(config: dict, variant_name: str, fusion: str, cache_root: str, out_dir: str) -> dict:
    variants = config["pretrain"]["variants"]
    if variant_name not in variants:
        raise ConfigError(f"pretrain.variants: no variant named {variant_name!r} (have {sorted(variants)})")
    variant = variants[variant_name]
    if variant["type"] == "none":
        raise ConfigError(f"pretrain.variants.{variant_name}: type 'none' has nothing to pretrain")
    spec = VARIANT_INPUT[variant["type"]]
    fusion_mode = spec["fusion_mode"] if spec["fusion_mode"] != "intermediate" else FUSION_MODES[fusion][0]
    history = spec["history"] or config["cache"]["history"]
    data = dataset(config, cache_root, "train", fusion_mode, history=history)
    model = build_model(config, fusion, history=history)
    vfe, bev = _vfe_and_bev_channels(model, data)
    section = config["pretrain"]
    objective = MaskedReconstruction(model, grid_of(config), variant, history, vfe, bev,
                                     section["points_per_cell"], section["max_target_points"])
    run_dir = Path(out_dir)
    started = time.time()
    summary = fit(
        objective, lambda m, batch: unwrap(m)(batch), build_balancer("sum", ["reconstruction"]), data,
        train_config(section["train"], len(data), config["seed"], config["device"], final_name="objective.pt"),
        run_dir, collate_fn=collate,
    )
    meta = {"variant": variant_name, "type": variant["type"], "fusion": fusion, "mask_ratio": variant["mask_ratio"],
            "temporal_masking": variant["temporal_masking"], "dataset": config["dataset"]["name"],
            "samples": len(data), "steps": summary["steps"], "wall_s": summary["wall_s"],
            "elapsed_s": time.time() - started, "commit": git_commit()}
    save_pretrained(run_dir / "pretrained.pt", model, spec["transfer"], meta)
    _write_model_card(run_dir, meta, spec["transfer"], summary)
    return meta


def _write_model_card(run_dir: Path, meta: dict, groups, summary: dict) -> None:
    write_json(run_dir / "pretrain_summary.json", {"meta": meta, "transferred_groups": list(groups),
                                                   "training": summary})
