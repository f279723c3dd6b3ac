"""minADE / minFDE / MR / EPA on constructed trajectories with hand-computed answers."""
from __future__ import annotations

import math

import numpy as np
import pytest

from turbotrain.evaluate.prediction import (
    PredictionConfig,
    PredictionFrame,
    end_to_end_prediction_accuracy,
    evaluate_gt_queries,
    evaluate_prediction,
    match_detections,
    min_ade_fde,
    miss_rate,
)


def box(x, y=0.0):
    return [x, y, 0.0, 4.0, 2.0, 1.5, 0.0]


def constructed_agents():
    """Three agents, K = 2 modes, F = 3 steps; the third has no valid future."""
    gt = np.array([
        [[1, 0], [2, 0], [3, 0]],
        [[0, 0], [0, 3], [9, 9]],
        [[0, 0], [0, 0], [0, 0]],
    ], dtype=float)
    valid = np.array([[1, 1, 1], [1, 1, 0], [0, 0, 0]], dtype=bool)
    pred = np.array([
        # agent 0: mode 0 off by 1 m everywhere (ADE 1, FDE 1); mode 1 exact then 2 m off (ADE 2/3, FDE 2)
        [[[1, 1], [2, 1], [3, 1]], [[1, 0], [2, 0], [5, 0]]],
        # agent 1, FDE at step 1 (last valid): mode 0 errors 0, 4 (ADE 2, FDE 4); mode 1 errors 5, 0 (ADE 2.5, FDE 0)
        [[[0, 0], [4, 3], [100, 100]], [[3, 4], [0, 3], [0, 0]]],
        [[[0, 0], [0, 0], [0, 0]], [[1, 1], [1, 1], [1, 1]]],
    ], dtype=float)
    return pred, gt, valid


def test_min_ade_fde_minimise_modes_independently_and_use_last_valid_step():
    min_ade, min_fde = min_ade_fde(*constructed_agents())
    np.testing.assert_allclose(min_ade[:2], [2 / 3, 2.0])
    np.testing.assert_allclose(min_fde[:2], [1.0, 0.0])
    assert np.isnan(min_ade[2]) and np.isnan(min_fde[2])


def test_min_ade_fde_ignores_extra_state_columns_and_checks_shapes():
    pred, gt, valid = constructed_agents()
    with_yaw = np.concatenate([gt, np.full(gt.shape[:2] + (1,), 7.0)], axis=-1)
    np.testing.assert_allclose(min_ade_fde(pred, with_yaw, valid)[0][:2], [2 / 3, 2.0])
    with pytest.raises(ValueError, match="shapes"):
        min_ade_fde(pred[:, :, :2], gt, valid)


def test_miss_rate_counts_strictly_above_threshold_and_skips_nan():
    assert miss_rate(np.array([1.0, 2.0, np.nan, 3.0]), threshold=2.0) == pytest.approx(1 / 3)
    assert math.isnan(miss_rate(np.array([np.nan])))


def test_gt_query_evaluation_excludes_agents_without_future():
    result = evaluate_gt_queries(*constructed_agents(), miss_threshold=0.5)
    assert result["num_matched"] == 2
    assert result["min_ade"] == pytest.approx((2 / 3 + 2.0) / 2)
    assert result["min_fde"] == pytest.approx(0.5)
    assert result["mr"] == pytest.approx(0.5)  # agent 0 (1.0 > 0.5) misses, agent 1 (0.0) does not


def end_to_end_frame():
    """GT agents at x = 0, 10, 20 with futures and one at x = 30 without; five detections:

    d0 (0.5, 0)  .9 -> GT 0, best mode ADE .5 / FDE 1 (hit)
    d1 (10, 1.5) .8 -> GT 1 within 2 m, best ADE 1.5 / FDE 3 (miss)
    d2 (50, 0)   .7 -> nothing: false positive
    d3 (30.2, 0) .6 -> GT 3, which has no valid future: neither scored nor a false positive
    d4 (20, 0)   .1 -> below the score threshold: ignored, so GT 2 is unmatched
    """
    gt_future = np.array([[[1, 0], [2, 0]], [[11, 0], [12, 0]], [[21, 0], [22, 0]], [[0, 0], [0, 0]]], dtype=float)
    gt_valid = np.array([[1, 1], [1, 1], [1, 1], [0, 0]], dtype=bool)
    far = [[[99, 99], [99, 99]], [[99, 99], [99, 99]]]
    trajectories = np.array([
        [[[1, 0], [2, 1]], [[5, 5], [5, 5]]],
        [[[11, 0], [12, 3]], [[11, 2], [12, 4]]],
        far, far, far,
    ], dtype=float)
    return PredictionFrame(
        det_boxes=np.array([box(0.5), box(10, 1.5), box(50), box(30.2), box(20)]),
        det_scores=np.array([0.9, 0.8, 0.7, 0.6, 0.1]),
        det_trajectories=trajectories,
        gt_boxes=np.array([box(0), box(10), box(20), box(30)]),
        gt_future=gt_future,
        gt_future_valid=gt_valid,
    )


def test_end_to_end_metrics_with_centre_distance_matching():
    result = evaluate_prediction([end_to_end_frame()], PredictionConfig())
    assert result["min_ade"] == pytest.approx((0.5 + 1.5) / 2)
    assert result["min_fde"] == pytest.approx((1.0 + 3.0) / 2)
    assert result["mr"] == pytest.approx(0.5)
    assert (result["num_gt"], result["num_hits"], result["num_fp"]) == (3, 1, 1)
    assert result["epa"] == pytest.approx((1 - 0.5 * 1) / 3)


def test_epa_alpha_and_iou_matching_are_configurable():
    assert evaluate_prediction([end_to_end_frame()], PredictionConfig(alpha=0.0))["epa"] == pytest.approx(1 / 3)
    # With BEV IoU >= 0.5, d1 (1.5 m sideways, IoU 2/14) no longer matches: it becomes a second FP.
    result = evaluate_prediction([end_to_end_frame()], PredictionConfig(match="iou", match_threshold=0.5))
    assert (result["num_hits"], result["num_fp"]) == (1, 2)
    assert result["epa"] == pytest.approx(0.0)


def test_matching_is_greedy_by_score():
    frame = end_to_end_frame()
    kept, matched = match_detections(frame, PredictionConfig())
    assert kept.tolist() == [True, True, True, True, False]
    assert matched.tolist() == [0, 1, -1, 3, -1]
    # A second, lower-scored detection on GT 0 finds it taken: a false positive.
    doubled = PredictionFrame(
        det_boxes=np.array([box(0.2), box(0.5)]), det_scores=np.array([0.3, 0.9]),
        det_trajectories=np.zeros((2, 1, 2, 2)), gt_boxes=np.array([box(0)]),
        gt_future=np.zeros((1, 2, 2)), gt_future_valid=np.ones((1, 2), bool),
    )
    assert match_detections(doubled, PredictionConfig())[1].tolist() == [-1, 0]


def test_epa_formula_and_empty_split():
    assert end_to_end_prediction_accuracy(num_hits=2, num_fp=2, num_gt=4, alpha=0.5) == pytest.approx(0.25)
    assert math.isnan(end_to_end_prediction_accuracy(0, 3, 0))
    assert evaluate_prediction([])["epa"] is None
    with pytest.raises(ValueError, match="match"):
        PredictionConfig(match="hungarian")
