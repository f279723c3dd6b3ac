"""``turbotrain train``: one fine-tuning run, the manual multi-stage recipe or one balanced joint run."""
from __future__ import annotations

import logging
from pathlib import Path

from turbotrain.build import build_model, cache_fingerprint, device_of, evaluation_dataset, fused_dataset, train_config
from turbotrain.data.sample import collate
from turbotrain.contract import FUSION_MODES, Run, finetune_depends
from turbotrain.pretrain.transfer import load_pretrained, pretrained_meta
from turbotrain.train.accounting import combine_stages, seen_indices, with_pretraining
from turbotrain.train.balancers import build_balancer
from turbotrain.train.curve import TrainingCurve, recalibrate_batchnorm
from turbotrain.train.distributed import is_main_process
from turbotrain.train.recipes import Stage, recipe_stages, task_step
from turbotrain.train.run_dir import claim_run_dir
from turbotrain.train.checkpoint import load_checkpoint, save_checkpoint
from turbotrain.train.engine import fit
from turbotrain.utils.atomic import write_json
from turbotrain.utils.hashing import sha256_file
from turbotrain.utils.seed import seed_everything

log = logging.getLogger(__name__)


def run_inputs(config: dict, run: Run, cache_root: str, pretrained: str | None) -> dict:
    """Everything a run's weights and curve depend on: what Snakemake reruns the job for
    (``contract.finetune_depends``), plus the data and weights it starts from. A run folder is
    resumed only by a job started from the same."""
    return {"depends": finetune_depends(config, run), "train_cache": cache_fingerprint(cache_root),
            "pretrained": sha256_file(pretrained) if pretrained else None}


def finetune(config: dict, run: Run, cache_root: str, pretrained: str | None, out_dir: str) -> dict:
    out = Path(out_dir)
    if is_main_process():
        claim_run_dir(out, run_inputs(config, run, cache_root, pretrained))
    # The engine seeds only once the model exists; seeding here makes the initial weights (of the
    # parts pretraining does not provide) a function of the run's seed, as a rerun needs.
    seed_everything(run.seed)
    model = build_model(config, run.fusion)
    pretraining = None
    if pretrained:
        report = load_pretrained(model, pretrained)
        pretraining = pretrained_meta(pretrained)
        if is_main_process():
            write_json(out / "transfer.json", report.summary())
    pretrain_s = float((pretraining or {}).get("wall_s", 0.0))
    val = evaluation_dataset(config, cache_root, run.fusion, split="val") if config["evaluation"]["curve_samples"] else None
    curve = TrainingCurve(config, run, val, device_of(config))
    stages = recipe_stages(config, run)
    summaries, seen, previous_final = [], [], None
    for i, stage in enumerate(stages):
        stage_dir = out / "stages" / f"{i + 1}-{stage.name}"
        wall_so_far = sum(s["wall_s"] for s in summaries)
        summary, stage_seen = _run_stage(config, run, cache_root, model, stage, stage_dir, previous_final, curve,
                                         pretrain_s + wall_so_far)
        previous_final = stage_dir / "final.pt"
        summaries.append(summary)
        seen.append(stage_seen)
    # every stage reads the same labelled subset (fusion modes differ in agents, not in samples)
    totals = {**combine_stages(summaries, seen), "epochs": sum(float(s["epochs"]) for s in summaries)}
    world_size = summaries[-1]["world_size"]
    device = device_of(config)
    hours = totals["wall_s"] / 3600 * world_size
    training = {**with_pretraining(totals, pretraining), "device": device.type, "world_size": world_size,
                "gpu_hours": hours if device.type == "cuda" else 0.0,
                "cpu_hours": hours if device.type == "cpu" else 0.0, "curve": curve.points}
    if is_main_process():
        # the curve's last point already recalibrated these weights on this data (not so after an ego stage)
        scored = None if stages[-1].agents == "ego" else curve.recalibrated_weights(previous_final.parent,
                                                                                    summaries[-1]["steps"])
        _write_final(config, run, cache_root, model, previous_final, out, scored)
        write_json(out / "summary.json", {"run": run.as_dict(), "stages": [s.__dict__ for s in stages],
                                          "training": training})
    return training


def _write_final(config: dict, run: Run, cache_root: str, model, last_stage_final: Path, out: Path,
                 recalibrated: dict | None = None) -> None:
    """The last stage's checkpoint with BatchNorm statistics recomputed for the final weights (the
    ``recalibrated`` weights when the training curve has already done so)."""
    payload = load_checkpoint(last_stage_final)
    if recalibrated is None:
        model.load_state_dict(payload["model"])
        data = fused_dataset(config, cache_root, "train", FUSION_MODES[run.fusion][0], run.label_fraction)
        recalibrate_batchnorm(model, data, run.seed)
        recalibrated = model.state_dict()
    payload["model"] = recalibrated
    save_checkpoint(out / "final.pt", payload)


def _run_stage(config, run, cache_root, model, stage: Stage, stage_dir: Path, previous_final, curve,
               time_offset_s: float) -> dict:
    mode = "none" if stage.agents == "ego" else FUSION_MODES[run.fusion][0]
    data = fused_dataset(config, cache_root, "train", mode, run.label_fraction)
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
    return summary, seen_indices(len(data), cfg.batch_size * cfg.grad_accum_steps, cfg.seed, summary["steps"])
