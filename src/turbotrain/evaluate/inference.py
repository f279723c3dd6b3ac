"""Model inference for evaluation: decoding with the evaluation thresholds, late fusion (every agent
alone, boxes merged in the ego frame) and class-wise NMS, and per-frame results with their ground
truth. Scoring those results is :mod:`.scoring`'s; this module only runs the model."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from tqdm import tqdm

from turbotrain.data.sample import Sample, collate
from turbotrain.evaluate.detection import FrameResult, boxes_inside_range
from turbotrain.evaluate.prediction import PredictionFrame
from turbotrain.geometry import transform_boxes
from turbotrain.ops.rotated_iou import rotated_nms


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
            pred_frames.append(PredictionFrame(
                det_boxes=out["boxes"], det_scores=out["scores"], det_classes=out["classes"],
                det_trajectories=out["trajectories"], gt_boxes=sample.boxes, gt_classes=sample.classes,
                gt_future=sample.future[..., :2], gt_future_valid=sample.future_valid,
                det_mode_probs=out.get("mode_probs"), frame_id=sample.sample_id))
    return det_frames, pred_frames
