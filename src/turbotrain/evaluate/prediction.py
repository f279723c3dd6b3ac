"""Motion prediction metrics: minADE_k / minFDE_k / miss rate, and end-to-end EPA.

Conventions:

* Trajectories are ego-frame positions in metres; only the first two coordinates (x, y) are used, so
  the ``(x, y, yaw)`` futures of :class:`turbotrain.data.sample.Sample` can be passed as they are.
* ``k = K``: the minimum is over all modes given. minADE and minFDE are minimised **independently**
  over modes (nuScenes / Waymo / ViP3D convention; Argoverse-1 instead reports the ADE of the
  best-FDE mode).
* ADE averages over the *valid* future steps; FDE is measured at the **last valid** step.
* Agents without any valid future step have no defined error: they get NaN per agent and are left
  out of every aggregate (minADE, minFDE, MR, and the EPA numerator and denominator). In end-to-end
  evaluation they still take part in detection matching, so detecting such an agent is not a false
  positive.

End-to-end evaluation (:func:`evaluate_prediction`) first matches detections (score above the
threshold, descending score order) to ground truth by greedy matching with removal, as the detection
metric does. The criterion is configurable: BEV centre distance ``<= match_threshold`` metres
(ViP3D-style, default 2 m) or BEV rotated IoU ``>= match_threshold``. Then

    EPA = (#matched GT agents with best-mode FDE < fde_threshold - alpha * #unmatched detections)
          / #GT agents

summed over the split (not averaged per frame), alpha = 0.5 and fde_threshold = 2 m by default.
EPA is not clipped, so a detector that floods false positives can score below zero.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

from turbotrain.evaluate.detection import greedy_match, json_number
from turbotrain.ops.rotated_iou import rotated_iou_bev


@dataclass(frozen=True)
class PredictionFrame:
    """One evaluated frame: detections with their K predicted futures, and ground-truth futures."""

    det_boxes: np.ndarray  # (N, 7)
    det_scores: np.ndarray  # (N,)
    det_trajectories: np.ndarray  # (N, K, F, >=2)
    gt_boxes: np.ndarray  # (M, 7)
    gt_future: np.ndarray  # (M, F, >=2)
    gt_future_valid: np.ndarray  # (M, F) bool
    frame_id: str = ""


@dataclass(frozen=True)
class PredictionConfig:
    """Matching and scoring parameters of end-to-end prediction evaluation."""

    match: Literal["center", "iou"] = "center"
    match_threshold: float = 2.0  # metres for "center", IoU for "iou"
    score_threshold: float = 0.2  # same pre-filter as detection AP
    fde_threshold: float = 2.0  # EPA: a matched agent is a hit when its best-mode FDE is below this
    miss_threshold: float = 2.0  # MR: an agent is a miss when its minFDE exceeds this
    alpha: float = 0.5  # EPA false-positive penalty (ViP3D, as recalled; not verified)

    def __post_init__(self):
        if self.match not in ("center", "iou"):
            raise ValueError(f"match must be 'center' or 'iou', got {self.match!r}")


def min_ade_fde(pred: np.ndarray, gt: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-agent ``(minADE (N,), minFDE (N,))`` of ``pred`` (N, K, F, 2) against ``gt`` (N, F, 2).

    NaN for agents whose ``valid`` (N, F) row has no True step.
    """
    pred = np.asarray(pred, dtype=np.float64)[..., :2]
    gt = np.asarray(gt, dtype=np.float64)[..., :2]
    valid = np.asarray(valid, dtype=bool)
    if pred.ndim == 4 and pred.shape[1] == 0:
        raise ValueError("pred has no modes (K = 0)")
    if pred.ndim != 4 or gt.shape != (pred.shape[0], pred.shape[2], 2) or valid.shape != gt.shape[:2]:
        raise ValueError(
            f"shapes pred {pred.shape}, gt {gt.shape}, valid {valid.shape} do not fit (N,K,F,2), (N,F,2), (N,F)"
        )
    error = np.linalg.norm(pred - gt[:, None], axis=-1)  # (N, K, F)
    n_valid = valid.sum(axis=1)
    has_future = n_valid > 0
    ade = (error * valid[:, None]).sum(axis=-1) / np.maximum(n_valid, 1)[:, None]
    last_valid = valid.shape[1] - 1 - np.argmax(valid[:, ::-1], axis=1)
    fde = np.take_along_axis(error, last_valid[:, None, None], axis=2)[..., 0]
    min_ade = np.where(has_future, ade.min(axis=1), np.nan)
    min_fde = np.where(has_future, fde.min(axis=1), np.nan)
    return min_ade, min_fde


def miss_rate(min_fde: np.ndarray, threshold: float = 2.0) -> float:
    """Share of agents (NaN entries excluded) whose minFDE exceeds ``threshold`` metres; NaN if none."""
    min_fde = np.asarray(min_fde, dtype=np.float64)
    defined = min_fde[~np.isnan(min_fde)]
    return float(np.mean(defined > threshold)) if len(defined) else math.nan


