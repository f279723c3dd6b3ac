"""Embedded synthetic V2X dataset generator (``turbotrain generate``).

Writes the OpenCOOD / V2XPnP-Seq layout that :mod:`turbotrain.data.opencood` reads: intersections
and corridors with buildings and parked cars as occluders, signalised traffic of cars, trucks and
pedestrians, 1-2 infrastructure LiDARs and 1-3 connected vehicles per scenario.
"""
from turbotrain.data.synth.generate import PRESETS, GenerationConfig, generate_dataset, resolve_config

__all__ = ["PRESETS", "GenerationConfig", "generate_dataset", "resolve_config"]
