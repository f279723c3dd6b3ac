"""One JSON metrics file per run, its schema, and a flat DataFrame view of many runs.

Schema (``METRICS_SCHEMA``, checked on write and on read)::

    {
      "schema_version": 1,
      "run": {experiment, variant, dataset, fusion, pretrain, balancer: str,
              label_fraction: number in (0, 1], seed: int, mask_ratio: number in [0, 1) or null,
              run_id: str (optional; joins Snakemake benchmark TSVs;
              defaults to the metrics file's path without '.json'),
              recipe, pretrain_type, pretrain_data: str (optional; what the run was fine-tuned with,
              which pretraining objective and on which datasets, '+'-joined),
              gt_range_rule: str (optional; which boxes of the evaluation cache are ground truth,
              its manifest's config.gt_range_rule)},
      "detection": output of evaluate_detection: {sort: "global"|"local", iou_thresholds: [..],
                   ap: {"0.5": {"car": x|null, ..}}, map: {"0.5": x|null}, num_gt: {..},
                   range: {"0-30m": {ap: .., map: ..}, ..}}           (may be {} for no detection)
      "prediction": output of evaluate_prediction: {epa, epa_raw, min_ade, min_fde, mr: x|null (class
                    means), per_class: {"car": {epa, epa_raw, min_ade, min_fde, mr: x|null, ..}, ..}, ..}
                                                                      (may be {} for no prediction)
      "training": {wall_s, epochs, steps, gpu_hours, cpu_hours: number, device: str,
                   samples_seen, unique_samples_seen, trunk_forwards, trunk_backwards and each as
                   pretrain_<key> / total_<key> (optional; train/accounting.py),
                   curve: [{step, wall_s, ap50: x|null, epa: x|null}, ..] (optional)},
      "bootstrap": (optional; evaluate/bootstrap.py) {unit: "scenario", replicates, seed: int,
                   scenes: [str], draws: {"map@0.5" | "epa" | "min_ade" | "min_fde": [x|null] * replicates}}
    }

Metric values are fractions (AP 0.702, not 70.2); distances are metres; times seconds or hours as
named. Undefined metrics (no ground truth of a class, no agent to score) are ``null``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

import jsonschema
import pandas as pd

from turbotrain.budgets import SPENT_COLUMNS
from turbotrain.evaluate.prediction import PREDICTION_METRICS
from turbotrain.utils.atomic import write_json
from turbotrain.utils.errors import DataError

SCHEMA_VERSION = 1
RUN_NAME_KEYS = ("experiment", "variant", "dataset", "fusion", "pretrain", "balancer")
RUN_KEYS = (*RUN_NAME_KEYS, "label_fraction", "seed", "mask_ratio")
OPTIONAL_RUN_KEYS = ("recipe", "pretrain_type", "pretrain_data", "gt_range_rule", "budget")
TRAINING_KEYS = ("wall_s", "device", "epochs", "steps", "gpu_hours", "cpu_hours")

_NUMBER_OR_NULL = {"type": ["number", "null"]}
_NON_NEGATIVE = {"type": "number", "minimum": 0}
_AP_BY_IOU = {
    "type": "object",
    "additionalProperties": {"type": "object", "additionalProperties": _NUMBER_OR_NULL},
}
_MAP_BY_IOU = {"type": "object", "additionalProperties": _NUMBER_OR_NULL}

METRICS_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["schema_version", "run", "detection", "prediction", "training"],
    "properties": {
        "schema_version": {"const": SCHEMA_VERSION},
        "run": {
            "type": "object",
            "required": list(RUN_KEYS),
            "properties": {
                **{key: {"type": "string", "minLength": 1} for key in RUN_NAME_KEYS},
                "label_fraction": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
                "seed": {"type": "integer"},
                "mask_ratio": {"type": ["number", "null"], "minimum": 0, "exclusiveMaximum": 1},
                "run_id": {"type": "string", "minLength": 1},
                **{key: {"type": "string", "minLength": 1} for key in OPTIONAL_RUN_KEYS},
            },
        },
        "detection": {
            "type": "object",
            "properties": {
                "sort": {"enum": ["global", "local"]},
                "iou_thresholds": {"type": "array", "items": {"type": "number"}},
                "ap": _AP_BY_IOU,
                "map": _MAP_BY_IOU,
                "num_gt": {"type": "object", "additionalProperties": {"type": "integer"}},
                "range": {
                    "type": "object",
                    "additionalProperties": {
                        "type": "object",
                        "required": ["ap", "map"],
                        "properties": {"ap": _AP_BY_IOU, "map": _MAP_BY_IOU},
                    },
                },
            },
            "dependentRequired": {"ap": ["sort", "map"]},
        },
        "prediction": {
            "type": "object",
            "properties": {
                **{key: _NUMBER_OR_NULL for key in PREDICTION_METRICS},
                "per_class": {
                    "type": "object",
                    "additionalProperties": {
                        "type": "object",
                        "properties": {key: _NUMBER_OR_NULL for key in PREDICTION_METRICS},
                    },
                },
            },
        },
        "training": {
            "type": "object",
            "required": list(TRAINING_KEYS),
            "properties": {
                **{key: _NON_NEGATIVE for key in ("wall_s", "gpu_hours", "cpu_hours")},
                "epochs": {"type": "number", "minimum": 0},  # fractional when a run stops mid-epoch
                "steps": {"type": "integer", "minimum": 0},
                "device": {"type": "string"},
                **{key: _NON_NEGATIVE for key in SPENT_COLUMNS if key not in ("steps", "wall_s")},
                "curve": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["step", "wall_s"],
                        "properties": {
                            "step": {"type": "integer", "minimum": 0},
                            "wall_s": _NON_NEGATIVE,
                            "ap50": _NUMBER_OR_NULL,
                            "epa": _NUMBER_OR_NULL,
                        },
                    },
                },
            },
        },
    },
}
METRICS_SCHEMA["properties"]["bootstrap"] = {
    "type": "object",
    "required": ["unit", "replicates", "seed", "scenes", "draws"],
    "properties": {
        "unit": {"const": "scenario"},
        "replicates": {"type": "integer", "minimum": 0},
        "seed": {"type": "integer"},
        "scenes": {"type": "array", "items": {"type": "string"}},
        "draws": {"type": "object", "additionalProperties": {"type": "array", "items": _NUMBER_OR_NULL}},
    },
}
_VALIDATOR = jsonschema.Draft202012Validator(METRICS_SCHEMA)


def write_metrics(path: str | os.PathLike, run: dict, detection: dict, prediction: dict, training: dict,
                  bootstrap: dict | None = None) -> None:
    """Validate and atomically write one run's metrics JSON (schema in the module docstring)."""
    document = {
        "schema_version": SCHEMA_VERSION,
        "run": run,
        "detection": detection,
        "prediction": prediction,
        "training": training,
    }
    if bootstrap is not None:
        document["bootstrap"] = bootstrap
    # Round-trip through JSON first so numpy scalars validate as the numbers they will be on disk.
    document = json.loads(json.dumps(document, default=_plain))
    validate_metrics(document, path)
    write_json(path, document)


