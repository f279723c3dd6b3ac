"""TurboTrain-Repro: a reproducible pipeline for cooperative (V2X) perception-and-prediction training."""

__version__ = "0.1.0"
