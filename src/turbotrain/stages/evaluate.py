"""``turbotrain evaluate``: run a trained model on the evaluation split and write its metrics JSON."""
from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from turbotrain.data.sample import AgentFrame, Sample, collate
from turbotrain.evaluate.detection import DetectionFilter, FrameResult, boxes_inside_range, evaluate_detection
from turbotrain.evaluate.metrics_file import write_metrics
from turbotrain.evaluate.prediction import PredictionConfig, PredictionFrame, evaluate_prediction
from turbotrain.experiments import FUSION_MODES, LIDAR_TYPES, Run, pretraining_sources
from turbotrain.geometry import transform_boxes
from turbotrain.ops.rotated_iou import rotated_nms
from turbotrain.stages.common import build_model, dataset, grid_of
from turbotrain.train.checkpoint import load_checkpoint

log = logging.getLogger(__name__)


class Predictor:
    """Model inference with the evaluation section's decoding thresholds."""

    def __init__(self, model, evaluation: dict, device: torch.device):
        self.model, self.cfg, self.device = model.to(device).eval(), evaluation, device

    def __call__(self, samples: list[Sample]) -> list[dict]:
        batch = collate(samples).to(self.device)
        return self.model.predict(batch, self.cfg["score_threshold"], self.cfg["nms_iou"], self.cfg["max_detections"])


def single_agent_view(sample: Sample, agent_id: int) -> tuple[Sample, np.ndarray]:
    """The sample as agent ``agent_id`` alone sees it (its own frame at t), and that frame's pose in the ego frame."""
    frames = [f for f in sample.frames if f.agent_id == agent_id]
    current = max(frames, key=lambda f: f.step).pose_to_ego
    to_agent = np.linalg.inv(current)
    own = [replace(f, pose_to_ego=to_agent @ f.pose_to_ego) for f in frames]
    split, scenario, _, timestamp = sample.sample_id.split("/")
    return replace(sample, sample_id=f"{split}/{scenario}/{agent_id}/{timestamp}", frames=own), current


def late_fusion(predict: Predictor, sample: Sample, evaluation: dict, grid) -> dict:
    """Late fusion: every agent detects and predicts alone; boxes move to the ego frame, then NMS.

    Cooperators see beyond the ego's map: their boxes outside the evaluation range are dropped, as
    an intermediate-fusion model cannot produce them either; NMS is per class, as in the head.
    """
    agents = sorted({f.agent_id for f in sample.frames})
    parts = []
    for agent_id in agents:
        view, pose = single_agent_view(sample, agent_id)
        pred = predict([view])[0]
        xy = pred["trajectories"]
        moved = xy @ pose[:2, :2].T + pose[:2, 3] if len(xy) else xy
        parts.append({**pred, "boxes": transform_boxes(pred["boxes"], pose).astype(np.float32), "trajectories": moved})
    merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    r = grid.point_cloud_range
    inside = np.flatnonzero(boxes_inside_range(merged["boxes"], (r[0], r[1], r[3], r[4])))
    keep = inside[classwise_nms(merged["boxes"][inside], merged["scores"][inside], merged["classes"][inside],
                                evaluation["nms_iou"], evaluation["max_detections"])]
    return {k: v[keep] for k, v in merged.items()}


def classwise_nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou: float, max_keep: int) -> np.ndarray:
    """Indices kept by rotated NMS within each class, best ``max_keep`` overall by score."""
    kept = [np.flatnonzero(classes == c)[rotated_nms(boxes[classes == c], scores[classes == c], iou)]
            for c in np.unique(classes)]
    keep = np.concatenate(kept) if kept else np.zeros(0, np.int64)
    return keep[np.argsort(-scores[keep], kind="stable")][:max_keep]


def collect(predict: Predictor, data, fusion: str, evaluation: dict, limit: int | None = None,
            batch_size: int = 4) -> tuple[list[FrameResult], list[PredictionFrame]]:
    """Per-frame detections and trajectories with their ground truth."""
    n = len(data) if limit is None else min(limit, len(data))
    det_frames, pred_frames = [], []
    for start in tqdm(range(0, n, batch_size), desc="evaluate", unit="batch", disable=limit is not None):
        samples = [data[i] for i in range(start, min(start + batch_size, n))]
        if fusion == "late":
            outputs = [late_fusion(predict, s, evaluation, data.grid) for s in samples]
        else:
            outputs = predict(samples)
        for sample, out in zip(samples, outputs):
            det_frames.append(FrameResult(out["boxes"], out["scores"], out["classes"], sample.boxes, sample.classes,
                                          sample.sample_id))
            pred_frames.append(PredictionFrame(out["boxes"], out["scores"], out["trajectories"], sample.boxes,
                                               sample.future[..., :2], sample.future_valid, sample.sample_id))
    return det_frames, pred_frames


def score(det_frames, pred_frames, config: dict) -> tuple[dict, dict]:
    ev = config["evaluation"]
    detection = evaluate_detection(
        det_frames, config["classes"], tuple(ev["iou_thresholds"]), tuple(tuple(b) for b in ev["range_bins"]),
        ev["sort"], DetectionFilter.from_grid(grid_of(config), ev["score_threshold"]),
    )
    prediction = evaluate_prediction(pred_frames, PredictionConfig(
        score_threshold=ev["score_threshold"], fde_threshold=ev["fde_threshold"],
        miss_threshold=ev["miss_threshold"], alpha=ev["epa_alpha"]))
    return detection, prediction


def evaluation_dataset(config: dict, cache_root: str, fusion: str, split: str | None = None):
    mode = "intermediate" if fusion == "late" else FUSION_MODES[fusion][0]
    return dataset(config, cache_root, split or config["evaluation"]["split"], mode)


def device_of(config: dict) -> torch.device:
    wanted = config["device"]
    return torch.device("cuda" if wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available()) else "cpu")


def evaluate(config: dict, run: Run, checkpoint: str, cache_root: str, out_path: str) -> dict:
    model = build_model(config, run.fusion)
    model.load_state_dict(load_checkpoint(checkpoint)["model"])
    predict = Predictor(model, config["evaluation"], device_of(config))
    det_frames, pred_frames = collect(predict, evaluation_dataset(config, cache_root, run.fusion), run.fusion,
                                      config["evaluation"])
    detection, prediction = score(det_frames, pred_frames, config)
    training = _training_record(Path(checkpoint).parent)
    variant = config["pretrain"]["variants"][run.pretrain]
    run_record = {
        "experiment": config["experiment"], "variant": f"{run.pretrain}+{run.recipe}-{run.balancer}",
        "dataset": run.dataset, "fusion": run.fusion, "pretrain": run.pretrain, "balancer": run.balancer,
        "recipe": run.recipe, "label_fraction": run.label_fraction, "seed": run.seed,
        "mask_ratio": variant["mask_ratio"] if variant["type"] in LIDAR_TYPES else None,
        "pretrain_type": variant["type"], "pretrain_data": pretraining_sources(config, run.pretrain),
        "run_id": run.metrics_path.removeprefix("results/metrics/").removesuffix(".json"),
    }
    write_metrics(out_path, run_record, detection, prediction, training)
    return {"detection": detection["map"], "prediction": {k: prediction[k] for k in ("min_ade", "min_fde", "mr", "epa")}}


def _training_record(run_dir: Path) -> dict:
    """Training time and curve written by ``turbotrain train`` next to the checkpoint."""
    summary = json.loads((run_dir / "summary.json").read_text())
    return summary["training"]
