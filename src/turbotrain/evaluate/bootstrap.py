"""Test-scene bootstrap of a run's headline metrics, the same resamples for every run.

The test split is a sample of scenes, and frames of one scene are not independent (the same
objects, a few tenths of a second apart), so the unit resampled is the **scenario**
(``<split>/<scenario>`` of a sample id; all egos and timestamps of it go together). Each replicate
draws as many scenarios as the split has, with replacement, and scores the pooled frames exactly as
the full split is scored (AP with the global sort, EPA / minADE / minFDE as ViP3D's scorer).

Every run of a config draws the same replicates (``evaluation.bootstrap.seed`` over the sorted
scenario list), so two runs' draws can be subtracted replicate by replicate: that is the pairing by
test scene that ``report/stats.py`` uses for a difference's scene variance.

Cheap by construction: frames are matched once (per class, IoU 0.5 for AP; Hungarian matching for
prediction) and a replicate only re-pools those matches, so 200 replicates cost well under a second
beside the seconds of inference. AP is not a sum over frames, which is why the pooled
true-positive flags are re-sorted and re-cumulated per replicate rather than averaged.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Sequence

import numpy as np

from turbotrain.evaluate.detection import DetectionFilter, FrameResult, ap_from_tp, match_frame
from turbotrain.evaluate.prediction import (
    ClassCounts, PredictionConfig, PredictionFrame, class_summary, frame_class_counts, scored_frames)

# The metrics resampled, named as metrics-frame columns (claims.py compares these).
BOOTSTRAP_METRICS = ("map@0.5", "epa", "min_ade", "min_fde")
BOOTSTRAP_IOU = 0.5


def scene_of(frame_id: str) -> str:
    """``"test/scenario_3/ego_1/000040" -> "test/scenario_3"`` (sample ids: split/scenario/ego/time)."""
    parts = frame_id.split("/")
    if len(parts) < 2 or not all(parts[:2]):
        raise ValueError(f"sample id {frame_id!r} does not start with <split>/<scenario>")
    return "/".join(parts[:2])


def scene_resamples(num_scenes: int, replicates: int, seed: int) -> np.ndarray:
    """(replicates, num_scenes) scene indices drawn with replacement; the same for the same arguments."""
    return np.random.default_rng(seed).integers(0, num_scenes, size=(replicates, num_scenes))


def _detection_by_scene(frames: Sequence[FrameResult], scenes: list[str], num_classes: int,
                        filters: DetectionFilter) -> dict:
    """scene -> class -> (is_tp, scores, num_gt) pooled over the scene's frames."""
    pooled = {scene: [[[], [], 0] for _ in range(num_classes)] for scene in scenes}
    for frame in frames:
        frame = filters.apply(frame)
        for class_id in range(num_classes):
            of_class = frame.select(frame.det_classes == class_id, frame.gt_classes == class_id)
            is_tp, scores = match_frame(of_class.det_boxes, of_class.det_scores, of_class.gt_boxes, BOOTSTRAP_IOU)
            entry = pooled[scene_of(frame.frame_id)][class_id]
            entry[0].append(is_tp)
            entry[1].append(scores)
            entry[2] += len(of_class.gt_boxes)
    return pooled


def _mean_ap(pooled: dict, draw: Sequence[str], num_classes: int) -> float:
    aps = []
    for class_id in range(num_classes):
        entries = [pooled[scene][class_id] for scene in draw]
        num_gt = sum(e[2] for e in entries)
        if num_gt == 0:
            continue  # as mAP: the mean over classes with ground truth
        is_tp = np.concatenate([t for e in entries for t in e[0]] or [np.zeros(0, bool)])
        scores = np.concatenate([s for e in entries for s in e[1]] or [np.zeros(0)])
        aps.append(ap_from_tp(is_tp[np.argsort(-scores, kind="stable")], num_gt).ap)
    return float(np.mean(aps)) if aps else math.nan


def _prediction_by_scene(frames: Sequence[PredictionFrame], scenes: list[str], num_classes: int,
                         config: PredictionConfig) -> dict[str, list[list[ClassCounts]]]:
    """scene -> class -> that class's ClassCounts of the scene's frames."""
    pooled = {scene: [[] for _ in range(num_classes)] for scene in scenes}
    for frame in scored_frames(frames, config):
        for class_id, counts in enumerate(frame_class_counts(frame, num_classes, config)):
            pooled[scene_of(frame.frame_id)][class_id].append(counts)
    return pooled


def _prediction_means(pooled: dict, draw: Sequence[str], num_classes: int, config: PredictionConfig) -> dict:
    per_class = [class_summary([c for scene in draw for c in pooled[scene][class_id]], config)
                 for class_id in range(num_classes)]
    out = {}
    for key in ("epa", "min_ade", "min_fde"):
        defined = [block[key] for block in per_class if block[key] is not None]
        out[key] = float(np.mean(defined)) if defined else math.nan
    return out


def bootstrap_metrics(det_frames: Sequence[FrameResult], pred_frames: Sequence[PredictionFrame],
                      num_classes: int, filters: DetectionFilter, prediction: PredictionConfig,
                      replicates: int, seed: int) -> dict:
    """``{"unit", "replicates", "seed", "scenes", "draws": {metric: [value | None] * replicates}}``."""
    scenes = sorted({scene_of(f.frame_id) for f in det_frames} | {scene_of(f.frame_id) for f in pred_frames})
    draws: dict[str, list] = defaultdict(list)
    if scenes and replicates:
        detection = _detection_by_scene(det_frames, scenes, num_classes, filters)
        pred = _prediction_by_scene(pred_frames, scenes, num_classes, prediction)
        for indices in scene_resamples(len(scenes), replicates, seed):
            draw = [scenes[i] for i in indices]
            draws["map@0.5"].append(_mean_ap(detection, draw, num_classes))
            for key, value in _prediction_means(pred, draw, num_classes, prediction).items():
                draws[key].append(value)
    return {"unit": "scenario", "replicates": int(replicates), "seed": int(seed), "scenes": scenes,
            "draws": {key: [None if math.isnan(v) else v for v in draws[key]] for key in BOOTSTRAP_METRICS}}
