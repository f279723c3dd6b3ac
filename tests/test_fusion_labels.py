import numpy as np
import pytest

from turbotrain.data.cache.labels import GT_RANGE_RULES, LabelMaker, boxes_in_range, resolve_gt_range_rule
from turbotrain.data.records import ObjectRecord
from turbotrain.geometry import pose_to_matrix
from turbotrain.grid import Grid
from turbotrain.utils.errors import ConfigError


def test_the_ego_vehicle_annotated_by_a_cooperator_is_not_a_label():
    grid = Grid((-20, -10, -3, 20, 10, 3), (0.4, 0.4, 0.5), 2)
    ego_pose = np.array([100.0, 50.0, 1.9, 0.0, 90.0, 0.0])  # sensor on the roof, heading +y
    ego_box = ObjectRecord(7, "car", np.array([100.0, 50.5, 0.8, 4.5, 1.9, 1.6, np.pi / 2]))
    other = ObjectRecord(8, "car", np.array([100.0, 60.0, 0.8, 4.5, 1.9, 1.6, np.pi / 2]))
    labels = LabelMaker(grid, ["car"]).make(ego_pose, {7: ego_box, 8: other}, [{7: ego_box, 8: other}], [{8: other}])
    assert labels.track_ids.tolist() == [8]
    assert np.allclose(labels.boxes[0, :2], [10.0, 0.0], atol=1e-5)  # 10 m ahead of the ego


# ----------------------------------------------------------------------------- tilt and map height

TILTED_EGO = np.array([100.0, 50.0, 41.9, 3.0, 30.0, -4.0])  # roll 3, pitch -4 degrees, 40 m up


def _moving_objects(step: int) -> dict[int, ObjectRecord]:
    """Three objects near a tilted ego at map height ~40 m; 22 is pitched (a ramp), 23 leaves after step 4."""
    objects = {
        21: ObjectRecord(21, "car", np.array([108.0 + 0.8 * step, 55.0, 40.8, 4.5, 1.9, 1.6, 0.3])),
        22: ObjectRecord(22, "car", np.array([95.0, 45.0 - 0.5 * step, 41.2, 4.5, 1.9, 1.6, -2.0 + 0.05 * step]),
                         pitch=np.radians(4.0)),
    }
    if step <= 4:
        objects[23] = ObjectRecord(23, "car", np.array([104.0, 40.0 + step, 40.9, 4.5, 1.9, 1.6, np.pi / 2]))
    return objects


def test_track_states_are_the_label_box_centres_under_tilt_and_map_height():
    grid = Grid((-20, -20, -10, 20, 20, 10), (0.4, 0.4, 0.5), 2)
    history, future = 3, 4
    steps = [_moving_objects(s) for s in range(history + future)]
    t = history - 1
    maker = LabelMaker(grid, ["car"])
    labels = maker.make(TILTED_EGO, steps[t], steps[: t + 1], steps[t + 1:])
    assert labels.track_ids.tolist() == [21, 22, 23]
    map_to_ego = np.linalg.inv(pose_to_matrix(TILTED_EGO))
    states = np.concatenate([labels.history, labels.future], axis=1)
    valid = np.concatenate([labels.history_valid, labels.future_valid], axis=1)
    assert valid.sum() == 3 * 7 - 2  # 23 is gone at steps 5 and 6
    for s, objects in enumerate(steps):
        at_s = maker.make(TILTED_EGO, objects, [objects], [])  # the label boxes the objects have at step s
        for m, track_id in enumerate(labels.track_ids):
            if track_id not in objects:
                assert not valid[m, s]
                continue
            centre = (map_to_ego @ np.r_[objects[track_id].box[:3], 1.0])[:2]
            assert np.abs(states[m, s, :2] - centre).max() < 1e-6
            box = at_s.boxes[at_s.track_ids.tolist().index(track_id)]
            assert np.abs(states[m, s] - box[[0, 1, 6]]).max() < 1e-6
    assert np.array_equal(labels.history[:, -1], labels.boxes[:, [0, 1, 6]])
    # the term the old ground-plane transform dropped is metres here
    assert np.abs(map_to_ego[:2, 2] * 40.8).max() > 2.0


# ----------------------------------------------------------------------------- ground-truth range rules

EDGE_RANGE = (-10.0, -5.0, -3.0, 10.0, 5.0, 1.0)
EDGE_BOXES = {  # name: (ego-frame box, kept by center_xy, all_corners, min_corners_2)
    "inside": ([3.0, 2.0, -1.0, 4.0, 2.0, 1.0, 0.4], (True, True, True)),
    "corners_on_the_edge": ([9.0, 0.0, -1.0, 2.0, 1.0, 1.0, 0.0], (True, True, True)),  # x = 10 counts
    "front_half_out": ([9.5, 0.0, -1.0, 2.0, 1.0, 1.0, 0.0], (True, False, True)),
    "centre_out_back_half_in": ([10.2, 0.0, -1.0, 2.0, 1.0, 1.0, 0.0], (False, False, True)),
    "top_above_z_max": ([-4.0, 0.0, 0.8, 4.0, 2.0, 1.0, 0.0], (True, False, True)),
    "two_corners_in": ([10.9, 0.0, -1.0, 2.0, 2.0, 1.0, np.pi / 4], (False, False, True)),  # one BEV corner, both z
    "one_corner_in": ([10.9, 0.0, 0.8, 2.0, 2.0, 1.0, np.pi / 4], (False, False, False)),  # ... its top above z_max
    "all_out": ([0.0, 7.0, -1.0, 4.0, 2.0, 1.0, 0.0], (False, False, False)),
}


@pytest.mark.parametrize("rule_index, rule", list(enumerate(GT_RANGE_RULES)))
def test_range_rules_on_boxes_at_the_edges(rule_index, rule):
    boxes = np.array([box for box, _ in EDGE_BOXES.values()])
    expected = [kept[rule_index] for _, kept in EDGE_BOXES.values()]
    assert boxes_in_range(boxes, EDGE_RANGE, rule).tolist() == expected
    # the same through the label maker (the ego at the map origin, level: ego frame = map frame)
    grid = Grid(EDGE_RANGE, (0.5, 0.5, 0.5), 1)
    objects = {i: ObjectRecord(i, "car", np.array(box)) for i, (box, _) in enumerate(EDGE_BOXES.values())}
    labels = LabelMaker(grid, ["car"], gt_range_rule=rule).make(np.zeros(6), objects, [objects], [])
    assert labels.track_ids.tolist() == [i for i, keep in enumerate(expected) if keep]


def test_range_rule_defaults_are_each_datasets_own():
    assert resolve_gt_range_rule("v2xpnp", "download") == "all_corners"
    assert resolve_gt_range_rule("V2X-Real", "local") == resolve_gt_range_rule("v2x_real", "local") == "min_corners_2"
    assert resolve_gt_range_rule("synthetic", "synthetic") == "all_corners"
    assert resolve_gt_range_rule("my_data", "local") == "all_corners"  # OpenCOOD's, the layout's origin
    assert resolve_gt_range_rule("v2xreal", "local", "center_xy") == "center_xy"
    with pytest.raises(ConfigError, match="gt_range_rule"):
        resolve_gt_range_rule("v2xreal", "local", "some_corners")
    with pytest.raises(ConfigError, match="gt_range_rule"):
        LabelMaker(Grid(EDGE_RANGE, (0.5, 0.5, 0.5), 1), ["car"], gt_range_rule="all")
