"""Model sizes: one named preset per part, so a config only says ``size: tiny|paper`` and a part name.

``tiny`` keeps tests and CPU smoke runs to seconds; ``paper`` follows the usual OpenCOOD / V2XPnP
choices (BaseBEVBackbone 64/128/256 filters with 3/5/8 blocks, 128-channel upsampling, 8 heads).
A part whose names take different arguments has a preset per name in ``_NAMED_PRESETS``, which
replaces the part's preset for that name (OpenCOOD's SECOND backbone ``second_bev``, the ``anchor``
head with CooPre's anchors). Any key given next to the part's ``name`` in the model config
overrides the preset value.
"""
from __future__ import annotations

from copy import deepcopy
from typing import Any

SIZES = ("tiny", "paper")

_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "bev_backbone": {
            "layer_nums": [1, 1],
            "layer_strides": [1, 2],
            "num_filters": [16, 32],
            "upsample_strides": [1, 2],
            "num_upsample_filters": [16, 16],
        },
        "fusion": {"heads": 2},
        "temporal": {"heads": 2},
        "detection_head": {"head_channels": 32, "min_radius": 1},
        "prediction_head": {"hidden": 32, "modes": 3},
    },
    "paper": {
        "bev_backbone": {
            "layer_nums": [3, 5, 8],
            "layer_strides": [1, 2, 2],
            "num_filters": [64, 128, 256],
            "upsample_strides": [1, 2, 4],
            "num_upsample_filters": [128, 128, 128],
        },
        "fusion": {"heads": 8},
        "temporal": {"heads": 8},
        "detection_head": {"head_channels": 64, "min_radius": 2},
        "prediction_head": {"hidden": 128, "modes": 6},
    },
}


# CooPre's hypes_yaml/second_coopre.yaml anchors, in the order of config `classes` (car, pedestrian,
# truck = CooPre's vehicle, pedestrian, truck): [l, w, h], the anchor z (CooPre's bottom heights,
# used as the centre as OpenCOOD does), matched / unmatched IoU thresholds; rotations 0 and 1.57.
COOPRE_ANCHORS = {
    "anchor_sizes": [[3.9, 1.6, 1.56], [0.8, 0.6, 1.73], [8.0, 3.0, 3.0]],
    "anchor_z": [-1.78, -0.6, -1.78],
    "rotations": [0.0, 1.57],
    "matched_thresholds": [0.6, 0.5, 0.6],
    "unmatched_thresholds": [0.45, 0.35, 0.45],
}

# OpenCOOD's SECOND configs (hypes_yaml/second_*.yaml base_bev_backbone); the tiny size shrinks widths.
_NAMED_PRESETS: dict[str, dict[tuple[str, str], dict[str, Any]]] = {
    "tiny": {
        ("bev_backbone", "second_bev"): {
            "layer_nums": [1, 1], "layer_strides": [1, 2], "num_filters": [16, 32],
            "upsample_strides": [1, 2], "num_upsample_filters": [16, 16],
        },
        ("detection_head", "anchor"): COOPRE_ANCHORS,
        ("fusion", "attfuse"): {},  # OpenCOOD's AttFusion has no size parameters
        # V2X-ViT shrunk, with V2X-Real's windows 2/4/8 and 1 layer (models/v2xvit.py)
        ("fusion", "v2xvit"): {
            "heads": 2, "dim_head": 16, "window_sizes": [2, 4, 8], "window_heads": [4, 2, 1],
            "window_dim_heads": [8, 16, 32], "layers": 1, "mlp_dim": 64, "dropout": 0.0,
        },
    },
    "paper": {
        ("bev_backbone", "second_bev"): {
            "layer_nums": [5, 5], "layer_strides": [1, 2], "num_filters": [128, 256],
            "upsample_strides": [1, 2], "num_upsample_filters": [256, 256],
        },
        ("detection_head", "anchor"): COOPRE_ANCHORS,
        ("fusion", "attfuse"): {},
        # OpenCOOD's hypes_yaml/point_pillar_v2xvit.yaml transformer (models/v2xvit.py)
        ("fusion", "v2xvit"): {
            "heads": 8, "dim_head": 32, "window_sizes": [4, 8, 16], "window_heads": [16, 8, 4],
            "window_dim_heads": [16, 32, 64], "layers": 3, "mlp_dim": 256, "dropout": 0.3,
        },
    },
}


def part_config(size: str, part: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Preset keyword arguments of ``part`` (named ``overrides["name"]``, if given) at ``size``,
    updated with ``overrides`` (minus ``name``)."""
    if size not in _PRESETS:
        raise KeyError(f"unknown model size '{size}'; expected one of {list(SIZES)}")
    named = _NAMED_PRESETS[size].get((part, (overrides or {}).get("name")))
    if named is None and part not in _PRESETS[size]:
        raise KeyError(f"no preset for model part '{part}'; expected one of {sorted(_PRESETS[size])}")
    cfg = deepcopy(named if named is not None else _PRESETS[size][part])
    cfg.update({k: v for k, v in (overrides or {}).items() if k != "name"})
    return cfg
