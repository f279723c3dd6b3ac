"""Model sizes: one named preset per part, so a config only says ``size: tiny|paper`` and a part name.

``tiny`` keeps tests and CPU smoke runs to seconds; ``paper`` follows the usual OpenCOOD / V2XPnP
choices (BaseBEVBackbone 64/128/256 filters with 3/5/8 blocks, 128-channel upsampling, 8 heads).
Any key given next to the part's ``name`` in the model config overrides the preset value.
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


def part_config(size: str, part: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Preset keyword arguments of ``part`` at ``size``, updated with ``overrides`` (minus ``name``)."""
    if size not in _PRESETS:
        raise KeyError(f"unknown model size '{size}'; expected one of {list(SIZES)}")
    if part not in _PRESETS[size]:
        raise KeyError(f"no preset for model part '{part}'; expected one of {sorted(_PRESETS[size])}")
    cfg = deepcopy(_PRESETS[size][part])
    cfg.update({k: v for k, v in (overrides or {}).items() if k != "name"})
    return cfg
