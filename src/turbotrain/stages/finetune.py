"""``turbotrain train``: one fine-tuning run, the manual multi-stage recipe or one balanced joint run."""
from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader, Subset

from turbotrain.data.sample import collate
from turbotrain.experiments import FUSION_MODES, Run
from turbotrain.pretrain.transfer import load_pretrained
from turbotrain.stages.common import (TASKS, build_model, cache_fingerprint, claim_run_dir, dataset, file_digest,
                                     is_main_process, train_config, unwrap)
from turbotrain.stages.evaluate import Predictor, collect, device_of, evaluation_dataset, score
from turbotrain.train.balancers import build_balancer
from turbotrain.train.checkpoint import load_checkpoint, save_checkpoint
from turbotrain.train.engine import fit
from turbotrain.utils.atomic import write_json
from turbotrain.utils.seed import seed_everything

log = logging.getLogger(__name__)


@dataclass
class Stage:
    name: str
    tasks: list[str]
    agents: str  # ego | all
    epochs: float
    max_steps: int | None
    balancer: str
    balancer_options: dict = field(default_factory=dict)
    freeze: list[str] = field(default_factory=list)


def recipe_stages(config: dict, run: Run) -> list[Stage]:
    """Joint = one stage with the run's balancer; multistage = the configured stages, fixed weights."""
    options = config["finetune"]["balancer_options"]
    if run.recipe == "joint":
        joint = config["finetune"]["joint"]
        return [Stage("joint", list(TASKS), "all", joint["epochs"], joint["max_steps"], run.balancer,
                      dict(options.get(run.balancer, {})))]
    stages = []
    for s in config["finetune"]["multistage"]["stages"]:
        weights = {t: s["loss_weights"].get(t, 1.0) for t in s["tasks"]}
        stages.append(Stage(s["name"], list(s["tasks"]), s["agents"], s["epochs"], s["max_steps"], "fixed",
                            {"weights": weights}, list(s["freeze"])))
    return stages


def task_step(tasks: list[str]):
    """Engine step function returning the stage's task losses, every loss term for the logs and the
    shared maps both heads read (``bev`` from ``step_bev``: heads' side first), for balancers that
    work on the shared representation."""
    def step(model, batch):
        outputs = model(batch)
        losses = unwrap(model).losses(outputs, batch)
        logged = {k: v.detach() for k, v in losses.items() if k not in TASKS}
        return {**{t: losses[t] for t in tasks}, "log": logged, "features": [outputs["bev"], outputs["step_bev"]]}
    return step


class TrainingCurve:
    """Scores a few validation samples at each checkpoint: AP@0.5 and EPA against training time.

    Each point scores a copy of the model whose BatchNorm statistics were recomputed on a few
    training batches, as the final model's are: stale running averages would make a curve measure
    how fast BN statistics settle rather than how fast the model learns. Scoring time is excluded.
    """

    POINTS_FILE = "curve.json"  # per stage directory, next to the stage's last.pt

    def __init__(self, config: dict, run: Run, cache_root: str):
        self.config, self.run = config, run
        self.train_data = None
        self.limit = config["evaluation"]["curve_samples"]
        self.data = evaluation_dataset(config, cache_root, run.fusion, split="val") if self.limit else None
        self.points: list[dict] = []
        self.stage_dir, self.stage_first, self.offset, self.started, self.hook_s = None, 0, 0.0, time.time(), 0.0

    def __call__(self, step: int, model) -> None:
        if not self.limit:
            return
        began = time.time()
        self._score(step, unwrap(model), self.offset + began - self.started - self.hook_s)
        self.hook_s += time.time() - began

    def _score(self, step: int, model, wall_s: float) -> None:
        scored = copy.deepcopy(model)
        recalibrate_batchnorm(scored, self.train_data, self.run.seed, batches=4)
        predictor = Predictor(scored, self.config["evaluation"], device_of(self.config))
        det, pred = score(*collect(predictor, self.data, self.run.fusion, self.config["evaluation"], self.limit),
                          self.config)
        self.points.append({"step": int(step), "wall_s": wall_s, "ap50": det["map"].get("0.5"), "epa": pred["epa"]})
        write_json(self.stage_dir / self.POINTS_FILE, self.points[self.stage_first:])

    def start_stage(self, offset_s: float, stage_dir: Path, train_data, model) -> None:
        """Continue the time axis after ``offset_s`` of earlier training, with the stage in ``stage_dir``.

        The points live in memory only until the job ends, so each stage also keeps its own on disk:
        a stage resuming from last.pt (a killed or requeued job) takes back the points scored up to
        that checkpoint, scores that checkpoint itself if the kill came while it was being scored,
        and its clock continues from the checkpoint's training time.
        """
        self.stage_dir, self.stage_first, self.train_data = stage_dir, len(self.points), train_data
        self.offset, self.started, self.hook_s = offset_s, time.time(), 0.0
        if not (self.limit and (stage_dir / "last.pt").exists()):
            return
        checkpoint = load_checkpoint(stage_dir / "last.pt")
        progress = checkpoint["progress"]
        self.offset += progress["wall_s"]
        self.points += [p for p in self._saved_points() if p["step"] <= progress["step"]]
        if progress["step"] and not any(p["step"] == progress["step"] for p in self.points[self.stage_first:]):
            resumed = copy.deepcopy(model)
            resumed.load_state_dict(checkpoint["model"])
            self._score(progress["step"], resumed, self.offset)
        self.started = time.time()

    def _saved_points(self) -> list[dict]:
        """This stage's points on disk; none when a kill came between last.pt and the first point."""
        path = self.stage_dir / self.POINTS_FILE
        return json.loads(path.read_text()) if path.exists() else []


