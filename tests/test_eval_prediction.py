"""minADE / minFDE / MR / EPA on hand-made scenes, with the arithmetic of each expected value written out.

Conventions under test are ViP3D's scorer's (tools/prediction_eval.py); see docs/metrics.md.
Boxes are ``box(x) = [x, 0, 0, 4, 2, 1.5, 0]`` unless noted.
"""
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
    hungarian_match,
    match_detections,
    min_ade_fde,
    miss_rate,
    top_k_modes,
)

CAR, PEDESTRIAN = 0, 1
CLASSES = ["car", "pedestrian"]


def box(x, y=0.0):
    return [x, y, 0.0, 4.0, 2.0, 1.5, 0.0]


def scene(det_x, det_traj, gt_x, gt_future, gt_valid=None, scores=None, det_classes=None, gt_classes=None,
          mode_probs=None) -> PredictionFrame:
    """A frame from detection / GT x positions (y = 0); every agent a car unless classes are given."""
    gt_future = np.asarray(gt_future, dtype=float)  # (M, F, 2)
    det_traj = np.asarray(det_traj, dtype=float).reshape(len(det_x), -1, gt_future.shape[1], 2)
    return PredictionFrame(
        det_boxes=np.array([box(x) for x in det_x]).reshape(-1, 7),
        det_scores=np.full(len(det_x), 0.9) if scores is None else np.asarray(scores),
        det_classes=np.zeros(len(det_x), int) if det_classes is None else np.asarray(det_classes),
        det_trajectories=det_traj,
        gt_boxes=np.array([box(x) for x in gt_x]).reshape(-1, 7),
        gt_classes=np.zeros(len(gt_x), int) if gt_classes is None else np.asarray(gt_classes),
        gt_future=gt_future,
        gt_future_valid=np.ones(gt_future.shape[:2], bool) if gt_valid is None else np.asarray(gt_valid, bool),
        det_mode_probs=mode_probs,
    )


# --------------------------------------------------------------------------- per-agent errors


def constructed_agents():
    """Three agents, K = 2 modes, F = 3 steps; the second is not valid at the final step, the third never."""
    gt = np.array([
        [[1, 0], [2, 0], [3, 0]],
        [[0, 0], [0, 3], [9, 9]],
        [[0, 0], [0, 0], [0, 0]],
    ], dtype=float)
    valid = np.array([[1, 1, 1], [1, 1, 0], [0, 0, 0]], dtype=bool)
    pred = np.array([
        # agent 0: mode 0 off by 1 m everywhere (ADE 1, FDE 1); mode 1 exact then 2 m off (ADE 2/3, FDE 2)
        [[[1, 1], [2, 1], [3, 1]], [[1, 0], [2, 0], [5, 0]]],
        # agent 1, steps 0-1 valid: mode 0 errors 0, 4 (ADE 2); mode 1 errors 5, 0 (ADE 2.5); no FDE
        [[[0, 0], [4, 3], [100, 100]], [[3, 4], [0, 3], [0, 0]]],
        [[[0, 0], [0, 0], [0, 0]], [[1, 1], [1, 1], [1, 1]]],
    ], dtype=float)
    return pred, gt, valid


def test_min_ade_over_valid_steps_and_min_fde_at_the_final_step_only():
    min_ade, min_fde = min_ade_fde(*constructed_agents())
    np.testing.assert_allclose(min_ade[:2], [2 / 3, 2.0])  # modes minimised independently: ADE from mode 1,
    assert min_fde[0] == pytest.approx(1.0)  # FDE from mode 0
    assert np.isnan(min_fde[1])  # the final step is not valid (the last *valid* step would give 0.0)
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


def test_gt_query_evaluation_counts_fde_and_mr_only_for_agents_valid_at_the_final_step():
    result = evaluate_gt_queries(*constructed_agents(), miss_threshold=0.5)
    assert (result["num_matched"], result["num_matched_final"]) == (2, 1)
    assert result["min_ade"] == pytest.approx((2 / 3 + 2.0) / 2)
    assert result["min_fde"] == pytest.approx(1.0)  # agent 0 alone
    assert result["mr"] == pytest.approx(1.0)  # 1 of 1: 1.0 > 0.5


