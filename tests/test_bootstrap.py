"""The test-scene bootstrap: scenes as the unit, the full split's scores as its centre, the same
replicates for every run, and the scene variance it adds to a paired difference."""
from __future__ import annotations

import math

import numpy as np
import pytest

from turbotrain.evaluate.bootstrap import bootstrap_metrics, scene_of, scene_resamples
from turbotrain.evaluate.detection import DetectionFilter, FrameResult, evaluate_detection
from turbotrain.evaluate.prediction import PredictionConfig, PredictionFrame, evaluate_prediction
from turbotrain.report.stats import paired_difference, scene_variance

CLASSES = ["car", "pedestrian"]
FILTER = DetectionFilter(eval_range=None)
CONFIG = PredictionConfig()


def box(x):
    return [x, 0.0, 0.0, 4.0, 2.0, 1.5, 0.0]


def frames(scenario: str, det_x: list[float], gt_x: list[float], offset: float = 0.0):
    """One frame of ``scenario``: car detections at det_x (score 0.9, 0.8, ...) predicting a
    straight future shifted by ``offset`` m, ground-truth cars at gt_x moving +1 m/step in y."""
    future = np.array([[[x, 1.0], [x, 2.0]] for x in gt_x]).reshape(-1, 2, 2)
    traj = np.array([[[x + offset, 1.0], [x + offset, 2.0]] for x in det_x]).reshape(-1, 1, 2, 2)
    scores = 0.9 - 0.1 * np.arange(len(det_x))
    frame_id = f"test/{scenario}/ego_0/000010"
    det = FrameResult(np.array([box(x) for x in det_x]).reshape(-1, 7), scores, np.zeros(len(det_x), int),
                      np.array([box(x) for x in gt_x]).reshape(-1, 7), np.zeros(len(gt_x), int), frame_id)
    pred = PredictionFrame(det.det_boxes, scores, det.det_classes, traj, det.gt_boxes, det.gt_classes, future,
                           np.ones(future.shape[:2], bool), frame_id=frame_id)
    return det, pred


def split(scenes: dict[str, tuple]) -> tuple[list, list]:
    pairs = [frames(name, *args) for name, args in scenes.items()]
    return [d for d, _ in pairs], [p for _, p in pairs]


def test_the_scene_is_split_and_scenario_of_the_sample_id():
    assert scene_of("test/scenario_3/ego_1/000040") == "test/scenario_3"
    with pytest.raises(ValueError, match="<split>/<scenario>"):
        scene_of("000040")


def test_resamples_draw_scenes_with_replacement_and_repeat_for_a_seed():
    draws = scene_resamples(4, 500, seed=0)
    assert draws.shape == (500, 4) and draws.min() == 0 and draws.max() == 3
    assert np.array_equal(draws, scene_resamples(4, 500, seed=0))
    assert not np.array_equal(draws, scene_resamples(4, 500, seed=1))
    assert any(len(set(row)) < 4 for row in draws)  # with replacement


def test_a_split_of_identical_scenes_gives_its_own_scores_in_every_replicate():
    # Each scene: one car detected exactly (TP, minFDE 0) and one missed car; AP = 0.5 in any pool
    # (precision 1 up to recall 0.5), EPA = (1 hit - 0) / 2 GT = 0.5, minADE = minFDE = 0.
    det, pred = split({f"s{i}": ([0.0], [0.0, 20.0]) for i in range(3)})
    result = bootstrap_metrics(det, pred, len(CLASSES), FILTER, CONFIG, replicates=30, seed=0)
    assert result["scenes"] == ["test/s0", "test/s1", "test/s2"] and result["replicates"] == 30
    full = evaluate_detection(det, CLASSES, (0.5,), (), filters=FILTER)["map"]["0.5"]
    assert full == pytest.approx(0.5)
    assert result["draws"]["map@0.5"] == pytest.approx([0.5] * 30)
    assert result["draws"]["epa"] == pytest.approx([0.5] * 30)
    assert result["draws"]["min_fde"] == pytest.approx([0.0] * 30)


