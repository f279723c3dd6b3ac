"""``turbotrain evaluate``: run a trained model on the evaluation split and write its metrics JSON."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from turbotrain.build import build_model, device_of, evaluation_dataset
from turbotrain.evaluate.inference import Predictor, collect
from turbotrain.evaluate.metrics_file import PREDICTION_METRICS, write_metrics
from turbotrain.evaluate.scoring import bootstrap_split, score_split
from turbotrain.contract import LIDAR_TYPES, Run, pretraining_sources
from turbotrain.train.checkpoint import load_checkpoint

log = logging.getLogger(__name__)


def evaluate(config: dict, run: Run, checkpoint: str, cache_root: str, out_path: str) -> dict:
    model = build_model(config, run.fusion)
    model.load_state_dict(load_checkpoint(checkpoint)["model"])
    predict = Predictor(model, config["evaluation"], device_of(config))
    dataset = evaluation_dataset(config, cache_root, run.fusion)
    det_frames, pred_frames = collect(predict, dataset, run.fusion, config["evaluation"])
    detection, prediction = score_split(det_frames, pred_frames, config)
    training = _training_record(Path(checkpoint).parent)
    variant = config["pretrain"]["variants"][run.pretrain]
    run_record = {
        "experiment": config["experiment"], "variant": f"{run.pretrain}+{run.recipe}-{run.balancer}",
        "dataset": run.dataset, "fusion": run.fusion, "pretrain": run.pretrain, "balancer": run.balancer,
        "recipe": run.recipe, "label_fraction": run.label_fraction, "seed": run.seed, "budget": run.budget,
        "mask_ratio": variant["mask_ratio"] if variant["type"] in LIDAR_TYPES else None,
        "pretrain_type": variant["type"], "pretrain_data": pretraining_sources(config, run.pretrain),
        "run_id": run.run_id,
        "gt_range_rule": dataset.manifest["config"]["gt_range_rule"],
    }
    write_metrics(out_path, run_record, detection, prediction, training,
                  bootstrap_split(det_frames, pred_frames, config))
    return {"detection": detection["map"], "prediction": {k: prediction[k] for k in PREDICTION_METRICS}}


def _training_record(run_dir: Path) -> dict:
    """Training time and curve written by ``turbotrain train`` next to the checkpoint."""
    summary = json.loads((run_dir / "summary.json").read_text())
    return summary["training"]