def evaluate_gt_queries(
    pred: np.ndarray, gt: np.ndarray, valid: np.ndarray, miss_threshold: float = 2.0
) -> dict:
    """minADE / minFDE / MR when predictions were made for given ground-truth agents (no detection)."""
    min_ade, min_fde = min_ade_fde(pred, gt, valid)
    return _summary(min_ade, min_fde, miss_threshold)


def match_detections(frame: PredictionFrame, config: PredictionConfig) -> tuple[np.ndarray, np.ndarray]:
    """``(kept (N,) bool, matched_gt (N,) int, -1 = none)`` for the frame's detections, original order."""
    scores = np.asarray(frame.det_scores, dtype=np.float64).reshape(-1)
    kept = scores > config.score_threshold
    order = np.nonzero(kept)[0][np.argsort(-scores[kept], kind="stable")]
    det_boxes = np.asarray(frame.det_boxes, dtype=np.float64).reshape(-1, 7)[order]
    gt_boxes = np.asarray(frame.gt_boxes, dtype=np.float64).reshape(-1, 7)
    if config.match == "iou":
        similarity = rotated_iou_bev(det_boxes, gt_boxes)
        is_match = lambda best: best >= config.match_threshold  # noqa: E731
    else:
        # Negated distance so the greedy matcher's "most similar" is the closest centre.
        similarity = -np.linalg.norm(det_boxes[:, None, :2] - gt_boxes[None, :, :2], axis=-1)
        is_match = lambda best: -best <= config.match_threshold  # noqa: E731
    matched = np.full(len(scores), -1, dtype=np.int64)
    matched[order] = greedy_match(similarity, is_match)
    return kept, matched


@dataclass
class _FrameCounts:
    min_ade: np.ndarray  # matched GT agents with a valid future
    min_fde: np.ndarray
    num_gt: int  # GT agents with a valid future
    num_fp: int  # kept detections matched to no GT


def _frame_counts(frame: PredictionFrame, config: PredictionConfig) -> _FrameCounts:
    kept, matched = match_detections(frame, config)
    gt_valid = np.asarray(frame.gt_future_valid, dtype=bool)
    evaluable = gt_valid.any(axis=1)
    det_idx = np.nonzero(matched >= 0)[0]
    det_idx = det_idx[evaluable[matched[det_idx]]]
    gt_idx = matched[det_idx]
    trajectories = np.asarray(frame.det_trajectories, dtype=np.float64)
    gt_future = np.asarray(frame.gt_future, dtype=np.float64)
    if len(det_idx):
        min_ade, min_fde = min_ade_fde(trajectories[det_idx], gt_future[gt_idx], gt_valid[gt_idx])
    else:
        min_ade = min_fde = np.zeros(0)
    return _FrameCounts(min_ade, min_fde, int(evaluable.sum()), int(np.sum(kept & (matched < 0))))


def end_to_end_prediction_accuracy(num_hits: int, num_fp: int, num_gt: int, alpha: float = 0.5) -> float:
    """EPA = (hits - alpha * false positives) / GT agents; NaN when there is no GT agent."""
    return (num_hits - alpha * num_fp) / num_gt if num_gt else math.nan


def evaluate_prediction(frames: Sequence[PredictionFrame], config: PredictionConfig = PredictionConfig()) -> dict:
    """Detection-matched minADE / minFDE / MR and EPA over the split; JSON-ready (undefined -> None)."""
    counts = [_frame_counts(frame, config) for frame in frames]
    min_ade = np.concatenate([c.min_ade for c in counts]) if counts else np.zeros(0)
    min_fde = np.concatenate([c.min_fde for c in counts]) if counts else np.zeros(0)
    num_gt = sum(c.num_gt for c in counts)
    num_fp = sum(c.num_fp for c in counts)
    num_hits = int(np.sum(min_fde < config.fde_threshold))
    result = _summary(min_ade, min_fde, config.miss_threshold)
    result.update(
        epa=json_number(end_to_end_prediction_accuracy(num_hits, num_fp, num_gt, config.alpha)),
        num_gt=num_gt,
        num_fp=num_fp,
        num_hits=num_hits,
        match=config.match,
        match_threshold=config.match_threshold,
        score_threshold=config.score_threshold,
        fde_threshold=config.fde_threshold,
        alpha=config.alpha,
    )
    return result


def _summary(min_ade: np.ndarray, min_fde: np.ndarray, miss_threshold: float) -> dict:
    defined = ~np.isnan(min_fde)
    return {
        "min_ade": json_number(float(np.mean(min_ade[defined])) if defined.any() else math.nan),
        "min_fde": json_number(float(np.mean(min_fde[defined])) if defined.any() else math.nan),
        "mr": json_number(miss_rate(min_fde, miss_threshold)),
        "miss_threshold": miss_threshold,
        "num_matched": int(defined.sum()),
    }
