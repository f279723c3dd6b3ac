"""``turbotrain train``: one fine-tuning run, the manual multi-stage recipe or one balanced joint run."""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from turbotrain.data.sample import collate
from turbotrain.experiments import FUSION_MODES, Run
from turbotrain.pretrain.transfer import load_pretrained
from turbotrain.stages.common import TASKS, build_model, dataset, train_config, unwrap
from turbotrain.stages.evaluate import Predictor, collect, device_of, evaluation_dataset, score
from turbotrain.train.balancers import build_balancer
from turbotrain.train.checkpoint import load_checkpoint
from turbotrain.train.engine import fit
from turbotrain.utils.atomic import atomic_path, write_json

log = logging.getLogger(__name__)


@dataclass
class Stage:
    name: str
    tasks: list[str]
    agents: str  # ego | all
    epochs: float
    balancer: str
    balancer_options: dict = field(default_factory=dict)
    freeze: list[str] = field(default_factory=list)


def recipe_stages(config: dict, run: Run) -> list[Stage]:
    """Joint = one stage with the run's balancer; multistage = the configured stages, fixed weights."""
    options = config["finetune"]["balancer_options"]
    if run.recipe == "joint":
        return [Stage("joint", list(TASKS), "all", config["finetune"]["joint"]["epochs"], run.balancer,
                      dict(options.get(run.balancer, {})))]
    stages = []
    for s in config["finetune"]["multistage"]["stages"]:
        weights = {t: s["loss_weights"].get(t, 1.0) for t in s["tasks"]}
        stages.append(Stage(s["name"], list(s["tasks"]), s["agents"], s["epochs"], "fixed", {"weights": weights},
                            list(s["freeze"])))
    return stages


def task_step(tasks: list[str]):
    """Engine step function returning the stage's task losses and every loss term for the logs."""
    def step(model, batch):
        losses = unwrap(model).losses(model(batch), batch)
        logged = {k: v.detach() for k, v in losses.items() if k not in TASKS}
        return {**{t: losses[t] for t in tasks}, "log": logged}
    return step


class TrainingCurve:
    """Scores a few validation samples at each checkpoint: AP@0.5 and EPA against training time."""

    def __init__(self, config: dict, run: Run, cache_root: str, time_offset_s: float):
        self.config, self.run = config, run
        self.limit = config["evaluation"]["curve_samples"]
        self.data = evaluation_dataset(config, cache_root, run.fusion, split="val") if self.limit else None
        self.points: list[dict] = []
        self.start_stage(time_offset_s)

    def __call__(self, step: int, model) -> None:
        if not self.limit:
            return
        began = time.time()
        predictor = Predictor(unwrap(model), self.config["evaluation"], device_of(self.config))
        det, pred = score(*collect(predictor, self.data, self.run.fusion, self.config["evaluation"], self.limit),
                          self.config)
        unwrap(model).train()
        self.points.append({"step": int(step), "wall_s": self.offset + began - self.started - self.hook_s,
                            "ap50": det["map"].get("0.5"), "epa": pred["epa"]})
        self.hook_s += time.time() - began

    def start_stage(self, offset_s: float) -> None:
        """A later stage continues the same time axis, after ``offset_s`` of earlier training."""
        self.offset, self.started, self.hook_s = offset_s, time.time(), 0.0


def finetune(config: dict, run: Run, cache_root: str, pretrained: str | None, out_dir: str) -> dict:
    out = Path(out_dir)
    model = build_model(config, run.fusion)
    pretrain_s = 0.0
    if pretrained:
        report = load_pretrained(model, pretrained)
        pretrain_s = float(torch.load(pretrained, map_location="cpu", weights_only=False)["meta"].get("wall_s", 0.0))
        write_json(out / "transfer.json", report.summary())
    curve = TrainingCurve(config, run, cache_root, pretrain_s)
    stages = recipe_stages(config, run)
    totals = {"wall_s": 0.0, "steps": 0, "epochs": 0.0}
    previous_final = None
    for i, stage in enumerate(stages):
        stage_dir = out / "stages" / f"{i + 1}-{stage.name}"
        curve.start_stage(pretrain_s + totals["wall_s"])
        summary = _run_stage(config, run, cache_root, model, stage, stage_dir, previous_final, curve)
        previous_final = stage_dir / "final.pt"
        totals["wall_s"] += summary["wall_s"]
        totals["steps"] += summary["steps"]
        totals["epochs"] += float(summary["epochs"])
    with atomic_path(out / "final.pt") as tmp:
        shutil.copyfile(previous_final, tmp)
    device = device_of(config)
    hours = totals["wall_s"] / 3600
    training = {**totals, "device": device.type, "pretrain_wall_s": pretrain_s,
                "gpu_hours": hours if device.type == "cuda" else 0.0,
                "cpu_hours": hours if device.type == "cpu" else 0.0, "curve": curve.points}
    write_json(out / "summary.json", {"run": run.as_dict(), "stages": [s.__dict__ for s in stages], "training": training})
    return training


def _run_stage(config, run, cache_root, model, stage: Stage, stage_dir: Path, previous_final, curve) -> dict:
    mode = "none" if stage.agents == "ego" else FUSION_MODES[run.fusion][0]
    data = dataset(config, cache_root, "train", mode, run.label_fraction)
    if previous_final is not None and not (stage_dir / "last.pt").exists():
        model.load_state_dict(load_checkpoint(previous_final)["model"])
    for p in model.parameters():  # the engine freezes by prefix; earlier stages' freezes must not leak
        p.requires_grad_(True)
    balancer = build_balancer(stage.balancer, stage.tasks, **stage.balancer_options)
    cfg = train_config(config["train"], len(data), run.seed, config["device"], epochs=stage.epochs,
                       freeze_prefixes=tuple(f"{group}." for group in stage.freeze))
    log.info("stage %s: %d samples (%s), tasks %s, balancer %s, frozen %s", stage.name, len(data), mode,
             stage.tasks, stage.balancer, stage.freeze or "nothing")
    return fit(model, task_step(stage.tasks), balancer, data, cfg, stage_dir, collate_fn=collate,
               shared_params=model.shared_parameters(),
               task_params={t: model.task_parameters()[t] for t in stage.tasks},
               on_checkpoint=curve)
