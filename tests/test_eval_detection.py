"""Detection AP on hand-built cases whose answers are computed by hand in the comments."""
from __future__ import annotations

import math

import numpy as np
import pytest

from turbotrain.evaluate.detection import (
    DetectionFilter,
    FrameResult,
    average_precision,
    evaluate_detection,
    greedy_match,
    match_frame,
    voc_ap,
)
from turbotrain.ops.rotated_iou import rotated_iou_bev

CAR, PED = 0, 1


def box(x, y=0.0, l=4.0, w=2.0, yaw=0.0):
    return [x, y, 0.0, l, w, 1.5, yaw]


def frame(dets, scores, gts, det_classes=None, gt_classes=None, frame_id=""):
    return FrameResult(
        det_boxes=np.array(dets, dtype=float).reshape(-1, 7),
        det_scores=np.array(scores, dtype=float),
        det_classes=np.zeros(len(scores), int) if det_classes is None else np.array(det_classes),
        gt_boxes=np.array(gts, dtype=float).reshape(-1, 7),
        gt_classes=np.zeros(len(gts), int) if gt_classes is None else np.array(gt_classes),
        frame_id=frame_id,
    )


FAR = box(90.0, 30.0)  # overlaps nothing in these tests


def test_perfect_detections_give_ap_one():
    gts = [box(10), box(20), box(30, 5)]
    result = average_precision([frame(gts, [0.9, 0.8, 0.7], gts)], iou_threshold=0.7)
    assert result.ap == pytest.approx(1.0)
    assert (result.num_gt, result.num_det, result.num_tp) == (3, 3, 3)


def test_only_false_positives_give_ap_zero():
    result = average_precision([frame([FAR, box(60, -20)], [0.9, 0.8], [box(10), box(20)])], iou_threshold=0.5)
    assert result.ap == 0.0
    assert result.num_tp == 0


def test_known_pr_curve():
    # 4 GT, 5 detections by score: TP FP TP FP TP.
    # recall    .25 .25 .50 .50 .75 ; precision 1 .5 .667 .5 .6
    # envelope at recall steps: .25 -> 1, .50 -> .667, .75 -> .6, sentinel 1.0 -> 0
    # AP = .25 * 1 + .25 * 2/3 + .25 * .6 = 0.5666...
    gts = [box(10), box(20), box(30), box(40)]
    dets = [box(10), FAR, box(20), box(-60, -30), box(30)]
    result = average_precision([frame(dets, [0.9, 0.8, 0.7, 0.6, 0.5], gts)], iou_threshold=0.5)
    assert result.ap == pytest.approx(0.25 + 0.25 * 2 / 3 + 0.25 * 0.6)
    np.testing.assert_allclose(result.recall, [0.25, 0.25, 0.5, 0.5, 0.75])
    np.testing.assert_allclose(result.precision, [1, 0.5, 2 / 3, 0.5, 0.6])


def test_voc_ap_uses_precision_envelope_and_sentinels():
    # Envelope raises precision at recall .5 from .4 to .8; recall never reaches 1 (sentinel adds 0).
    assert voc_ap(np.array([0.5, 0.5, 0.8]), np.array([1.0, 0.4, 0.8])) == pytest.approx(0.5 * 1.0 + 0.3 * 0.8)
    assert voc_ap(np.array([]), np.array([])) == 0.0


def test_rotated_iou_decides_the_match_not_axis_aligned_overlap():
    # Detection 4 x 1 m turned 90 degrees. Ignoring yaw it would coincide with GT1 (IoU 1), but its
    # real footprint overlaps GT1 only 1 m^2 (IoU 1/7) and GT2 (also turned, 0.5 m away) with IoU 3.5/4.5.
    det = np.array([box(0, 0, 4, 1, np.pi / 2)])
    gt1 = box(0, 0, 4, 1, 0.0)
    gt2 = box(0, 0.5, 4, 1, np.pi / 2)
    iou = rotated_iou_bev(det, np.array([gt1, gt2]))
    np.testing.assert_allclose(iou, [[1 / 7, 3.5 / 4.5]])
    assert greedy_match(iou, lambda best: best >= 0.5).tolist() == [1]
    is_tp, _ = match_frame(det, [0.9], np.array([gt1]), iou_threshold=0.5)
    assert is_tp.tolist() == [False]


def test_heading_flipped_by_pi_still_matches():
    # A box and the same box facing backwards have the same BEV footprint.
    is_tp, _ = match_frame(np.array([box(5, yaw=np.pi - 1e-9)]), [0.9], np.array([box(5, yaw=0.0)]), 0.7)
    assert is_tp.tolist() == [True]


def test_greedy_matching_with_removal():
    # GT A at x=0 and GT B at x=0.6 (4 x 2 m boxes). det1 (x=0) takes A. det2 (x=0.25) prefers A
    # (IoU 7.5/8.5) but A is taken, so it matches its next-best B (IoU 7.3/8.7 >= 0.5): TP, where
    # strict VOC would call it FP. det3 finds no remaining GT: FP.
    gts = np.array([box(0.0), box(0.6)])
    dets = np.array([box(0.3), box(0.0), box(0.25)])
    is_tp, scores = match_frame(dets, [0.1, 0.9, 0.5], gts, iou_threshold=0.5)
    assert scores.tolist() == [0.9, 0.5, 0.1]
    assert is_tp.tolist() == [True, True, False]


