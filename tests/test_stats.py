"""Intervals over seeds and paired verdicts, against values worked out by hand."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from turbotrain.report.stats import BETTER, NO_DIFFERENCE, WORSE, mean_interval, paired_difference
from turbotrain.report.tables import build_table


def test_mean_interval_is_students_t():
    # mean 2, sample std 1, n = 3: half-width t(0.975, 2) * 1 / sqrt(3) = 4.3027 / 1.7321 = 2.4841
    mean, low, high = mean_interval([1.0, 2.0, 3.0])
    assert (mean, low, high) == pytest.approx((2.0, 2.0 - 2.4841, 2.0 + 2.4841), abs=1e-4)
    assert math.isnan(mean_interval([5.0])[1]) and mean_interval([5.0])[0] == 5.0
    assert mean_interval([1.0, float("nan"), 3.0])[0] == 2.0  # non-finite values are not seeds


def test_paired_difference_pairs_by_seed_and_skips_missing_values():
    treatment = {0: 0.60, 1: 0.70, 2: 0.65, 3: float("nan")}
    baseline = {0: 0.50, 1: 0.55, 2: 0.50, 4: 0.9}
    diff = paired_difference(treatment, baseline)
    # seeds 0-2: differences 0.10, 0.15, 0.15; mean 0.1333, sd 0.02887, half 4.3027 * 0.02887 / 1.7321 = 0.0717
    assert diff.n_pairs == 3
    assert (diff.effect, diff.low, diff.high) == pytest.approx((0.13333, 0.06162, 0.20505), abs=1e-4)
    assert diff.verdict() == BETTER and diff.verdict(higher_is_better=False) == WORSE


def test_an_interval_across_zero_is_no_significant_difference():
    diff = paired_difference({0: 0.6, 1: 0.4, 2: 0.55}, {0: 0.5, 1: 0.5, 2: 0.5})
    assert diff.low < 0 < diff.high and diff.verdict() == NO_DIFFERENCE
    assert paired_difference({0: 1.0}, {0: 0.0}).verdict() == NO_DIFFERENCE  # one pair: no interval


def test_tables_count_only_finite_values_as_seeds():
    frame = pd.DataFrame({"arm": ["a", "a", "a"], "seed": [0, 1, 2], "epa": [0.3, float("nan"), 0.5],
                          "map@0.5": [0.1, 0.2, 0.3]})
    table = build_table(frame, ["arm"], ["map@0.5", "epa"])
    assert table.loc[0, "epa_n"] == 2 and table.loc[0, "map@0.5_n"] == 3 and table.loc[0, "n_seeds"] == 2
    assert table.loc[0, "epa_mean"] == pytest.approx(0.4)