def test_top_k_keeps_the_most_probable_modes():
    trajectories = np.arange(3.0)[None, :, None, None] * np.ones((1, 3, 2, 2))  # mode m is all m
    probs = np.array([[0.1, 0.7, 0.2]])
    assert top_k_modes(trajectories, probs, 2)[0, :, 0, 0].tolist() == [1.0, 2.0]
    assert top_k_modes(trajectories, None, 2)[0, :, 0, 0].tolist() == [0.0, 1.0]
    assert top_k_modes(trajectories, probs, 6).shape == trajectories.shape  # K >= modes: all of them
    with pytest.raises(ValueError, match="top_k"):
        PredictionConfig(top_k=0)


# --------------------------------------------------------------------------- the issue's reproductions


def two_cars_close_together(scores=(0.9, 0.8)) -> PredictionFrame:
    """Issue 17, point 1. GT at x = 0 and 3, futures (x, 1), (x, 2); d0 at 1.6 predicts GT 0's future
    exactly, d1 at 4.5 GT 1's. Distances: d0-g0 1.6, d0-g1 1.4, d1-g0 4.5 (> 2 m), d1-g1 1.5."""
    return scene(det_x=[1.6, 4.5], det_traj=[[[0, 1], [0, 2]], [[3, 1], [3, 2]]],
                 gt_x=[0, 3], gt_future=[[[0, 1], [0, 2]], [[3, 1], [3, 2]]], scores=scores)


def test_hungarian_matching_on_current_positions_issue_reproduction_1():
    # Greedy by score let d0 take the nearer g1 (1.4 m), miss it by 3 m and leave d1 unmatched:
    # EPA (0 - 0.5 * 1) / 2 = -0.25. Hungarian: d0-g0 + d1-g1 = 1.6 + 1.5 = 3.1 m, both pairs within
    # 2 m, each trajectory exact: hits 2, FP 0, EPA (2 - 0) / 2 = 1.0.
    assert match_detections(two_cars_close_together(), PredictionConfig())[1].tolist() == [0, 1]
    result = evaluate_prediction([two_cars_close_together()], ["car"])
    assert (result["num_hits"], result["num_fp"], result["num_gt"]) == (2, 0, 2)
    assert result["epa"] == pytest.approx(1.0)
    # Scores play no part in the matching.
    swapped = two_cars_close_together(scores=(0.3, 0.95))
    assert match_detections(swapped, PredictionConfig())[1].tolist() == [0, 1]


def test_matching_distance_is_a_parameter():
    # Within 1.5 m only d0-g1 (1.4) and d1-g1 (1.5) are admissible; one GT, so one pair, the cheaper
    # d0-g1. d0 predicts (0, 2) against g1's (3, 2): FDE 3 m, no hit; d1 is a false positive.
    # EPA_raw = (0 - 0.5 * 1) / 2 = -0.25, reported as max(-0.25, 0) = 0.
    config = PredictionConfig(match_threshold=1.5)
    assert match_detections(two_cars_close_together(), config)[1].tolist() == [1, -1]
    result = evaluate_prediction([two_cars_close_together()], ["car"], config)
    assert (result["epa_raw"], result["epa"], result["min_fde"]) == pytest.approx((-0.25, 0.0, 3.0))


def test_hungarian_match_prefers_more_pairs_over_a_cheaper_single_pair():
    # d0-g0 costs 0.1, but taking it leaves d1 only g1 at 5 m (> 2 m). Two pairs d0-g1 + d1-g0 cost
    # 1.9 + 1.0 = 2.9; with the penalty 0.1 + 1.9 + 1.0 + 1 = 4.0 for the inadmissible cell, the
    # single-pair assignment costs 0.1 + 4.0 = 4.1, so the two pairs win, as with ViP3D's 10000.
    cost = np.array([[0.1, 1.9], [1.0, 5.0]])
    rows, cols = hungarian_match(cost, cost <= 2.0)
    assert list(zip(rows.tolist(), cols.tolist())) == [(0, 1), (1, 0)]
    assert [a.tolist() for a in hungarian_match(np.zeros((0, 3)), np.zeros((0, 3), bool))] == [[], []]


def one_agent(final_error: float, det_x: float = 0.5) -> PredictionFrame:
    """One car at x = 0, future (0, 1), (0, 2); one detection whose mode ends ``final_error`` m to the side."""
    return scene(det_x=[det_x], det_traj=[[[0, 1], [final_error, 2]]], gt_x=[0], gt_future=[[[0, 1], [0, 2]]])