def test_global_and_local_sort_differ():
    # Frame 1: det .5 TP. Frame 2: det .9 FP and det .4 TP. Two GT in all.
    # local  (frame order): TP FP TP -> P 1, .5, .667 at R .5, .5, 1 -> AP .5*1 + .5*.667 = .8333
    # global (score order): FP TP TP -> P 0, .5, .667 at R 0, .5, 1 -> AP .667
    frames = [
        frame([box(10)], [0.5], [box(10)], frame_id="f1"),
        frame([FAR, box(20)], [0.9, 0.4], [box(20)], frame_id="f2"),
    ]
    assert average_precision(frames, 0.5, sort="local").ap == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert average_precision(frames, 0.5, sort="global").ap == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="sort"):
        average_precision(frames, 0.5, sort="random")


def test_classes_are_matched_separately_and_map_skips_classes_without_gt():
    # The pedestrian detection sits on the car GT: it is a pedestrian FP, not a car TP.
    frames = [frame([box(10), box(20, l=0.8, w=0.8)], [0.9, 0.8], [box(10), box(20)],
                    det_classes=[PED, CAR], gt_classes=[CAR, CAR])]
    result = evaluate_detection(frames, ["car", "pedestrian", "truck"], iou_thresholds=(0.5,), range_bins=())
    assert result["ap"]["0.5"] == {"car": 0.0, "pedestrian": None, "truck": None}
    assert result["map"]["0.5"] == 0.0
    assert result["num_gt"] == {"car": 2, "pedestrian": 0, "truck": 0}


def test_filters_drop_low_scores_and_boxes_not_fully_in_range():
    f = frame([box(10), box(20), box(49)], [0.9, 0.2, 0.9], [box(10), box(49.5), box(-30)])
    kept = DetectionFilter(score_threshold=0.2, eval_range=(-50, -40, 50, 40)).apply(f)
    # score 0.2 is not > 0.2; the box at x=49 reaches x=51, outside; GT at 49.5 likewise.
    assert kept.det_boxes[:, 0].tolist() == [10]
    assert kept.gt_boxes[:, 0].tolist() == [10, -30]


def test_nms_filter_is_optional_and_per_class():
    f = frame([box(10), box(10.2), box(10.1)], [0.9, 0.8, 0.7], [box(10)], det_classes=[CAR, CAR, PED])
    assert len(DetectionFilter().apply(f).det_boxes) == 3
    kept = DetectionFilter(nms_iou=0.15).apply(f)
    assert sorted(kept.det_scores.tolist()) == [0.7, 0.9]


def test_range_bins_assign_each_box_by_its_own_distance():
    # GT at 10, 40, 70 m detected with scores .9, .8, .7; a confident FP (.95) at 45 m.
    # 0-30: AP 1. 30-50: FP then TP -> R 0, 1 P 0, .5 -> AP .5. 50-100: AP 1.
    # overall: FP TP TP TP -> precision envelope .75 everywhere -> AP .75.
    gts = [box(10), box(40), box(70)]
    frames = [frame([box(10), box(40), box(70), box(45, 10)], [0.9, 0.8, 0.7, 0.95], gts)]
    result = evaluate_detection(frames, ["car"], iou_thresholds=(0.5,))
    assert result["ap"]["0.5"]["car"] == pytest.approx(0.75)
    assert result["range"]["0-30m"]["ap"]["0.5"]["car"] == pytest.approx(1.0)
    assert result["range"]["30-50m"]["ap"]["0.5"]["car"] == pytest.approx(0.5)
    assert result["range"]["50-100m"]["map"]["0.5"] == pytest.approx(1.0)


def test_detection_and_gt_on_either_side_of_a_bin_edge_fall_in_different_bins():
    # Detection centre 29.85 m, its object at 30.15 m (IoU 0.86): FP in 0-30 m, missed in 30-50 m.
    frames = [frame([box(29.85)], [0.9], [box(30.15)])]
    result = evaluate_detection(frames, ["car"], iou_thresholds=(0.5,), range_bins=((0, 30), (30, 50)))
    assert result["ap"]["0.5"]["car"] == pytest.approx(1.0)
    assert result["range"]["0-30m"]["ap"]["0.5"]["car"] is None  # no GT in the bin: undefined
    assert result["range"]["30-50m"]["ap"]["0.5"]["car"] == 0.0


def test_empty_split_has_undefined_ap():
    result = average_precision([frame([], [], [])], 0.5)
    assert math.isnan(result.ap)


def test_an_empty_split_has_no_ap_rather_than_an_error():
    from turbotrain.evaluate.detection import evaluate_detection

    result = evaluate_detection([], ["car"], (0.5,), ((0.0, 30.0),))
    assert result["map"]["0.5"] is None and result["ap"]["0.5"]["car"] is None
    assert result["num_gt"] == {"car": 0} and result["range"]["0-30m"]["map"]["0.5"] is None
