"""``turbotrain pretrain``: masked LiDAR reconstruction and/or trajectory SSL, then export with a model card."""
from __future__ import annotations

import json
import logging
import subprocess
import time
from pathlib import Path

from turbotrain.budgets import SPENT_KEYS
from turbotrain.build import cache_fingerprint, train_config
from turbotrain.data.sample import collate
from turbotrain.contract import SCHEDULE, pretrain_depends, pretraining_steps
from turbotrain.pretrain.setup import build_objective, variant_of
from turbotrain.pretrain.trajectory import TrajectorySSL
from turbotrain.pretrain.transfer import save_pretrained
from turbotrain.train.balancers import build_balancer
from turbotrain.train.distributed import is_main_process, unwrap_model
from turbotrain.train.engine import fit
from turbotrain.train.run_dir import claim_run_dir
from turbotrain.utils.atomic import atomic_path, write_json

log = logging.getLogger(__name__)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def pretrain(config: dict, variant_name: str, fusion: str, cache_roots: list[str] | str, out_dir: str,
             sources: list[str] | None = None, budget: str = SCHEDULE) -> dict:
    """Train ``variant_name`` on the caches' train split in ``out_dir`` (resuming there); export pretrained.pt.

    Under a named ``budget`` the pretraining trains the optimizer steps the budget gives it."""
    cache_roots = [cache_roots] if isinstance(cache_roots, str) else list(cache_roots)
    variant_of(config, variant_name)  # an unknown or `none` variant fails before anything is written
    run_dir = Path(out_dir)
    if is_main_process():
        inputs = {"variant": variant_name, "fusion": fusion, "train_cache": [cache_fingerprint(r) for r in cache_roots],
                  "depends": pretrain_depends(config, variant_name, budget)}
        claim_run_dir(run_dir, inputs)
    setup = build_objective(config, variant_name, fusion, cache_roots, sources)
    variant, data, objective, section = setup.variant, setup.data, setup.objective, config["pretrain"]
    steps = pretraining_steps(config, variant_name, budget)
    engine = train_config({**section["train"], **variant["train"], **({"max_steps": steps} if steps else {})},
                          len(data), config["seed"], config["device"], final_name="objective.pt")
    for part in getattr(objective, "objectives", [objective]):
        if isinstance(part, TrajectorySSL):
            part.total_updates = engine.max_steps * engine.grad_accum_steps
    started = time.time()
    summary = fit(objective, lambda m, batch: unwrap_model(m)(batch), build_balancer("sum", list(objective.tasks)), data,
                  engine, run_dir, collate_fn=collate)
    meta = {"variant": variant_name, **variant, "fusion": fusion, "budget": budget, "points_per_cell": section["points_per_cell"],
            "max_target_points": section["max_target_points"], "dataset": config["dataset"]["name"],
            "pretrain_data": _data_card(config, data, setup.sources), "fusion_mode": setup.fusion_mode,
            "history": setup.history, "samples": len(data), **{key: summary[key] for key in SPENT_KEYS}, "device": summary["device"],
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
