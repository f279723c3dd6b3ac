"""Evaluation: detection AP (OpenCOOD protocol), motion prediction metrics and EPA, metrics files."""
from turbotrain.evaluate.detection import (
    APResult,
    DetectionFilter,
    FrameResult,
    average_precision,
    evaluate_detection,
    match_frame,
    voc_ap,
)
from turbotrain.evaluate.metrics_file import metrics_frame, read_metrics, write_metrics
from turbotrain.evaluate.prediction import (
    PredictionConfig,
    PredictionFrame,
    end_to_end_prediction_accuracy,
    evaluate_gt_queries,
    evaluate_prediction,
    hungarian_match,
    min_ade_fde,
    miss_rate,
    top_k_modes,
)

__all__ = [
    "APResult", "DetectionFilter", "FrameResult", "average_precision", "evaluate_detection", "match_frame", "voc_ap",
    "metrics_frame", "read_metrics", "write_metrics",
    "PredictionConfig", "PredictionFrame", "end_to_end_prediction_accuracy", "evaluate_gt_queries",
    "evaluate_prediction", "hungarian_match", "min_ade_fde", "miss_rate", "top_k_modes",
]
