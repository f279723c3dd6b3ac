"""3D detection average precision, OpenCOOD protocol, with the sort order made explicit.

Protocol (see docs/domain.md, "Metrics"):

1. **Filter** (:class:`DetectionFilter`): drop detections with ``score <= 0.2``; drop detections and
   ground truth whose BEV footprint is not fully inside the evaluation range (all four corners);
   optionally rotated NMS (OpenCOOD runs it at IoU 0.15 in the detector's post-processing, so it is
   off here by default and on when a caller evaluates raw head outputs).
2. **Match** each frame on its own (:func:`match_frame`): detections in descending score order; each
   one is a true positive when its BEV rotated IoU with the best *remaining* ground-truth box is
   ``>= iou_threshold``, and that box is then removed. A detection whose best box was already taken
   can therefore still match its next-best box (strict VOC would count it as a false positive).
3. **Cumulate** over the split (:func:`average_precision`): ``sort="global"`` orders all detections
   of the split by score (correct, HEAL/CoAlign); ``sort="local"`` concatenates the per-frame sorted
   lists in frame order (OpenCOOD / V2X-Real / V2V4Real / CooPre, to compare with their numbers).
4. **AP** = VOC-2010 all-point interpolation with sentinels (:func:`voc_ap`).

Classes are evaluated separately (a detection can only match ground truth of its own class); mAP is
the mean over classes that have ground truth in the split. Range bins (0-30, 30-50, 50-100 m) assign
each detection and each ground-truth box to the bin of **its own** BEV centre distance from the ego
(V2X-Real's choice). A consequence worth knowing: a detection at 29.8 m of an object at 30.1 m is a
false positive in the 0-30 m bin and the object is missed in the 30-50 m bin.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal, Sequence

import numpy as np

from turbotrain.geometry import box_corners_bev
from turbotrain.grid import Grid
from turbotrain.ops.rotated_iou import rotated_iou_bev, rotated_nms

SortMode = Literal["global", "local"]
DEFAULT_IOU_THRESHOLDS = (0.3, 0.5, 0.7)
DEFAULT_RANGE_BINS = ((0.0, 30.0), (30.0, 50.0), (50.0, 100.0))


@dataclass(frozen=True)
class FrameResult:
    """Detections and ground truth of one evaluated frame, ego frame, boxes ``[x,y,z,l,w,h,yaw]``."""

    det_boxes: np.ndarray  # (N, 7)
    det_scores: np.ndarray  # (N,)
    det_classes: np.ndarray  # (N,) int class index
    gt_boxes: np.ndarray  # (M, 7)
    gt_classes: np.ndarray  # (M,) int class index
    frame_id: str = ""

    def __post_init__(self):
        # Normalise dtypes and shapes once, so empty frames and lists behave like (0, 7) arrays.
        object.__setattr__(self, "det_boxes", _as_boxes(self.det_boxes))
        object.__setattr__(self, "gt_boxes", _as_boxes(self.gt_boxes))
        object.__setattr__(self, "det_scores", np.asarray(self.det_scores, dtype=np.float64).reshape(-1))
        object.__setattr__(self, "det_classes", np.asarray(self.det_classes, dtype=np.int64).reshape(-1))
        object.__setattr__(self, "gt_classes", np.asarray(self.gt_classes, dtype=np.int64).reshape(-1))
        if not (len(self.det_boxes) == len(self.det_scores) == len(self.det_classes)):
            raise ValueError(f"frame {self.frame_id!r}: detection boxes, scores and classes differ in length")
        if len(self.gt_boxes) != len(self.gt_classes):
            raise ValueError(f"frame {self.frame_id!r}: ground-truth boxes and classes differ in length")

    def select(self, det_keep: np.ndarray, gt_keep: np.ndarray) -> "FrameResult":
        """The same frame keeping only the detections / ground truth selected by masks or indices."""
        return replace(
            self,
            det_boxes=self.det_boxes[det_keep],
            det_scores=self.det_scores[det_keep],
            det_classes=self.det_classes[det_keep],
            gt_boxes=self.gt_boxes[gt_keep],
            gt_classes=self.gt_classes[gt_keep],
        )


@dataclass(frozen=True)
class DetectionFilter:
    """OpenCOOD's pre-matching filters. ``eval_range`` is ``(x_min, y_min, x_max, y_max)`` in metres."""

    score_threshold: float = 0.2
    # Callers should pass their model grid's range (``from_grid``); the default covers the 100 m bin.
    eval_range: tuple[float, float, float, float] | None = (-100.0, -40.0, 100.0, 40.0)
    nms_iou: float | None = None

    @classmethod
    def from_grid(cls, grid: Grid, score_threshold: float = 0.2, nms_iou: float | None = None) -> "DetectionFilter":
        """Filter whose evaluation range is the BEV extent of ``grid``'s point-cloud range."""
        r = grid.point_cloud_range
        return cls(score_threshold, (r[0], r[1], r[3], r[4]), nms_iou)

    def apply(self, frame: FrameResult) -> FrameResult:
        det_keep = frame.det_scores > self.score_threshold
        gt_keep = np.ones(len(frame.gt_boxes), dtype=bool)
        if self.eval_range is not None:
            det_keep &= boxes_inside_range(frame.det_boxes, self.eval_range)
            gt_keep &= boxes_inside_range(frame.gt_boxes, self.eval_range)
        frame = frame.select(det_keep, gt_keep)
        if self.nms_iou is not None:
            frame = frame.select(_per_class_nms(frame, self.nms_iou), np.ones(len(frame.gt_boxes), dtype=bool))
        return frame


