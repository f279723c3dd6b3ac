"""The claims table: arms picked from the grid, paired effects, verdicts, time-to-target."""
from __future__ import annotations

import pandas as pd
import pytest

from turbotrain.report.claims import CLAIMS, INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED, claims_table


def run(pretrain, recipe, balancer, seed, map50, fraction=1.0, budget="matched", curve=None, **metrics):
    return {"pretrain": pretrain, "pretrain_type": pretrain, "recipe": recipe, "balancer": balancer,
            "label_fraction": fraction, "seed": seed, "fusion": "attfuse", "budget": budget, "map@0.5": map50,
            "epa": metrics.get("epa", 0.3), "min_ade": metrics.get("min_ade", 1.0),
            "min_fde": metrics.get("min_fde", 2.0), "curve": curve or []}


def curve(*points):
    """(step, wall_s, ap50) points."""
    return [{"step": s, "wall_s": w, "ap50": a, "epa": None} for s, w, a in points]


@pytest.fixture
def frame() -> pd.DataFrame:
    rows = []
    for seed, (scratch, coopre) in enumerate([(0.40, 0.45), (0.42, 0.46), (0.41, 0.47)]):
        rows.append(run("none", "joint", "turbotrain", seed, scratch, min_ade=1.0 + 0.1 * seed))
        rows.append(run("multi_agent", "joint", "turbotrain", seed, coopre))
        rows.append(run("multi_agent", "joint", "turbotrain", seed, scratch - 0.05, fraction=0.5))
        rows.append(run("trajectory", "joint", "turbotrain", seed, 0.4, min_ade=[1.1, 0.9, 1.5][seed]))
        # multistage reaches 0.5 at its end (100 s); TurboTrain at 60 s (seeds 0, 1) and never (seed 2)
        rows.append(run("none", "multistage", "fixed", seed, 0.5, curve=curve((10, 50, 0.3), (20, 100, 0.5))))
        reached = 0.5 if seed < 2 else 0.45
        rows.append(run("spatiotemporal", "joint", "turbotrain", seed, 0.5,
                        curve=curve((5, 30, 0.2), (10, 60, reached), (20, 120, reached))))
    rows.append(run("multi_agent", "joint", "turbotrain", 0, 0.9, budget="schedule"))  # one seed: no row
    return pd.DataFrame(rows)


def verdicts(table) -> dict[str, str]:
    return dict(zip(table["claim"], table["verdict"]))


def test_claims_are_measured_with_paired_intervals(frame, tmp_path):
    table = claims_table(frame, tmp_path / "claims.csv")
    assert set(table["budget"]) == {"matched"}  # the schedule arm has one seed
    coopre = table.set_index("claim").loc["coopre_map"]
    # differences 0.05, 0.04, 0.06: mean 0.05, sd 0.01, half 4.3027 * 0.01 / sqrt(3) = 0.0248
    assert (coopre["effect"], coopre["ci_low"], coopre["ci_high"]) == pytest.approx((0.05, 0.0252, 0.0748), abs=1e-4)
    assert coopre["n_pairs"] == 3
    found = verdicts(table)
    assert found["coopre_map"] == REPRODUCED
    assert found["coopre_half_labels"] == NOT_REPRODUCED  # 0.05 lower in every seed
    assert found["trajectory_ade"] == INCONCLUSIVE  # differences +0.1, -0.2, +0.3
    assert found["turbotrain_ap"] == INCONCLUSIVE  # identical AP: no significant difference
    md = (tmp_path / "claims.md").read_text()
    assert "| CooPre pretraining raises mAP@0.5 |" in md and "+0.050 [+0.025, +0.075]" in md


def test_a_time_claim_fails_where_the_target_is_never_reached(frame, tmp_path):
    table = claims_table(frame, tmp_path / "claims.csv").set_index("claim")
    timed = table.loc["turbotrain_time_ap"]
    assert timed["verdict"] == NOT_REPRODUCED and "seeds [2]" in timed["note"]
    # seeds 0, 1: 60 s vs 100 s
    assert timed["effect"] == pytest.approx(-40.0) and timed["n_pairs"] == 2
    reached = frame[~((frame["pretrain"] == "spatiotemporal") & (frame["seed"] == 2))]
    again = claims_table(reached, tmp_path / "again.csv").set_index("claim")
    # two seeds, both 40 s faster: sd 0, so the interval is a point below 0
    assert again.loc["turbotrain_time_ap", "verdict"] == REPRODUCED


def test_every_claim_names_its_source():
    assert len({c.key for c in CLAIMS}) == len(CLAIMS)
    assert all(c.source and c.text for c in CLAIMS)


def test_the_claims_figure_draws_every_row(frame, tmp_path):
    from turbotrain.report.claims import measure_claims
    from turbotrain.report.figures import claims

    table = measure_claims(frame)
    fig = claims(table, tmp_path / "claims.png")
    assert (tmp_path / "claims.png").stat().st_size > 10_000
    assert sum(len(ax.get_yticks()) for ax in fig.axes) == len(table)


def test_scene_bootstrap_draws_widen_a_claims_interval_when_both_arms_share_them(frame, tmp_path):
    import numpy as np

    scenes = ["test/s0", "test/s1"]
    rng = np.random.default_rng(0)
    noise = {key: rng.normal(0, 0.03, 100) for key in frame.index}

    def block(i, row, scenes=scenes):
        return {"unit": "scenario", "replicates": 100, "seed": 0, "scenes": scenes,
                "draws": {"map@0.5": list(row["map@0.5"] + noise[i])}}

    with_draws = frame.copy()
    with_draws["bootstrap"] = [block(i, row) for i, row in frame.iterrows()]
    plain = claims_table(frame, tmp_path / "plain.csv").set_index("claim").loc["coopre_map"]
    paired = claims_table(with_draws, tmp_path / "paired.csv").set_index("claim").loc["coopre_map"]
    assert np.isnan(plain["scene_sd"]) and paired["scene_sd"] > 0
    assert paired["effect"] == plain["effect"] and paired["ci_high"] - paired["ci_low"] > plain["ci_high"] - plain["ci_low"]
    # draws of other scenes in one run: they cannot be paired, so the claim falls back to seeds only
    with_draws.at[0, "bootstrap"] = block(0, frame.loc[0], scenes=["test/other"])
    mixed = claims_table(with_draws, tmp_path / "mixed.csv").set_index("claim").loc["coopre_map"]
    assert np.isnan(mixed["scene_sd"]) and mixed["ci_low"] == plain["ci_low"]