def test_a_replicate_that_draws_each_scene_once_scores_like_the_full_split():
    # Scenes differ: s0 one exact hit; s1 a detection 1 m off (a hit at FDE 1) and a false positive at
    # x=30; s2 a car detected 3 m off in its prediction (a miss, FDE 3).
    det, pred = split({"s0": ([0.0], [0.0]), "s1": ([0.0, 30.0], [0.0], 1.0), "s2": ([0.0], [0.0], 3.0)})
    result = bootstrap_metrics(det, pred, len(CLASSES), FILTER, CONFIG, replicates=400, seed=0)
    full_pred = evaluate_prediction(pred, CLASSES, CONFIG)
    full_map = evaluate_detection(det, CLASSES, (0.5,), (), filters=FILTER)["map"]["0.5"]
    # EPA = (2 hits - 0.5 * 1 FP) / 3 GT = 0.5; minFDE = (0 + 1 + 3) / 3
    assert full_pred["epa"] == pytest.approx(0.5) and full_pred["min_fde"] == pytest.approx(4 / 3)
    once = [i for i, row in enumerate(scene_resamples(3, 400, 0)) if sorted(row) == [0, 1, 2]]
    assert once, "400 draws of 3 scenes include a permutation"
    for i in once:
        assert result["draws"]["epa"][i] == pytest.approx(full_pred["epa"])
        assert result["draws"]["min_fde"][i] == pytest.approx(full_pred["min_fde"])
        assert result["draws"]["map@0.5"][i] == pytest.approx(full_map)
    assert np.std(result["draws"]["min_fde"]) > 0.3  # scenes differ, so replicates do


def test_two_runs_on_the_same_scenes_draw_the_same_replicates():
    det_a, pred_a = split({"s0": ([0.0], [0.0]), "s1": ([5.0], [0.0])})
    det_b, pred_b = split({"s0": ([0.0], [0.0], 0.5), "s1": ([0.0], [0.0])})
    a = bootstrap_metrics(det_a, pred_a, 2, FILTER, CONFIG, 50, seed=3)
    b = bootstrap_metrics(det_b, pred_b, 2, FILTER, CONFIG, 50, seed=3)
    assert a["scenes"] == b["scenes"]
    # run b is at least as good as a in every scene, so paired by scene the difference never flips sign
    diff = np.array(b["draws"]["epa"], float) - np.array(a["draws"]["epa"], float)
    assert (diff >= 0).all() and diff.max() > 0


def test_an_undefined_replicate_metric_is_null():
    # s1 has no ground truth: a replicate of only s1 has no AP and no EPA (nothing to score)
    det, pred = split({"s0": ([0.0], [0.0]), "s1": ([], [])})
    result = bootstrap_metrics(det, pred, 2, FILTER, CONFIG, 100, seed=0)
    only_s1 = [i for i, row in enumerate(scene_resamples(2, 100, 0)) if set(row) == {1}]
    assert only_s1 and all(result["draws"]["map@0.5"][i] is None for i in only_s1)
    assert all(result["draws"]["epa"][i] is None for i in only_s1)


def test_the_scene_variance_widens_the_seed_interval():
    treatment, baseline = {0: 0.30, 1: 0.32, 2: 0.34}, {0: 0.20, 1: 0.21, 2: 0.22}
    seed_only = paired_difference(treatment, baseline)
    rng = np.random.default_rng(0)
    shared = rng.normal(0, 0.05, 200)  # a scene effect both arms share cancels in the pairing
    own = rng.normal(0, 0.02, (3, 200))  # the treatment's own scene sensitivity does not
    t_draws = {s: treatment[s] + shared + own[s] for s in range(3)}
    b_draws = {s: baseline[s] + shared for s in range(3)}
    both = paired_difference(treatment, baseline, treatment_draws=t_draws, baseline_draws=b_draws)
    # v_scene = Var_b(mean_s own[s, b]) ~ 0.02^2 / 3
    assert both.scene_sd == pytest.approx(math.sqrt(scene_variance([0, 1, 2], t_draws, b_draws)))
    assert both.scene_sd == pytest.approx(0.02 / math.sqrt(3), rel=0.2)
    assert both.effect == seed_only.effect and math.isnan(seed_only.scene_sd)
    t = 4.302653  # t(0.975, 2)
    seed_var = np.var([0.10, 0.11, 0.12], ddof=1) / 3
    assert both.high - both.effect == pytest.approx(t * math.sqrt(seed_var + both.scene_sd ** 2))
    assert both.high - both.low > seed_only.high - seed_only.low
    # draws missing for one seed: no scene term
    partial = paired_difference(treatment, baseline, treatment_draws={0: t_draws[0]}, baseline_draws=b_draws)
    assert math.isnan(partial.scene_sd) and partial.high == seed_only.high
