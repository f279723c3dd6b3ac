"""``claims``: the source papers' claims, each measured on our runs with a paired interval and a verdict.

One row per claim, fusion and compute budget at which both of its arms were run (at least two seeds
each). An arm is picked by pretraining *type*, recipe, balancer and label fraction; where a grid has
several variants of one type (a mask-ratio sweep, other pretraining data) the variant named like the
type is the arm. Effects are ``treatment - baseline``, paired by seed and, for the metrics the
evaluation bootstraps (``evaluate/bootstrap.py``), by test scene (``report/stats.py``); ``scene_sd`` is
the scene-sampling part of the interval.

Verdicts: *reproduced* when the 95% interval lies on the claimed side of 0, *not reproduced* when it
lies on the other side, *inconclusive* when it contains 0 ("matches or beats" claims included: no
significant difference is consistent with them but does not show them). The time claims compare the
total training time (pretraining included) at which each arm first reaches the baseline's final
validation value on its training curve; a treatment that never reaches it in some seed does not
reproduce the claim.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import pandas as pd

from turbotrain.report.stats import BETTER, WORSE, Difference, paired_difference
from turbotrain.utils.atomic import atomic_open, write_text

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"
MIN_SEEDS = 2  # below two paired seeds there is no interval to judge by


@dataclass(frozen=True)
class Arm:
    pretrain_type: str
    recipe: str
    balancer: str
    label_fraction: float = 1.0

    def label(self) -> str:
        shown = f"{self.pretrain_type}+{self.recipe}-{self.balancer}"
        return shown if self.label_fraction == 1.0 else f"{shown} ({self.label_fraction:g} labels)"


@dataclass(frozen=True)
class Claim:
    key: str
    text: str
    source: str  # paper and where it says so, with its number where it gives one
    metric: str  # a metrics-frame column, or a curve metric (ap50 / epa) for time claims
    treatment: Arm
    baseline: Arm
    higher_is_better: bool = True
    time_to_target: bool = False


SCRATCH_JOINT = Arm("none", "joint", "turbotrain")
MULTISTAGE = Arm("none", "multistage", "fixed")
TURBOTRAIN = Arm("spatiotemporal", "joint", "turbotrain")
CLAIMS = (
    Claim("coopre_map", "CooPre pretraining raises mAP@0.5", "CooPre Tab. I, abstract: +4 mAP (V2X-Real VC, AttFuse 48.5 -> 52.2)",
          "map@0.5", Arm("multi_agent", "joint", "turbotrain"), SCRATCH_JOINT),
    Claim("coopre_half_labels", "CooPre with 50% labels reaches scratch training with 100% (mAP@0.5)",
          "CooPre Fig. 5 (V2X-Real, AttFuse; 20/50/80% labels)", "map@0.5", Arm("multi_agent", "joint", "turbotrain", 0.5),
          SCRATCH_JOINT),
    Claim("turbotrain_ap", "TurboTrain matches or beats the manual multi-stage recipe on AP@0.5",
          "TurboTrain abstract (no number for AP vs multistage)", "map@0.5", TURBOTRAIN, MULTISTAGE),
    Claim("turbotrain_epa", "TurboTrain matches or beats the manual multi-stage recipe on EPA",
          "TurboTrain abstract (\"nearly 9%\" improvement, poster)", "epa", TURBOTRAIN, MULTISTAGE),
    Claim("turbotrain_time_ap", "TurboTrain reaches multistage's final AP@0.5 in less total training time",
          "TurboTrain abstract (\"substantially reducing training time\", no figure)", "ap50", TURBOTRAIN,
          MULTISTAGE, higher_is_better=False, time_to_target=True),
    Claim("turbotrain_time_epa", "TurboTrain reaches multistage's final EPA in less total training time",
          "TurboTrain abstract (no figure)", "epa", TURBOTRAIN, MULTISTAGE, higher_is_better=False,
          time_to_target=True),
    Claim("balancing_ap", "Balanced multi-task learning raises AP@0.5 over a plain loss sum",
          "TurboTrain framework figure: AP@0.5 ~70 -> ~72 (read off a plot)", "map@0.5",
          Arm("none", "joint", "turbotrain"), Arm("none", "joint", "sum")),
    Claim("balancing_epa", "Balanced multi-task learning raises EPA over a plain loss sum",
          "TurboTrain framework figure: EPA ~43 -> ~46 (read off a plot)", "epa",
          Arm("none", "joint", "turbotrain"), Arm("none", "joint", "sum")),
    Claim("trajectory_ade", "Trajectory pretraining (SmartPretrain) lowers minADE", "SmartPretrain Tab. 1 (Argoverse 2)",
          "min_ade", Arm("trajectory", "joint", "turbotrain"), SCRATCH_JOINT, higher_is_better=False),
    Claim("trajectory_fde", "Trajectory pretraining (SmartPretrain) lowers minFDE", "SmartPretrain Tab. 1 (Argoverse 2)",
          "min_fde", Arm("trajectory", "joint", "turbotrain"), SCRATCH_JOINT, higher_is_better=False),
)
COLUMNS = ("claim", "text", "source", "metric", "treatment", "baseline", "fusion", "budget", "n_pairs",
           "treatment_mean", "baseline_mean", "effect", "ci_low", "ci_high", "scene_sd", "verdict", "note")


def _arm_runs(frame: pd.DataFrame, arm: Arm) -> pd.DataFrame:
    runs = frame[(frame["pretrain_type"] == arm.pretrain_type) & (frame["recipe"] == arm.recipe)
                 & (frame["balancer"] == arm.balancer) & np.isclose(frame["label_fraction"], arm.label_fraction)]
    if runs["pretrain"].nunique() > 1:  # several variants of the type: the one named like it, else the first
        names = sorted(runs["pretrain"].unique())
        runs = runs[runs["pretrain"] == (arm.pretrain_type if arm.pretrain_type in names else names[0])]
    return runs


def _by_seed(runs: pd.DataFrame, column: str) -> dict[int, float]:
    return {int(seed): float(value) for seed, value in zip(runs["seed"], runs[column])}


def _draws_by_seed(treatment: pd.DataFrame, baseline: pd.DataFrame, metric: str) -> tuple[dict, dict]:
    """Each arm's scene-bootstrap draws of ``metric`` per seed, when every run of both arms drew the
    same replicates (same scenes, seed and count); else empty (the difference is paired by seed only)."""
    blocks = [*treatment.get("bootstrap", [None]), *baseline.get("bootstrap", [None])]
    if not blocks or any(not isinstance(b, dict) or metric not in b["draws"] for b in blocks):
        return {}, {}
    if len({(tuple(b["scenes"]), b["seed"], b["replicates"]) for b in blocks}) != 1:
        return {}, {}
    draws = lambda runs: {int(s): np.asarray(b["draws"][metric], dtype=float)  # noqa: E731
                          for s, b in zip(runs["seed"], runs["bootstrap"])}
    return draws(treatment), draws(baseline)


def _time_to(curve: list[dict], metric: str, target: float) -> float:
    """Total training time of the first curve point at or above ``target`` (inf if never)."""
    for point in sorted(curve, key=lambda p: p["step"]):
        if point.get(metric) is not None and point[metric] >= target:
            return float(point["wall_s"])
    return math.inf


def _times(treatment: pd.DataFrame, baseline: pd.DataFrame, metric: str) -> tuple[dict, dict, str]:
    """Per seed, each arm's time to the baseline's final curve value; and what could not be timed."""
    base = {int(s): c for s, c in zip(baseline["seed"], baseline["curve"]) if c and c[-1].get(metric) is not None}
    treat = {int(s): c for s, c in zip(treatment["seed"], treatment["curve"]) if c}
    targets = {s: max(c, key=lambda p: p["step"])[metric] for s, c in base.items()}
    seeds = sorted(targets.keys() & treat.keys())
    t_times = {s: _time_to(treat[s], metric, targets[s]) for s in seeds}
    b_times = {s: _time_to(base[s], metric, targets[s]) for s in seeds}
    missed = [s for s in seeds if math.isinf(t_times[s])]
    note = f"treatment never reached the target in seeds {missed}" if missed else ""
    return t_times, b_times, note


def _verdict(claim: Claim, diff: Difference, note: str) -> str:
    if note:  # a time claim whose treatment did not reach the target
        return NOT_REPRODUCED
    outcome = diff.verdict(claim.higher_is_better)
    return REPRODUCED if outcome == BETTER else NOT_REPRODUCED if outcome == WORSE else INCONCLUSIVE


def measure(claim: Claim, treatment: pd.DataFrame, baseline: pd.DataFrame) -> dict | None:
    """One claim row for one fusion and budget; None when either arm has fewer than two seeds."""
    if min(treatment["seed"].nunique(), baseline["seed"].nunique()) < MIN_SEEDS:
        return None
    if claim.time_to_target:
        t_values, b_values, note = _times(treatment, baseline, claim.metric)
        finite = {s for s, v in t_values.items() if math.isfinite(v)}
        diff = paired_difference({s: t_values[s] for s in finite}, b_values)
    elif claim.metric not in treatment.columns or claim.metric not in baseline.columns:
        return None
    else:
        note = ""
        t_draws, b_draws = _draws_by_seed(treatment, baseline, claim.metric)
        diff = paired_difference(_by_seed(treatment, claim.metric), _by_seed(baseline, claim.metric),
                                 treatment_draws=t_draws, baseline_draws=b_draws)
    return {"claim": claim.key, "text": claim.text, "source": claim.source,
            "metric": f"time to {claim.metric} (s)" if claim.time_to_target else claim.metric,
            "treatment": claim.treatment.label(), "baseline": claim.baseline.label(), "n_pairs": diff.n_pairs,
            "treatment_mean": diff.treatment_mean, "baseline_mean": diff.baseline_mean, "effect": diff.effect,
            "ci_low": diff.low, "ci_high": diff.high, "scene_sd": diff.scene_sd, "verdict": _verdict(claim, diff, note), "note": note}


def measure_claims(frame: pd.DataFrame) -> pd.DataFrame:
    """Every claim at every (fusion, budget) where both arms ran (``COLUMNS``)."""
    rows = []
    for claim in CLAIMS:
        treatment, baseline = _arm_runs(frame, claim.treatment), _arm_runs(frame, claim.baseline)
        for (fusion, budget), arm in treatment.groupby(["fusion", "budget"], sort=True):
            base = baseline[(baseline["fusion"] == fusion) & (baseline["budget"] == budget)]
            row = measure(claim, arm, base) if len(base) else None
            if row is not None:
                rows.append({**row, "fusion": fusion, "budget": budget})
    return pd.DataFrame(rows, columns=list(COLUMNS))


def claims_table(frame: pd.DataFrame, csv_path: str | os.PathLike) -> pd.DataFrame:
    """:func:`measure_claims`, written as CSV + Markdown."""
    table = measure_claims(frame)
    with atomic_open(csv_path, "w", newline="") as fh:
        table.to_csv(fh, index=False, float_format="%.6g")
    write_text(os.fspath(csv_path)[: -len(".csv")] + ".md", render_claims(table))
    return table


def render_claims(table: pd.DataFrame) -> str:
    lines = ["| claim | paper | ours: treatment vs baseline | fusion | budget | seeds | effect [95% CI] | verdict |",
             "|---|---|---|---|---|---:|---:|---|"]
    for _, r in table.iterrows():
        effect = "–" if math.isnan(r["effect"]) else f"{r['effect']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]"
        verdict = r["verdict"] + (f" ({r['note']})" if r["note"] else "")
        lines.append(f"| {r['text']} | {r['source']} | {r['treatment']} vs {r['baseline']} ({r['metric']}) | "
                     f"{r['fusion']} | {r['budget']} | {r['n_pairs']} | {effect} | {verdict} |")
    if table.empty:
        lines.append("| (no claim has both arms with two seeds or more in this grid) | | | | | | | |")
    lines += ["", "Effect = treatment - baseline, paired by seed; 95% interval: Student t over the per-seed "
              "differences, widened by the test-scene bootstrap's variance (paired by scene) for mAP@0.5, EPA, "
              "minADE and minFDE (claims.csv: scene_sd). reproduced / not reproduced: the interval lies on the claimed / the other side of 0; "
              "inconclusive: it contains 0. Time effects are seconds of total training (pretraining included)."]
    return "\n".join(lines) + "\n"
