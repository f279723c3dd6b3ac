"""Intervals and verdicts for comparisons over seeds.

Seeds are the unit of replication: two arms trained with the same seed share their initial
weights (where pretraining does not provide them) and their data order, so a comparison is
paired by seed, and its interval is Student's t over the per-seed differences (``n - 1`` degrees
of freedom). With 3 seeds that interval is wide on purpose: it is what 3 seeds can tell. Scenes
are not resampled: AP is not a sum over scenes, and the seed-to-seed spread dominates at these
sizes (a paired scene bootstrap would need per-frame detections in the metrics files).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
BETTER, WORSE, NO_DIFFERENCE = "better", "worse", "no significant difference"


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """Mean and its t interval over the finite values; the interval is NaN below 2 values."""
    finite = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if len(finite) == 0:
        return math.nan, math.nan, math.nan
    mean = float(finite.mean())
    if len(finite) < 2:
        return mean, math.nan, math.nan
    half = stats.t.ppf(0.5 + confidence / 2, len(finite) - 1) * finite.std(ddof=1) / math.sqrt(len(finite))
    return mean, mean - half, mean + half


@dataclass(frozen=True)
class Difference:
    """``treatment - baseline`` over the seeds both arms have a finite value for."""

    n_pairs: int
    treatment_mean: float
    baseline_mean: float
    effect: float
    low: float
    high: float

    def verdict(self, higher_is_better: bool = True) -> str:
        """better / worse when the interval excludes 0, else no significant difference."""
        if self.n_pairs < 2 or math.isnan(self.low):
            return NO_DIFFERENCE
        if self.low > 0:
            return BETTER if higher_is_better else WORSE
        if self.high < 0:
            return WORSE if higher_is_better else BETTER
        return NO_DIFFERENCE


def paired_difference(treatment: dict[int, float], baseline: dict[int, float],
                      confidence: float = CONFIDENCE) -> Difference:
    """Paired by seed: ``treatment`` and ``baseline`` map seed -> metric value."""
    seeds = sorted(s for s in treatment.keys() & baseline.keys()
                   if _finite(treatment[s]) and _finite(baseline[s]))
    diffs = [treatment[s] - baseline[s] for s in seeds]
    effect, low, high = mean_interval(diffs, confidence)
    return Difference(len(seeds), _mean([treatment[s] for s in seeds]), _mean([baseline[s] for s in seeds]),
                      effect, low, high)


def _finite(value) -> bool:
    return value is not None and isinstance(value, (int, float, np.floating)) and math.isfinite(value)


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if values else math.nan