def recalibrate_batchnorm(model, data, seed: int, batches: int = 8, batch_size: int = 4) -> None:
    """Precise BatchNorm: recompute running statistics with the final weights on training samples.

    The encoders keep OpenPCDet's BN momentum (0.01), tuned for 80-epoch runs; after a short run the
    running averages still mix early weights' statistics and eval-mode inference finds nothing.
    """
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data), generator=generator)[: batches * batch_size].tolist()
    loader = DataLoader(Subset(data, order), batch_size=batch_size, collate_fn=collate)
    update_bn(loader, model, device=next(model.parameters()).device)


def run_inputs(config: dict, run: Run, cache_root: str, pretrained: str | None) -> dict:
    """Everything a run's weights depend on: a resumed run must have been started from the same."""
    sections = ("classes", "grid", "model", "train", "finetune")
    return {"run": run.as_dict(), "config": {k: config[k] for k in sections},
            "curve_samples": config["evaluation"]["curve_samples"],
            "train_cache": cache_fingerprint(cache_root), "pretrained": file_digest(pretrained)}


def finetune(config: dict, run: Run, cache_root: str, pretrained: str | None, out_dir: str) -> dict:
    out = Path(out_dir)
    if is_main_process():
        claim_run_dir(out, run_inputs(config, run, cache_root, pretrained))
    # The engine seeds only once the model exists; seeding here makes the initial weights (of the
    # parts pretraining does not provide) a function of the run's seed, as a rerun needs.
    seed_everything(run.seed)
    model = build_model(config, run.fusion)
    pretrain_s = 0.0
    if pretrained:
        report = load_pretrained(model, pretrained)
        pretrain_s = float(torch.load(pretrained, map_location="cpu", weights_only=False)["meta"].get("wall_s", 0.0))
        if is_main_process():
            write_json(out / "transfer.json", report.summary())
    curve = TrainingCurve(config, run, cache_root)
    stages = recipe_stages(config, run)
    totals = {"wall_s": 0.0, "steps": 0, "epochs": 0.0}
    previous_final, world_size = None, 1
    for i, stage in enumerate(stages):
        stage_dir = out / "stages" / f"{i + 1}-{stage.name}"
        summary = _run_stage(config, run, cache_root, model, stage, stage_dir, previous_final, curve,
                             pretrain_s + totals["wall_s"])
        previous_final, world_size = stage_dir / "final.pt", summary["world_size"]
        totals["wall_s"] += summary["wall_s"]
        totals["steps"] += summary["steps"]
        totals["epochs"] += float(summary["epochs"])
    device = device_of(config)
    hours = totals["wall_s"] / 3600 * world_size
    training = {**totals, "device": device.type, "world_size": world_size, "pretrain_wall_s": pretrain_s,
                "total_wall_s": totals["wall_s"] + pretrain_s,
                "gpu_hours": hours if device.type == "cuda" else 0.0,
                "cpu_hours": hours if device.type == "cpu" else 0.0, "curve": curve.points}
    if is_main_process():
        _write_final(config, run, cache_root, model, previous_final, out)
        write_json(out / "summary.json", {"run": run.as_dict(), "stages": [s.__dict__ for s in stages],
                                          "training": training})
    return training


def _write_final(config: dict, run: Run, cache_root: str, model, last_stage_final: Path, out: Path) -> None:
    """The last stage's checkpoint with BatchNorm statistics recomputed for the final weights."""
    payload = load_checkpoint(last_stage_final)
    model.load_state_dict(payload["model"])
    recalibrate_batchnorm(model, dataset(config, cache_root, "train", FUSION_MODES[run.fusion][0], run.label_fraction),
                          run.seed)
    payload["model"] = model.state_dict()
    save_checkpoint(out / "final.pt", payload)


def _run_stage(config, run, cache_root, model, stage: Stage, stage_dir: Path, previous_final, curve,
               time_offset_s: float) -> dict:
    mode = "none" if stage.agents == "ego" else FUSION_MODES[run.fusion][0]
    data = dataset(config, cache_root, "train", mode, run.label_fraction)
    curve.start_stage(time_offset_s, stage_dir, data, model)
    if previous_final is not None and not (stage_dir / "last.pt").exists():
        model.load_state_dict(load_checkpoint(previous_final)["model"])
    for p in model.parameters():  # the engine freezes by prefix; earlier stages' freezes must not leak
        p.requires_grad_(True)
    balancer = build_balancer(stage.balancer, stage.tasks, **stage.balancer_options)
    section = {**config["train"], "max_steps": stage.max_steps or config["train"]["max_steps"]}
    cfg = train_config(section, len(data), run.seed, config["device"], epochs=stage.epochs,
                       freeze_prefixes=tuple(f"{group}." for group in stage.freeze))
    log.info("stage %s: %d samples (%s), tasks %s, balancer %s, frozen %s", stage.name, len(data), mode,
             stage.tasks, stage.balancer, stage.freeze or "nothing")
    summary = fit(model, task_step(stage.tasks), balancer, data, cfg, stage_dir, collate_fn=collate,
                  shared_params=model.shared_parameters(),
                  task_params={t: model.task_parameters()[t] for t in stage.tasks},
                  on_checkpoint=curve)
    if summary["resumed_from_step"]:
        # The job log is the only trace that a rerun or requeued job continued from last.pt.
        log.info("stage %s: resumed from step %d, trained to step %d", stage.name, summary["resumed_from_step"],
                 summary["steps"])
    return summary
