"""Motion prediction metrics: minADE_K / minFDE_K / miss rate, and end-to-end EPA, per class.

End-to-end evaluation follows ViP3D's official scorer (Tsinghua-MARS-Lab/ViP3D,
``tools/prediction_eval.py``) on every point that changes the numbers; docs/metrics.md states each
convention and docs/faithfulness.md the places where we depart from it.

* Trajectories are ego-frame positions in metres; only x, y are used, so the ``(x, y, yaw)`` futures
  of :class:`turbotrain.data.sample.Sample` can be passed as they are.
* ``K`` (``top_k``, ViP3D: 6): the K most probable modes are scored (the first K when the frame has
  no mode probabilities). minADE and minFDE are minimised **independently** over those modes.
* ADE averages over every *valid* future step. FDE, the miss test and the EPA hit test are taken at
  the **final horizon step**, and only agents valid at that step enter their denominators (minFDE,
  MR, and the EPA denominator). Agents without any valid step have no ADE either.
* **Matching** (within a class): kept detections (score above ``score_threshold``) and ground-truth
  agents of the current frame are assigned by the Hungarian algorithm
  (:func:`scipy.optimize.linear_sum_assignment`) on the BEV distance between current positions,
  keeping pairs within ``match_threshold`` (2 m); scores play no part. Every ground-truth agent takes
  part, so detecting one that has no valid future is not a false positive (ViP3D does the same).
* A matched agent valid at the final step is a **hit** when ``minFDE <= fde_threshold`` and a
  **miss** when ``minFDE > miss_threshold`` (both 2 m, so every such agent is one or the other).
* Per class c: ``EPA_raw(c) = (hits(c) - alpha * false positives(c)) / GT agents(c) valid at the
  final step``, summed over the split; ``EPA(c) = max(EPA_raw(c), 0)`` as ViP3D reports it. The split's
  ``epa``, ``epa_raw``, ``min_ade``, ``min_fde``, ``mr`` are means over the classes where each is defined.

Kept where we differ from the scorer: a frame without ground truth still counts its detections as
false positives (ViP3D skips such frames: ``frames_without_gt="skip"``), and with nothing to score minADE/minFDE/MR are undefined
(``None``), not 0.0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from turbotrain.contract import EPA_FRAMES_WITHOUT_GT
from turbotrain.evaluate.detection import json_number
from turbotrain.ops.rotated_iou import rotated_iou_bev

# Reported per class and as their class mean; flattened per class as "epa/car" (AP: "ap@0.5/car").
PREDICTION_METRICS = ("epa", "epa_raw", "min_ade", "min_fde", "mr")


@dataclass(frozen=True)
class PredictionFrame:
    """One evaluated frame: detections with their class and K predicted futures, and ground truth."""

    det_boxes: np.ndarray  # (N, 7)
    det_scores: np.ndarray  # (N,)
    det_classes: np.ndarray  # (N,) int class index
    det_trajectories: np.ndarray  # (N, K, F, >=2)
    gt_boxes: np.ndarray  # (M, 7)
    gt_classes: np.ndarray  # (M,) int class index
    gt_future: np.ndarray  # (M, F, >=2)
    gt_future_valid: np.ndarray  # (M, F) bool
    det_mode_probs: np.ndarray | None = None  # (N, K); picks the top-K modes
    frame_id: str = ""

    def __post_init__(self):
        # Normalise once, so empty frames and lists behave like (0, ...) arrays.
        put = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        put("det_boxes", np.asarray(self.det_boxes, np.float64).reshape(-1, 7))
        put("gt_boxes", np.asarray(self.gt_boxes, np.float64).reshape(-1, 7))
        put("det_scores", np.asarray(self.det_scores, np.float64).reshape(-1))
        put("det_classes", np.asarray(self.det_classes, np.int64).reshape(-1))
        put("gt_classes", np.asarray(self.gt_classes, np.int64).reshape(-1))
        put("det_trajectories", np.asarray(self.det_trajectories, np.float64))
        put("gt_future", np.asarray(self.gt_future, np.float64))
        put("gt_future_valid", np.asarray(self.gt_future_valid, bool))
        if self.det_mode_probs is not None:
            put("det_mode_probs", np.asarray(self.det_mode_probs, np.float64))
        n, m = len(self.det_boxes), len(self.gt_boxes)
        if not (len(self.det_scores) == len(self.det_classes) == len(self.det_trajectories) == n):
            raise ValueError(f"frame {self.frame_id!r}: detection boxes, scores, classes, trajectories differ in length")
        if not (len(self.gt_classes) == len(self.gt_future) == len(self.gt_future_valid) == m):
            raise ValueError(f"frame {self.frame_id!r}: ground-truth boxes, classes, futures differ in length")


@dataclass(frozen=True)
class PredictionConfig:
    """Matching and scoring parameters of end-to-end prediction evaluation (defaults: ViP3D's)."""

    match: Literal["center", "iou"] = "center"
    match_threshold: float = 2.0  # metres for "center" (evaluation.epa_match_distance), IoU for "iou"
    score_threshold: float = 0.2  # same pre-filter as detection AP
    fde_threshold: float = 2.0  # EPA: a matched agent is a hit when its minFDE is <= this
    miss_threshold: float = 2.0  # MR: an agent is a miss when its minFDE is > this
    alpha: float = 0.5  # EPA false-positive penalty
    top_k: int | None = 6  # modes scored (None = all)
    frames_without_gt: str = "count"  # contract.EPA_FRAMES_WITHOUT_GT; "skip" is ViP3D's scorer's choice

    def __post_init__(self):
        if self.match not in ("center", "iou"):
            raise ValueError(f"match must be 'center' or 'iou', got {self.match!r}")
        if self.frames_without_gt not in EPA_FRAMES_WITHOUT_GT:
            raise ValueError(f"frames_without_gt must be one of {EPA_FRAMES_WITHOUT_GT}, got {self.frames_without_gt!r}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {self.top_k}")


def min_ade_fde(pred: np.ndarray, gt: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-agent ``(minADE (N,), minFDE (N,))`` of ``pred`` (N, K, F, 2) against ``gt`` (N, F, 2).

    minADE is NaN where the ``valid`` (N, F) row has no True step; minFDE is taken at the final step
    and is NaN where that step is not valid.
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
    ade = (error * valid[:, None]).sum(axis=-1) / np.maximum(n_valid, 1)[:, None]
    min_ade = np.where(n_valid > 0, ade.min(axis=1), np.nan)
    min_fde = np.where(valid[:, -1], error[:, :, -1].min(axis=1), np.nan)
    return min_ade, min_fde


def top_k_modes(trajectories: np.ndarray, mode_probs: np.ndarray | None, k: int | None) -> np.ndarray:
    """The ``k`` most probable modes of ``trajectories`` (N, K, F, D); the first ``k`` without probabilities."""
    trajectories = np.asarray(trajectories, dtype=np.float64)
    if k is None or k >= trajectories.shape[1]:
        return trajectories
    if mode_probs is None:
        return trajectories[:, :k]
    order = np.argsort(-np.asarray(mode_probs), axis=1, kind="stable")[:, :k]
    return np.take_along_axis(trajectories, order[:, :, None, None], axis=1)


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


def hungarian_match(cost: np.ndarray, admissible: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, cols)`` of the assignment with the most admissible pairs and, among those, the least cost.

    ``cost`` must be non-negative. ViP3D replaces inadmissible costs by 10000 before
    ``linear_sum_assignment`` and drops inadmissible pairs afterwards; any constant above the total of
    all admissible costs orders assignments the same way (more admissible pairs first, then lower
    cost), and this one holds for every threshold and scene size.
    """
    if cost.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    penalty = float(cost[admissible].sum()) + 1.0
    rows, cols = linear_sum_assignment(np.where(admissible, cost, penalty))
    keep = admissible[rows, cols]
    return rows[keep], cols[keep]


def _match_cost(det_boxes: np.ndarray, gt_boxes: np.ndarray, config: PredictionConfig) -> tuple[np.ndarray, np.ndarray]:
    if config.match == "iou":
        iou = rotated_iou_bev(det_boxes, gt_boxes)
        return 1.0 - iou, iou >= config.match_threshold
    distance = np.linalg.norm(det_boxes[:, None, :2] - gt_boxes[None, :, :2], axis=-1)
    return distance, distance <= config.match_threshold


def match_detections(frame: PredictionFrame, config: PredictionConfig) -> tuple[np.ndarray, np.ndarray]:
    """``(kept (N,) bool, matched_gt (N,) int, -1 = none)``: Hungarian matching within each class."""
    kept = frame.det_scores > config.score_threshold
    matched = np.full(len(kept), -1, dtype=np.int64)
    for class_id in np.unique(frame.det_classes[kept]):
        det_idx = np.flatnonzero(kept & (frame.det_classes == class_id))
        gt_idx = np.flatnonzero(frame.gt_classes == class_id)
        rows, cols = hungarian_match(*_match_cost(frame.det_boxes[det_idx], frame.gt_boxes[gt_idx], config))
        matched[det_idx[rows]] = gt_idx[cols]
    return kept, matched


@dataclass
class ClassCounts:
    """What one frame contributes to one class's prediction metrics (summed over a split)."""

    min_ade: np.ndarray  # matched GT agents of the class (NaN: no valid step)
    min_fde: np.ndarray  # (NaN: final step not valid)
    num_gt: int  # GT agents of the class valid at the final step
    num_fp: int  # kept detections of the class matched to no GT


def _class_counts(frame: PredictionFrame, kept: np.ndarray, matched: np.ndarray, class_id: int,
                  config: PredictionConfig) -> ClassCounts:
    of_class = kept & (frame.det_classes == class_id)
    det_idx = np.flatnonzero(of_class & (matched >= 0))
    gt_idx = matched[det_idx]
    valid = frame.gt_future_valid
    num_gt = int(np.sum((frame.gt_classes == class_id) & valid[:, -1])) if valid.size else 0
    if len(det_idx):
        probs = None if frame.det_mode_probs is None else frame.det_mode_probs[det_idx]
        modes = top_k_modes(frame.det_trajectories[det_idx], probs, config.top_k)
        min_ade, min_fde = min_ade_fde(modes, frame.gt_future[gt_idx], valid[gt_idx])
    else:
        min_ade = min_fde = np.zeros(0)
    return ClassCounts(min_ade, min_fde, num_gt, int(np.sum(of_class & (matched < 0))))


def end_to_end_prediction_accuracy(num_hits: int, num_fp: int, num_gt: int, alpha: float = 0.5) -> float:
    """Raw EPA = (hits - alpha * false positives) / GT agents; NaN when there is no GT agent."""
    return (num_hits - alpha * num_fp) / num_gt if num_gt else math.nan


def evaluate_prediction(frames: Sequence[PredictionFrame], class_names: Sequence[str],
                        config: PredictionConfig = PredictionConfig()) -> dict:
    """Per-class and class-mean EPA / minADE / minFDE / MR over the split; JSON-ready (undefined -> None).

    Returns ``{"epa", "epa_raw", "min_ade", "min_fde", "mr"`` (class means), ``"per_class": {class:
    {those five, "num_gt", "num_fp", "num_hits", "num_matched", "num_matched_final"}}``, the same
    counts summed over classes, and the config's parameters``}``.
    """
    by_frame = [frame_class_counts(frame, len(class_names), config) for frame in scored_frames(frames, config)]
    per_class = {name: class_summary([counts[class_id] for counts in by_frame], config)
                 for class_id, name in enumerate(class_names)}
    result = {key: _class_mean(per_class, key) for key in PREDICTION_METRICS}
    result["per_class"] = per_class
    for key in ("num_gt", "num_fp", "num_hits", "num_matched", "num_matched_final"):
        result[key] = sum(block[key] for block in per_class.values())
    result.update(match=config.match, match_threshold=config.match_threshold, score_threshold=config.score_threshold,
                  fde_threshold=config.fde_threshold, miss_threshold=config.miss_threshold, alpha=config.alpha,
                  top_k=config.top_k, frames_without_gt=config.frames_without_gt)
    return result


def scored_frames(frames: Sequence[PredictionFrame], config: PredictionConfig) -> list[PredictionFrame]:
    """The frames that take part: all, or (``frames_without_gt="skip"``) those with ground truth."""
    return [frame for frame in frames if config.frames_without_gt != "skip" or len(frame.gt_boxes)]


def frame_class_counts(frame: PredictionFrame, num_classes: int, config: PredictionConfig) -> list[ClassCounts]:
    """One frame's :class:`ClassCounts` for each class index (matching done once for all classes)."""
    kept, matched = match_detections(frame, config)
    return [_class_counts(frame, kept, matched, class_id, config) for class_id in range(num_classes)]


def class_summary(counts: list[ClassCounts], config: PredictionConfig) -> dict:
    """One class's metrics and counts from its frames' :class:`ClassCounts`."""
    min_ade = np.concatenate([c.min_ade for c in counts]) if counts else np.zeros(0)
    min_fde = np.concatenate([c.min_fde for c in counts]) if counts else np.zeros(0)
    num_gt, num_fp = sum(c.num_gt for c in counts), sum(c.num_fp for c in counts)
    num_hits = int(np.sum(min_fde <= config.fde_threshold))  # NaN (final step not valid) is never a hit
    raw = end_to_end_prediction_accuracy(num_hits, num_fp, num_gt, config.alpha)
    summary = {key: value for key, value in _summary(min_ade, min_fde, config.miss_threshold).items()
               if key != "miss_threshold"}
    summary.update(epa=json_number(raw if math.isnan(raw) else max(raw, 0.0)), epa_raw=json_number(raw),
                   num_gt=num_gt, num_fp=num_fp, num_hits=num_hits)
    return summary


def _class_mean(per_class: dict, key: str) -> float | None:
    defined = [block[key] for block in per_class.values() if block[key] is not None]
    return float(np.mean(defined)) if defined else None


def _summary(min_ade: np.ndarray, min_fde: np.ndarray, miss_threshold: float) -> dict:
    has_ade, has_fde = ~np.isnan(min_ade), ~np.isnan(min_fde)
    return {
        "min_ade": json_number(float(np.mean(min_ade[has_ade])) if has_ade.any() else math.nan),
        "min_fde": json_number(float(np.mean(min_fde[has_fde])) if has_fde.any() else math.nan),
        "mr": json_number(miss_rate(min_fde, miss_threshold)),
        "miss_threshold": miss_threshold,
        "num_matched": int(has_ade.sum()),
        "num_matched_final": int(has_fde.sum()),
    }
