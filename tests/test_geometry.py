import numpy as np

from turbotrain.geometry import (box_corners_3d, box_corners_bev, heading_in_frame, matrix_to_pose, points_in_boxes,
                                 pose_to_matrix, relative_transform, transform_boxes, transform_points,
                                 transform_xy_yaw, wrap_angle, yaw_of)
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


# ----------------------------------------------------------------------------- yaw and centres under tilt


def _opencood_style_yaw(object_pose, ego_pose, extent=(2.25, 0.95, 0.8)) -> float:
    """Yaw as OpenCOOD's project_world_objects gets it: the object's 8 corners through the full
    object->ego transform, then the mean direction of the four length edges (corner_to_center)."""
    signs = np.array([[1, -1, -1], [1, 1, -1], [-1, 1, -1], [-1, -1, -1],
                      [1, -1, 1], [1, 1, 1], [-1, 1, 1], [-1, -1, 1]], dtype=np.float64)
    corners = np.c_[signs * extent, np.ones(8)] @ relative_transform(object_pose, ego_pose).T
    edges = [(1, 2), (0, 3), (5, 6), (4, 7)]  # front minus back along the object's +x
    return float(np.mean([np.arctan2(*(corners[a, [1, 0]] - corners[b, [1, 0]])) for a, b in edges]))


def test_yaw_under_a_tilted_ego_is_the_forward_axis_direction_as_opencood_computes_it():
    # Ego pose [0, 0, 0, roll 5, yaw 0, pitch 5]; a flat object at yaw 30 degrees.
    roll, pitch, yaw = np.radians(5.0), np.radians(5.0), np.radians(30.0)
    # By hand: with ego yaw 0 the ego rotation's columns are (cp, 0, sp), (sp sr, cr, -cp sr),
    # (-sp cr, sr, cp cr); the object's forward axis (cos 30, sin 30, 0) in the ego frame has
    # x = cp cos30 and y = sp sr cos30 + cr sin30.
    expected = np.degrees(np.arctan2(np.sin(pitch) * np.sin(roll) * np.cos(yaw) + np.cos(roll) * np.sin(yaw),
                                     np.cos(pitch) * np.cos(yaw)))
    assert abs(expected - 30.327) < 5e-4  # the figure (rounded)
    T = np.linalg.inv(pose_to_matrix([0, 0, 0, 5, 0, 5]))
    ours = np.degrees(transform_boxes(np.array([[10.0, 0, 0, 4.5, 1.9, 1.6, yaw]]), T)[0, 6])
    assert abs(ours - expected) < 1e-6
    assert abs(np.degrees(_opencood_style_yaw([10, 0, 0, 0, 30, 0], [0, 0, 0, 5, 0, 5])) - expected) < 1e-6
    assert abs(np.degrees(yaw + yaw_of(T)) - expected) > 0.1  # what adding the yaws gave (30.437)


def test_object_pitch_enters_the_yaw_only_through_a_tilted_ego():
    ego, obj = [3.0, -4.0, 41.0, 4.0, 110.0, -3.0], [12.0, 6.0, 40.5, 2.0, -35.0, 6.0]
    T = np.linalg.inv(pose_to_matrix(ego))
    box = np.array([[12.0, 6.0, 40.5, 4.5, 1.9, 1.6, np.radians(-35.0)]])
    with_pitch = transform_boxes(box, T, pitch=[np.radians(6.0)])[0, 6]
    assert abs(with_pitch - _opencood_style_yaw(obj, ego)) < 1e-9  # roll (2 degrees) does not matter
    assert abs(with_pitch - transform_boxes(box, T)[0, 6]) > 1e-4
    level = np.linalg.inv(pose_to_matrix([3.0, -4.0, 41.0, 0.0, 110.0, 0.0]))
    assert np.isclose(transform_boxes(box, level, pitch=[np.radians(6.0)])[0, 6], wrap_angle(np.radians(-35.0 - 110.0)))
    assert np.isclose(heading_in_frame(np.radians(-35.0), T, np.radians(6.0)), with_pitch)


def test_centres_move_with_the_full_transform_and_trajectories_take_their_height():
    T = np.linalg.inv(pose_to_matrix([0, 0, 1.9, 0, 0, 3.0]))  # pitch 3 degrees, map at z = 0
    box = np.array([[10.0, 0.0, 40.0, 4.5, 1.9, 1.6, 0.0]])  # an object 40 m up
    centre = transform_boxes(box, T)[0, :3]
    assert np.allclose(centre, (T @ [10.0, 0.0, 40.0, 1.0])[:3])
    state = transform_xy_yaw(np.array([[10.0, 0.0, 0.0]]), T, z=40.0)[0]
    assert np.allclose(state, [centre[0], centre[1], transform_boxes(box, T)[0, 6]])
    assert abs(transform_xy_yaw(np.array([[10.0, 0.0, 0.0]]), T)[0, 0] - centre[0]) > 1.0  # z matters


def test_box_corners_3d_hand_made_case():
    corners = box_corners_3d(np.array([[1.0, 2.0, 3.0, 4.0, 2.0, 1.0, np.pi / 2]]))[0]
    assert corners.shape == (8, 3)
    assert np.allclose(sorted(map(tuple, np.round(corners, 9))), sorted(
        (1.0 + dx, 2.0 + dy, 3.0 + dz) for dx in (-1.0, 1.0) for dy in (-2.0, 2.0) for dz in (-0.5, 0.5)))
    assert np.allclose(corners[:4, 2], 2.5) and np.allclose(corners[4:, 2], 3.5)
