"""Score a split's inference results with the config's evaluation settings: detection AP and the
end-to-end prediction metrics."""
from __future__ import annotations

from turbotrain.evaluate.detection import DetectionFilter, evaluate_detection
from turbotrain.evaluate.prediction import PredictionConfig, evaluate_prediction
from turbotrain.grid import Grid


def score_split(det_frames, pred_frames, config: dict) -> tuple[dict, dict]:
    ev = config["evaluation"]
    detection = evaluate_detection(
        det_frames, config["classes"], tuple(ev["iou_thresholds"]), tuple(tuple(b) for b in ev["range_bins"]),
        ev["sort"], DetectionFilter.from_grid(Grid.from_config(config["grid"]), ev["score_threshold"]),
    )
    prediction = evaluate_prediction(pred_frames, config["classes"], PredictionConfig(
        match_threshold=ev["epa_match_distance"], score_threshold=ev["score_threshold"],
        fde_threshold=ev["fde_threshold"], miss_threshold=ev["miss_threshold"], alpha=ev["epa_alpha"],
        top_k=ev["prediction_top_k"], frames_without_gt=ev["epa_frames_without_gt"]))
    return detection, prediction
