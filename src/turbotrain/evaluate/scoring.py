"""Score a split's inference results with the config's evaluation settings: detection AP, the
end-to-end prediction metrics, and the test-scene bootstrap of the headline ones."""
from __future__ import annotations

from turbotrain.evaluate.bootstrap import bootstrap_metrics
from turbotrain.evaluate.detection import DetectionFilter, evaluate_detection
from turbotrain.evaluate.prediction import PredictionConfig, evaluate_prediction
from turbotrain.grid import Grid


def detection_filter(config: dict) -> DetectionFilter:
    return DetectionFilter.from_grid(Grid.from_config(config["grid"]), config["evaluation"]["score_threshold"])


def prediction_config(config: dict) -> PredictionConfig:
    ev = config["evaluation"]
    return PredictionConfig(
        match_threshold=ev["epa_match_distance"], score_threshold=ev["score_threshold"],
        fde_threshold=ev["fde_threshold"], miss_threshold=ev["miss_threshold"], alpha=ev["epa_alpha"],
        top_k=ev["prediction_top_k"], frames_without_gt=ev["epa_frames_without_gt"])


def score_split(det_frames, pred_frames, config: dict) -> tuple[dict, dict]:
    ev = config["evaluation"]
    detection = evaluate_detection(
        det_frames, config["classes"], tuple(ev["iou_thresholds"]), tuple(tuple(b) for b in ev["range_bins"]),
        ev["sort"], detection_filter(config))
    return detection, evaluate_prediction(pred_frames, config["classes"], prediction_config(config))


def bootstrap_split(det_frames, pred_frames, config: dict) -> dict:
    """``evaluation.bootstrap`` replicates of the split's headline metrics (evaluate/bootstrap.py)."""
    settings = config["evaluation"]["bootstrap"]
    return bootstrap_metrics(det_frames, pred_frames, len(config["classes"]), detection_filter(config),
                             prediction_config(config), settings["replicates"], settings["seed"])