def test_hit_at_exactly_the_threshold_issue_reproduction_2():
    # FDE = |(2, 2) - (0, 2)| = 2.0 exactly: a hit (2.0 <= 2) and not a miss (2.0 > 2 is false), so
    # EPA = (1 - 0) / 1 = 1.0 and MR = 0 / 1 (with `<` for hits it was neither: EPA 0).
    result = evaluate_prediction([one_agent(final_error=2.0)], ["car"])
    assert (result["num_hits"], result["mr"], result["epa"]) == (1, 0.0, 1.0)
    beyond = evaluate_prediction([one_agent(final_error=2.5)], ["car"])
    assert (beyond["num_hits"], beyond["mr"], beyond["epa"]) == (0, 1.0, 0.0)


def test_epa_is_clipped_at_zero_and_the_raw_value_kept_issue_reproduction_3():
    # The car is missed by 3 m (no hit) and a second detection at x = 30 matches nothing:
    # EPA_raw = (0 - 0.5 * 1) / 1 = -0.5; EPA = max(-0.5, 0) = 0.0.
    frame = scene(det_x=[0.5, 30], det_traj=[[[0, 1], [3, 2]], [[30, 1], [30, 2]]],
                  gt_x=[0], gt_future=[[[0, 1], [0, 2]]])
    result = evaluate_prediction([frame], ["car"])
    assert (result["epa_raw"], result["epa"]) == (-0.5, 0.0)
    assert (result["per_class"]["car"]["epa_raw"], result["per_class"]["car"]["epa"]) == (-0.5, 0.0)


# --------------------------------------------------------------------------- final step, classes, split


def test_fde_mr_and_hits_at_the_final_step_with_only_agents_valid_there_counted():
    """F = 3. GT A at 0 (valid throughout), B at 10 (steps 0-1 valid only), C at 20 (valid, undetected).

    a predicts A with errors 0, 1, 1 -> ADE 2/3, FDE 1 (hit); b predicts B with errors 0, 2, (step 2
    not valid) -> ADE 1, no FDE: not a hit, not in the denominator, and not a false positive.
    minADE = (2/3 + 1) / 2 = 5/6 (every valid step); minFDE = 1 and MR = 0 / 1 (A only);
    EPA = (1 hit - 0) / 2 agents valid at the final step (A, C) = 0.5. The last valid step would have
    given B an FDE of 2 and a denominator of 3.
    """
    frame = scene(
        det_x=[0.5, 10.5], det_traj=[[[1, 0], [2, 1], [3, 1]], [[11, 0], [12, 2], [50, 50]]],
        gt_x=[0, 10, 20], gt_future=[[[1, 0], [2, 0], [3, 0]], [[11, 0], [12, 0], [13, 0]], [[21, 0], [22, 0], [23, 0]]],
        gt_valid=[[1, 1, 1], [1, 1, 0], [1, 1, 1]],
    )
    result = evaluate_prediction([frame], ["car"])
    assert result["min_ade"] == pytest.approx(5 / 6)
    assert (result["min_fde"], result["mr"]) == pytest.approx((1.0, 0.0))
    assert (result["num_matched"], result["num_matched_final"]) == (2, 1)
    assert (result["num_gt"], result["num_hits"], result["num_fp"]) == (2, 1, 0)
    assert result["epa"] == pytest.approx(0.5)


def test_per_class_matching_and_class_means():
    """A car at x = 0 and a pedestrian at x = 40 (futures (x, 1), (x, 2)); classes 'car', 'pedestrian', 'truck'.

    Detections: a pedestrian at 0.5 (on the car: other class, so a pedestrian FP), a car at 20 (car FP),
    a pedestrian at 40.5 predicting the pedestrian exactly (hit).
    car:        hits 0, FP 1, GT 1 -> EPA_raw (0 - 0.5) / 1 = -0.5, EPA 0; nothing matched: minADE etc. None.
    pedestrian: hits 1, FP 1, GT 1 -> EPA_raw (1 - 0.5) / 1 = 0.5, EPA 0.5; minADE = minFDE = 0, MR 0.
    truck:      no GT, no detection -> all None, left out of the means.
    Means: EPA (0 + 0.5) / 2 = 0.25; EPA_raw (-0.5 + 0.5) / 2 = 0; minADE 0 (pedestrian only).
    """
    frame = scene(
        det_x=[0.5, 20, 40.5], det_traj=[[[0, 1], [0, 2]], [[20, 1], [20, 2]], [[40, 1], [40, 2]]],
        det_classes=[PEDESTRIAN, CAR, PEDESTRIAN],
        gt_x=[0, 40], gt_future=[[[0, 1], [0, 2]], [[40, 1], [40, 2]]], gt_classes=[CAR, PEDESTRIAN],
    )
    assert match_detections(frame, PredictionConfig())[1].tolist() == [-1, -1, 1]
    result = evaluate_prediction([frame], [*CLASSES, "truck"])
    car, pedestrian, truck = (result["per_class"][name] for name in (*CLASSES, "truck"))
    assert (car["epa_raw"], car["epa"], car["num_fp"]) == (-0.5, 0.0, 1)
    assert car["min_ade"] is None and car["min_fde"] is None and car["mr"] is None
    assert (pedestrian["epa_raw"], pedestrian["epa"], pedestrian["min_ade"], pedestrian["mr"]) == (0.5, 0.5, 0.0, 0.0)
    assert all(truck[key] is None for key in ("epa", "epa_raw", "min_ade", "min_fde", "mr"))
    assert (result["epa"], result["epa_raw"], result["min_ade"]) == pytest.approx((0.25, 0.0, 0.0))
    assert (result["num_gt"], result["num_fp"], result["num_hits"]) == (2, 2, 1)