@dataclass
class APResult:
    """AP of one class at one IoU threshold with the PR curve it came from."""

    ap: float  # nan when the split has no ground truth of this class
    precision: np.ndarray = field(repr=False)
    recall: np.ndarray = field(repr=False)
    num_gt: int = 0
    num_det: int = 0
    num_tp: int = 0


def _as_boxes(boxes) -> np.ndarray:
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 7)


def boxes_inside_range(boxes: np.ndarray, eval_range: Sequence[float]) -> np.ndarray:
    """(N,) bool: all four BEV corners lie inside ``(x_min, y_min, x_max, y_max)``."""
    corners = box_corners_bev(boxes)
    x_min, y_min, x_max, y_max = eval_range
    inside = (
        (corners[..., 0] >= x_min) & (corners[..., 0] <= x_max)
        & (corners[..., 1] >= y_min) & (corners[..., 1] <= y_max)
    )
    return inside.all(axis=1)


def bev_distance(boxes: np.ndarray) -> np.ndarray:
    """(N,) BEV distance of box centres from the ego origin, metres."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 7)
    return np.hypot(boxes[:, 0], boxes[:, 1])


def greedy_match(similarity: np.ndarray, is_match) -> np.ndarray:
    """Greedy matching with removal: row i (in order) takes its most similar *remaining* column.

    ``similarity`` is (N, M), rows already in priority order (descending score). ``is_match(value)``
    decides whether the best remaining similarity is good enough. Returns (N,) matched column or -1.
    """
    n, m = similarity.shape
    matched = np.full(n, -1, dtype=np.int64)
    remaining = np.ones(m, dtype=bool)
    for i in range(n):
        if not remaining.any():
            break
        candidates = np.where(remaining, similarity[i], -np.inf)
        best = int(np.argmax(candidates))
        if is_match(candidates[best]):
            matched[i] = best
            remaining[best] = False
    return matched


def match_frame(
    det_boxes: np.ndarray, det_scores: np.ndarray, gt_boxes: np.ndarray, iou_threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """OpenCOOD matching of one frame: ``(is_tp (N,) bool in descending score order, sorted scores)``."""
    scores = np.asarray(det_scores, dtype=np.float64).reshape(-1)
    order = np.argsort(-scores, kind="stable")
    iou = rotated_iou_bev(np.asarray(det_boxes).reshape(-1, 7)[order], gt_boxes)
    matched = greedy_match(iou, lambda best_iou: best_iou >= iou_threshold)
    return matched >= 0, scores[order]


def voc_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC-2010 all-point interpolated AP: sentinels (0, 0) and (1, 0), precision envelope, sum of steps."""
    mrec = np.concatenate([[0.0], np.asarray(recall, dtype=np.float64), [1.0]])
    mpre = np.concatenate([[0.0], np.asarray(precision, dtype=np.float64), [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    steps = np.nonzero(mrec[1:] != mrec[:-1])[0] + 1
    return float(np.sum((mrec[steps] - mrec[steps - 1]) * mpre[steps]))


def average_precision(
    frames: Sequence[FrameResult],
    iou_threshold: float,
    sort: SortMode = "global",
    class_id: int | None = None,
) -> APResult:
    """AP over already-filtered ``frames`` for one class (``class_id``) or all boxes (``None``)."""
    if sort not in ("global", "local"):
        raise ValueError(f"sort must be 'global' or 'local', got {sort!r}")
    tp_lists, score_lists, num_gt = [], [], 0
    for frame in frames:
        if class_id is not None:
            frame = frame.select(frame.det_classes == class_id, frame.gt_classes == class_id)
        is_tp, scores = match_frame(frame.det_boxes, frame.det_scores, frame.gt_boxes, iou_threshold)
        tp_lists.append(is_tp)
        score_lists.append(scores)
        num_gt += len(frame.gt_boxes)
    is_tp = np.concatenate(tp_lists) if tp_lists else np.zeros(0, dtype=bool)
    if sort == "global" and score_lists:
        # Stable sort keeps frame order among equal scores, so results do not depend on numpy's sort.
        is_tp = is_tp[np.argsort(-np.concatenate(score_lists), kind="stable")]
    return ap_from_tp(is_tp, num_gt)


def ap_from_tp(is_tp: np.ndarray, num_gt: int) -> APResult:
    """AP of a cumulated list of true/false positives (already in score order) against ``num_gt``."""
    tp = np.cumsum(is_tp)
    fp = np.cumsum(~is_tp)
    if num_gt == 0:
        return APResult(math.nan, np.zeros(0), np.zeros(0), 0, len(is_tp), 0)
    recall = tp / num_gt
    precision = tp / np.maximum(tp + fp, 1)
    return APResult(voc_ap(recall, precision), precision, recall, num_gt, len(is_tp), int(tp[-1]) if len(tp) else 0)


def select_range(frame: FrameResult, low: float, high: float) -> FrameResult:
    """Keep detections and ground truth whose own BEV centre distance lies in ``[low, high)``."""
    det_d, gt_d = bev_distance(frame.det_boxes), bev_distance(frame.gt_boxes)
    return frame.select((det_d >= low) & (det_d < high), (gt_d >= low) & (gt_d < high))


def range_label(low: float, high: float) -> str:
    """``(30, 50) -> '30-50m'``, the key used in result dicts and table columns."""
    return f"{low:g}-{high:g}m"


def iou_key(iou_threshold: float) -> str:
    """``0.5 -> '0.5'``, the key used in result dicts and table columns."""
    return f"{iou_threshold:g}"


def evaluate_detection(
    frames: Sequence[FrameResult],
    class_names: Sequence[str],
    iou_thresholds: Sequence[float] = DEFAULT_IOU_THRESHOLDS,
    range_bins: Sequence[tuple[float, float]] = DEFAULT_RANGE_BINS,
    sort: SortMode = "global",
    filters: DetectionFilter = DetectionFilter(),
) -> dict:
    """Per-class AP, mAP and per-range-bin AP/mAP for the split; JSON-ready (undefined AP -> None).

    Returns ``{"sort", "iou_thresholds", "num_gt": {class: n}, "ap": {iou: {class: ap}},
    "map": {iou: map}, "range": {"0-30m": {"ap": ..., "map": ...}, ...}}``.
    """
    filtered = [filters.apply(frame) for frame in frames]
    result = {
        "sort": sort,
        "iou_thresholds": [float(t) for t in iou_thresholds],
        "num_gt": {name: int(sum(np.sum(f.gt_classes == c) for f in filtered)) for c, name in enumerate(class_names)},
        **_ap_table(filtered, class_names, iou_thresholds, sort),
        "range": {},
    }
    for low, high in range_bins:
        in_bin = [select_range(frame, low, high) for frame in filtered]
        result["range"][range_label(low, high)] = _ap_table(in_bin, class_names, iou_thresholds, sort)
    return result


def _ap_table(frames, class_names, iou_thresholds, sort) -> dict:
    ap, mean_ap = {}, {}
    for threshold in iou_thresholds:
        per_class = {
            name: average_precision(frames, threshold, sort, class_id=c).ap for c, name in enumerate(class_names)
        }
        defined = [v for v in per_class.values() if not math.isnan(v)]
        ap[iou_key(threshold)] = {name: json_number(v) for name, v in per_class.items()}
        mean_ap[iou_key(threshold)] = float(np.mean(defined)) if defined else None
    return {"ap": ap, "map": mean_ap}


def json_number(value: float) -> float | None:
    """``value``, or None for NaN (JSON has no NaN)."""
    # JSON has no NaN; "no ground truth of this class" is written as null.
    return None if math.isnan(value) else float(value)


def _per_class_nms(frame: FrameResult, iou_threshold: float) -> np.ndarray:
    keep = []
    for class_id in np.unique(frame.det_classes):
        idx = np.nonzero(frame.det_classes == class_id)[0]
        keep.append(idx[rotated_nms(frame.det_boxes[idx], frame.det_scores[idx], iou_threshold)])
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)
