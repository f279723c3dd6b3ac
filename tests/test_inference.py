"""Late fusion at evaluation time: each agent's view, moved back into the ego frame."""
import numpy as np

from turbotrain.data.sample import AgentFrame, Sample
from turbotrain.geometry import pose_to_matrix
from turbotrain.grid import Grid
from turbotrain.evaluate.inference import classwise_nms, late_fusion, single_agent_view

GRID = Grid((-20, -10, -3, 20, 10, 3), (0.4, 0.4, 0.5), 2)
EVALUATION = {"nms_iou": 0.15, "max_detections": 10, "score_threshold": 0.2}


def frame(agent_id, step, pose):
    return AgentFrame(np.zeros((1, 1, 4), np.float32), np.ones(1, np.int32), np.zeros((1, 3), np.int32), pose,
                      agent_id, 0 if agent_id > 0 else 1, step)


def sample_with_cooperator():
    ego_now, ego_before = np.eye(4), pose_to_matrix([-1, 0, 0, 0, 0, 0])
    coop_now, coop_before = pose_to_matrix([10, 5, 0, 0, 90, 0]), pose_to_matrix([10, 4, 0, 0, 90, 0])
    frames = [frame(1, 0, ego_before), frame(1, 1, ego_now), frame(-1, 0, coop_before), frame(-1, 1, coop_now)]
    empty = np.zeros((0, 7), np.float32)
    return Sample("test/s/1/000010", frames, empty, np.zeros(0, np.int64), np.zeros(0, np.int64),
                  np.zeros((0, 2, 3)), np.zeros((0, 2), bool), np.zeros((0, 3, 3)), np.zeros((0, 3), bool))


def test_single_agent_view_is_the_cooperator_in_its_own_current_frame():
    view, pose = single_agent_view(sample_with_cooperator(), -1)
    assert view.sample_id == "test/s/-1/000010"
    steps = {f.step: f.pose_to_ego for f in view.frames}
    assert np.allclose(steps[1], np.eye(4))
    # one step earlier the cooperator was 1 m behind itself (it faces +y in the ego frame)
    assert np.allclose(steps[0][:3, 3], [-1, 0, 0], atol=1e-9)
    assert np.allclose(pose, pose_to_matrix([10, 5, 0, 0, 90, 0]))


class FakePredictor:
    """Each agent reports one car 2 m ahead of itself and one 30 m ahead (off the ego's map)."""

    def __call__(self, samples):
        boxes = np.array([[2, 0, 0, 4, 2, 1.5, 0], [30, 0, 0, 4, 2, 1.5, 0]], np.float32)
        traj = np.stack([np.stack([np.linspace(3, 5, 3), np.zeros(3)], -1)] * 2)[:, None]  # (2, 1, 3, 2)
        return [{"boxes": boxes, "scores": np.array([0.9, 0.8], np.float32), "classes": np.array([0, 0]),
                 "trajectories": traj.astype(np.float32), "mode_probs": np.ones((2, 1), np.float32)}]


def test_late_fusion_moves_boxes_and_trajectories_to_the_ego_frame_and_drops_far_ones():
    out = late_fusion(FakePredictor(), sample_with_cooperator(), EVALUATION, GRID)
    centres = sorted(map(tuple, np.round(out["boxes"][:, :2], 6)))
    # the ego's own car at (2, 0); the cooperator's at (10, 7), heading +y; both 30 m cars are off the map
    assert centres == [(2.0, 0.0), (10.0, 7.0)]
    coop = out["boxes"][np.argmax(out["boxes"][:, 1])]
    assert np.isclose(coop[6], np.pi / 2)
    coop_traj = out["trajectories"][np.argmax(out["boxes"][:, 1])][0]
    assert np.allclose(coop_traj, [[10, 8], [10, 9], [10, 10]], atol=1e-5)


def test_classwise_nms_keeps_overlapping_boxes_of_different_classes():
    boxes = np.array([[0, 0, 0, 4, 2, 1.5, 0]] * 3, float)
    kept = classwise_nms(boxes, np.array([0.9, 0.8, 0.7]), np.array([0, 0, 1]), 0.15, 10)
    assert sorted(kept.tolist()) == [0, 2]
    assert classwise_nms(boxes, np.array([0.9, 0.8, 0.7]), np.array([0, 1, 2]), 0.15, 2).tolist() == [0, 1]