def test_a_frame_without_ground_truth_still_counts_its_false_positives():
    # Frame 1: one exact hit. Frame 2: no GT, one detection -> FP. EPA = (1 - 0.5 * 1) / 1 = 0.5
    # (ViP3D's scorer skips frame 2 and would report 1.0).
    empty = scene(det_x=[5], det_traj=[[[5, 1], [5, 2]]], gt_x=[], gt_future=np.zeros((0, 2, 2)))
    result = evaluate_prediction([one_agent(final_error=0.0), empty], ["car"])
    assert (result["num_hits"], result["num_fp"], result["num_gt"]) == (1, 1, 1)
    assert result["epa"] == pytest.approx(0.5)
    as_vip3d = evaluate_prediction([one_agent(final_error=0.0), empty], ["car"], PredictionConfig(frames_without_gt="skip"))
    assert (as_vip3d["num_fp"], as_vip3d["epa"]) == (0, 1.0)  # (1 - 0) / 1
    with pytest.raises(ValueError, match="frames_without_gt"):
        PredictionConfig(frames_without_gt="drop")


def test_score_threshold_agents_without_future_and_iou_matching():
    """GT at x = 0, 10 (futures valid) and 30 (no valid step); F = 2, K = 2 modes.

    d0 (0.5)  .9 -> GT 0, best mode ADE .5 / FDE 1 (hit)
    d1 (10, y=1.5) .8 -> GT 1 at 1.5 m, best ADE 1.5 / FDE 3 (miss)
    d2 (50)   .7 -> nothing: false positive
    d3 (30.2) .6 -> GT 2, which has no valid future: neither scored nor a false positive
    d4 (10)   .1 -> below the score threshold: ignored
    minADE (0.5 + 1.5) / 2 = 1, minFDE (1 + 3) / 2 = 2, MR 1/2, EPA (1 - 0.5) / 2 = 0.25.
    """
    far = [[[99, 99], [99, 99]], [[99, 99], [99, 99]]]
    frame = PredictionFrame(
        det_boxes=np.array([box(0.5), box(10, 1.5), box(50), box(30.2), box(10)]),
        det_scores=np.array([0.9, 0.8, 0.7, 0.6, 0.1]), det_classes=np.zeros(5, int),
        det_trajectories=np.array([[[[1, 0], [2, 1]], [[5, 5], [5, 5]]], [[[11, 0], [12, 3]], [[11, 2], [12, 4]]],
                                   far, far, far], dtype=float),
        gt_boxes=np.array([box(0), box(10), box(30)]), gt_classes=np.zeros(3, int),
        gt_future=np.array([[[1, 0], [2, 0]], [[11, 0], [12, 0]], [[0, 0], [0, 0]]], dtype=float),
        gt_future_valid=np.array([[1, 1], [1, 1], [0, 0]], dtype=bool),
    )
    kept, matched = match_detections(frame, PredictionConfig())
    assert (kept.tolist(), matched.tolist()) == ([True, True, True, True, False], [0, 1, -1, 2, -1])
    result = evaluate_prediction([frame], ["car"])
    assert (result["min_ade"], result["min_fde"], result["mr"], result["epa"]) == pytest.approx((1.0, 2.0, 0.5, 0.25))
    assert (result["num_gt"], result["num_hits"], result["num_fp"]) == (2, 1, 1)
    assert evaluate_prediction([frame], ["car"], PredictionConfig(alpha=0.0))["epa"] == pytest.approx(0.5)
    # With BEV IoU >= 0.5, d1 (1.5 m sideways, IoU 2/14) no longer matches: a second FP, EPA (1 - 1) / 2 = 0.
    by_iou = evaluate_prediction([frame], ["car"], PredictionConfig(match="iou", match_threshold=0.5))
    assert (by_iou["num_hits"], by_iou["num_fp"], by_iou["epa_raw"]) == (1, 2, 0.0)


