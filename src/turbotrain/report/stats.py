"""Intervals and verdicts for comparisons over seeds.

Two sources of noise, both paired:

* **Seeds** (training): two arms trained with the same seed share their initial weights (where
  pretraining does not provide them) and their data order, so a comparison is paired by seed: the
  per-seed differences ``d_s`` have mean ``effect`` and sample variance ``s_d^2``.
* **Test scenes** (evaluation): every seed of every arm is scored on the same few test scenarios, so
  their sampling error is shared by all seeds and ``s_d`` cannot see it. Each metrics file carries
  the same scene-bootstrap replicates (evaluate/bootstrap.py); the difference of the seed-mean,
  recomputed replicate by replicate, has variance ``v_scene`` over replicates.

The interval is ``effect +- t(n - 1) * sqrt(s_d^2 / n + v_scene)`` (the two variances add: seeds and
scenes are drawn independently; ``n - 1`` degrees of freedom is the conservative choice, as the seed
term dominates at our sizes). Without bootstrap draws it is Student's t over the per-seed differences
alone. With 3 seeds the interval is wide on purpose: it is what 3 seeds can tell.
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
    scene_sd: float = math.nan  # sqrt(v_scene); NaN when the runs carry no common scene bootstrap

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
                      confidence: float = CONFIDENCE, treatment_draws: dict[int, np.ndarray] | None = None,
                      baseline_draws: dict[int, np.ndarray] | None = None) -> Difference:
    """Paired by seed (and by test scene where both arms give scene-bootstrap draws per seed):
    ``treatment`` and ``baseline`` map seed -> metric value, the draws seed -> replicate values."""
    seeds = sorted(s for s in treatment.keys() & baseline.keys()
                   if _finite(treatment[s]) and _finite(baseline[s]))
    diffs = [treatment[s] - baseline[s] for s in seeds]
    effect, low, high = mean_interval(diffs, confidence)
    t_mean, b_mean = _mean([treatment[s] for s in seeds]), _mean([baseline[s] for s in seeds])
    scene_var = scene_variance(seeds, treatment_draws or {}, baseline_draws or {})
    if len(seeds) < 2 or math.isnan(scene_var):
        return Difference(len(seeds), t_mean, b_mean, effect, low, high)
    seed_var = float(np.var(diffs, ddof=1)) / len(seeds)
    half = stats.t.ppf(0.5 + confidence / 2, len(seeds) - 1) * math.sqrt(seed_var + scene_var)
    return Difference(len(seeds), t_mean, b_mean, effect, effect - half, effect + half, math.sqrt(scene_var))


def scene_variance(seeds: Sequence[int], treatment_draws: dict[int, np.ndarray],
                   baseline_draws: dict[int, np.ndarray]) -> float:
    """Variance over scene-bootstrap replicates of the seed-mean difference; NaN unless every seed of
    both arms has draws of one length (replicates where a value is undefined are left out)."""
    if not seeds or not all(s in treatment_draws and s in baseline_draws for s in seeds):
        return math.nan
    t = np.asarray([np.asarray(treatment_draws[s], dtype=float) for s in seeds])
    b = np.asarray([np.asarray(baseline_draws[s], dtype=float) for s in seeds])
    if t.ndim != 2 or t.shape != b.shape or t.shape[1] < 2:
        return math.nan
    per_replicate = (t - b).mean(axis=0)
    per_replicate = per_replicate[np.isfinite(per_replicate)]
    return float(np.var(per_replicate, ddof=1)) if len(per_replicate) >= 2 else math.nan


def _finite(value) -> bool:
    return value is not None and isinstance(value, (int, float, np.floating)) and math.isfinite(value)


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if values else math.nan
