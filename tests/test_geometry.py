import numpy as np

from turbotrain.geometry import (box_corners_bev, matrix_to_pose, points_in_boxes, pose_to_matrix,
                                 relative_transform, transform_boxes, transform_points, transform_xy_yaw)
from turbotrain.ops.rotated_iou import rotated_iou_bev, rotated_nms


def test_pose_yaw_rotates_counter_clockwise_and_translates():
    T = pose_to_matrix([10, 5, 2, 0, 90, 0])
    # the sensor's +x axis points along the map's +y axis after a 90 degree yaw
    assert np.allclose(T @ [1, 0, 0, 1], [10, 6, 2, 1])
    assert np.allclose(T @ [0, 1, 0, 1], [9, 5, 2, 1])


def test_pose_round_trip_with_roll_and_pitch():
    pose = np.array([1.0, -2.0, 0.5, 3.0, -120.0, 7.0])
    assert np.allclose(matrix_to_pose(pose_to_matrix(pose)), pose)
    R = pose_to_matrix(pose)[:3, :3]
    assert np.allclose(R @ R.T, np.eye(3)) and np.isclose(np.linalg.det(R), 1.0)


def test_relative_transform_maps_a_world_point_consistently():
    ego, other = [0, 0, 1.9, 0, 30, 0], [20, 10, 5, 0, -60, 0]
    world = np.array([12.0, 3.0, 0.5, 1.0])
    in_other = np.linalg.inv(pose_to_matrix(other)) @ world
    in_ego = np.linalg.inv(pose_to_matrix(ego)) @ world
    assert np.allclose(relative_transform(other, ego) @ in_other, in_ego)


def test_box_and_trajectory_transform_hand_made_case():
    # ego at the origin facing +y: a box 10 m north heading east appears 10 m ahead, heading right (-90 deg)
    T = np.linalg.inv(pose_to_matrix([0, 0, 0, 0, 90, 0]))
    box = np.array([[0, 10, 0.8, 4, 2, 1.6, 0.0]])
    out = transform_boxes(box, T)
    assert np.allclose(out[0, :3], [10, 0, 0.8])
    assert np.isclose(out[0, 6], -np.pi / 2)
    traj = transform_xy_yaw(np.array([[0, 10, 0.0], [1, 10, 0.0]]), T)
    assert np.allclose(traj[:, :2], [[10, 0], [10, -1]])
    pts = transform_points(np.array([[0, 10, 0, 0.7]], np.float32), T)
    assert np.allclose(pts, [[10, 0, 0, 0.7]], atol=1e-6)


def test_corners_and_points_in_boxes():
    box = np.array([[0, 0, 0, 4, 2, 2, np.pi / 2]])
    corners = box_corners_bev(box)[0]
    assert np.allclose(sorted(map(tuple, np.round(corners, 6))), sorted([(-1, 2), (-1, -2), (1, -2), (1, 2)]))
    inside = points_in_boxes(np.array([[0, 1.9, 0], [1.9, 0, 0], [0, 0, 1.1]]), box)
    assert inside[:, 0].tolist() == [True, False, False]


def test_rotated_iou_differs_from_axis_aligned_and_nms():
    a = np.array([[0, 0, 0, 4, 1, 1, 0.0]])
    b = np.array([[0, 0, 0, 4, 1, 1, np.pi / 2]])
    # a cross: intersection 1 m^2, union 7 m^2
    assert np.isclose(rotated_iou_bev(a, b)[0, 0], 1 / 7)
    boxes = np.concatenate([a, a + [0.1, 0, 0, 0, 0, 0, 0], b + [20, 0, 0, 0, 0, 0, 0]])
    assert rotated_nms(boxes, np.array([0.5, 0.9, 0.1]), 0.5).tolist() == [1, 2]
    assert rotated_iou_bev(np.zeros((0, 7)), a).shape == (0, 1)