def validate_metrics(document: dict, path: str | os.PathLike = "<metrics>") -> None:
    """Raise :class:`DataError` naming the file and the first offending field."""
    error = jsonschema.exceptions.best_match(_VALIDATOR.iter_errors(document))
    if error is not None:
        raise DataError(path, *_describe(error))


def _describe(error: jsonschema.ValidationError) -> tuple[str, str, object]:
    """(field path, what was expected, what was found) of a schema violation, for DataError."""
    field = "/".join(str(p) for p in error.absolute_path)
    if error.validator == "required":
        missing = [key for key in error.validator_value if key not in error.instance]
        return "/".join(filter(None, [field, missing[0]])), "a value (required field is missing)", None
    got = error.instance if not isinstance(error.instance, (dict, list)) else type(error.instance).__name__
    return field or "<root>", f"{error.validator} {error.validator_value!r}", got


def read_metrics(path: str | os.PathLike) -> dict:
    """Load and validate a metrics JSON written by :func:`write_metrics`."""
    try:
        document = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise DataError(path, "<file>", "valid JSON", str(exc)) from exc
    validate_metrics(document, path)
    return document


def flatten_metrics(document: dict, run_id: str) -> dict:
    """One flat row: run keys, ``run_id``, ``ap@0.5/car``, ``map@0.5``, ``map@0.5/0-30m``, ``epa``, ``epa/car``..."""
    row = {key: document["run"][key] for key in RUN_KEYS}
    row["run_id"] = document["run"].get("run_id", run_id)
    # optional: metrics of other tools lack them
    row["recipe"] = document["run"].get("recipe", "joint")
    row["budget"] = document["run"].get("budget", "schedule")
    row["pretrain_type"] = document["run"].get("pretrain_type", row["pretrain"])
    row["pretrain_data"] = document["run"].get("pretrain_data", "–" if row["pretrain"] == "none" else row["dataset"])
    row["gt_range_rule"] = document["run"].get("gt_range_rule")
    detection = document["detection"]
    row.update(_flatten_ap(detection, suffix=""))
    for label, block in detection.get("range", {}).items():
        row.update(_flatten_ap(block, suffix=f"/{label}"))
    if "sort" in detection:
        row["ap_sort"] = detection["sort"]
    row.update(_flatten_prediction(document["prediction"]))
    training = document["training"]
    row.update({key: training[key] for key in TRAINING_KEYS})
    # fine-tuning plus the pretraining it started from (optional: older files and other tools lack it)
    row["total_wall_s"] = training.get("total_wall_s", training["wall_s"])
    row.update({key: training[key] for key in SPENT_COLUMNS if key in training})
    row["curve"] = training.get("curve", [])
    row["bootstrap"] = document.get("bootstrap")  # None for files without it (older ones, other tools)
    return row


def metrics_frame(paths: Iterable[str | os.PathLike]) -> pd.DataFrame:
    """One row per metrics file (see :func:`flatten_metrics`); undefined metrics become NaN."""
    rows = [flatten_metrics(read_metrics(p), run_id=str(Path(p).with_suffix(""))) for p in paths]
    frame = pd.DataFrame(rows)
    metric_columns = [c for c in frame.columns
                      if c.startswith(("ap@", "map@")) or c.split("/")[0] in (*PREDICTION_METRICS, "mask_ratio")]
    frame[metric_columns] = frame[metric_columns].astype(float)
    return frame


def _flatten_ap(block: dict, suffix: str) -> dict:
    row = {}
    for iou, per_class in block.get("ap", {}).items():
        row.update({f"ap@{iou}/{name}{suffix}": value for name, value in per_class.items()})
    row.update({f"map@{iou}{suffix}": value for iou, value in block.get("map", {}).items()})
    return row


def _flatten_prediction(prediction: dict) -> dict:
    row = {key: prediction[key] for key in PREDICTION_METRICS if key in prediction}
    for name, block in prediction.get("per_class", {}).items():
        row.update({f"{key}/{name}": block[key] for key in PREDICTION_METRICS if key in block})
    return row


def _plain(obj):
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")