def test_top_k_of_the_config_scores_the_most_probable_modes():
    # Mode 0 is exact, mode 1 (probability .7) ends 3 m off. K = 1 scores mode 1 alone: FDE 3, a miss;
    # K = 2 scores both: FDE 0, a hit.
    frame = scene(det_x=[0.5], det_traj=[[[[0, 1], [0, 2]], [[0, 1], [3, 2]]]], gt_x=[0],
                  gt_future=[[[0, 1], [0, 2]]], mode_probs=np.array([[0.3, 0.7]]))
    assert evaluate_prediction([frame], ["car"], PredictionConfig(top_k=1))["min_fde"] == pytest.approx(3.0)
    assert evaluate_prediction([frame], ["car"], PredictionConfig(top_k=2))["min_fde"] == pytest.approx(0.0)


def test_epa_formula_and_empty_split():
    assert end_to_end_prediction_accuracy(num_hits=2, num_fp=2, num_gt=4, alpha=0.5) == pytest.approx(0.25)
    assert math.isnan(end_to_end_prediction_accuracy(0, 3, 0))
    result = evaluate_prediction([], ["car"])
    assert all(result[key] is None for key in ("epa", "epa_raw", "min_ade", "min_fde", "mr"))
    with pytest.raises(ValueError, match="match"):
        PredictionConfig(match="hungarian")
    with pytest.raises(ValueError, match="differ in length"):
        scene(det_x=[0], det_traj=[[[0, 1], [0, 2]]], gt_x=[0], gt_future=[[[0, 1], [0, 2]]], det_classes=[0, 1])


def test_metrics_file_keeps_per_class_prediction_metrics_as_epa_slash_class(tmp_path):
    from pathlib import Path

    from turbotrain.evaluate.metrics_file import metrics_frame, read_metrics, write_metrics

    fixture = read_metrics(Path(__file__).parent / "fixtures" / "metrics" / "main-turbotrain-s0" / "metrics.json")
    # The per-class scene of test_per_class_matching_and_class_means: car EPA 0 (raw -0.5), pedestrian 0.5.
    frame = scene(
        det_x=[0.5, 20, 40.5], det_traj=[[[0, 1], [0, 2]], [[20, 1], [20, 2]], [[40, 1], [40, 2]]],
        det_classes=[PEDESTRIAN, CAR, PEDESTRIAN],
        gt_x=[0, 40], gt_future=[[[0, 1], [0, 2]], [[40, 1], [40, 2]]], gt_classes=[CAR, PEDESTRIAN],
    )
    path = tmp_path / "metrics.json"
    write_metrics(path, fixture["run"], fixture["detection"], evaluate_prediction([frame], CLASSES), fixture["training"])
    row = metrics_frame([path]).iloc[0]
    assert (row["epa/car"], row["epa_raw/car"], row["epa/pedestrian"], row["epa"]) == pytest.approx((0, -0.5, 0.5, 0.25))
    assert math.isnan(row["min_ade/car"])  # nothing matched: undefined, not 0


def test_scoring_takes_the_matching_distance_and_k_from_the_evaluation_section():
    from pathlib import Path

    from turbotrain.config import load_config
    from turbotrain.evaluate.detection import FrameResult
    from turbotrain.evaluate.scoring import score_split

    config = load_config(Path(__file__).parents[1] / "config" / "config.yaml")
    ev = config["evaluation"]
    assert (ev["epa_alpha"], ev["epa_match_distance"], ev["fde_threshold"], ev["prediction_top_k"]) == (0.5, 2.0, 2.0, 6)
    frame = two_cars_close_together()
    detections = [FrameResult(frame.det_boxes, frame.det_scores, frame.det_classes, frame.gt_boxes, frame.gt_classes)]
    assert score_split(detections, [frame], config)[1]["epa"] == pytest.approx(1.0)  # as in reproduction 1
    ev["epa_match_distance"] = 1.5  # as in test_matching_distance_is_a_parameter: EPA_raw -0.25
    prediction = score_split(detections, [frame], config)[1]
    assert (prediction["epa_raw"], prediction["match_threshold"], prediction["top_k"]) == (-0.25, 1.5, 6)
    assert list(prediction["per_class"]) == config["classes"]
