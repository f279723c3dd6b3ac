"""Poses, frames and boxes.

Conventions (tested on hand-made cases in tests/test_geometry.py):

* A *pose* is OpenCOOD's ``[x, y, z, roll, yaw, pitch]`` in metres and **degrees**, the sensor (or
  object) frame expressed in the scenario's map frame. ``pose_to_matrix`` is OpenCOOD's ``x_to_world``
  formula, applied literally, so real V2X-Real / V2XPnP-Seq / OPV2V poses mean what they mean there.
  With roll = pitch = 0 it is a rotation by ``yaw`` about +z followed by the translation.
* A *box* is ``[x, y, z, l, w, h, yaw]`` with full sizes (the YAML ``extent`` holds half sizes) and
  yaw in **radians**, counter-clockwise about +z from +x, wrapped to [-pi, pi).
* Moving a box to another frame moves its centre with the full transform and takes as its new yaw the
  ground-plane direction of the object's forward axis (its +x, tilted by the object's pitch) after the
  full rotation (:func:`heading_in_frame`), which is how OpenCOOD, V2X-Real and V2XPnP get a box's yaw
  (``corner_to_center``'s ``arctan2`` of the length edges of the 8 projected corners). Under a tilted
  ego that is not the object's yaw plus the transform's yaw.
* ``T_a_to_b`` maps homogeneous points of frame a into frame b: ``p_b = T_a_to_b @ p_a``.
"""
from __future__ import annotations

import numpy as np


def pose_to_matrix(pose: np.ndarray | list[float]) -> np.ndarray:
    """4x4 float64 sensor->map transform from an OpenCOOD pose ``[x, y, z, roll, yaw, pitch]`` (deg)."""
    x, y, z, roll, yaw, pitch = (float(v) for v in pose)
    c_y, s_y = np.cos(np.radians(yaw)), np.sin(np.radians(yaw))
    c_r, s_r = np.cos(np.radians(roll)), np.sin(np.radians(roll))
    c_p, s_p = np.cos(np.radians(pitch)), np.sin(np.radians(pitch))
    m = np.eye(4)
    m[:3, 3] = (x, y, z)
    m[0, 0] = c_p * c_y
    m[0, 1] = c_y * s_p * s_r - s_y * c_r
    m[0, 2] = -c_y * s_p * c_r - s_y * s_r
    m[1, 0] = s_y * c_p
    m[1, 1] = s_y * s_p * s_r + c_y * c_r
    m[1, 2] = -s_y * s_p * c_r + c_y * s_r
    m[2, 0] = s_p
    m[2, 1] = -c_p * s_r
    m[2, 2] = c_p * c_r
    return m


def matrix_to_pose(m: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pose_to_matrix` (pitch in (-90, 90) degrees)."""
    pitch = np.degrees(np.arcsin(np.clip(m[2, 0], -1.0, 1.0)))
    yaw = np.degrees(np.arctan2(m[1, 0], m[0, 0]))
    roll = np.degrees(np.arctan2(-m[2, 1], m[2, 2]))
    return np.array([m[0, 3], m[1, 3], m[2, 3], roll, yaw, pitch])


def relative_transform(source_pose, target_pose) -> np.ndarray:
    """``T_source_to_target`` between two map-frame poses (OpenCOOD's ``x1_to_x2``)."""
    return np.linalg.inv(pose_to_matrix(target_pose)) @ pose_to_matrix(source_pose)


def transform_points(points: np.ndarray, T: np.ndarray) -> np.ndarray:
    """Apply ``T`` to the xyz columns of ``points`` (N, >=3); other columns are kept."""
    out = np.array(points, dtype=points.dtype, copy=True)
    xyz = points[:, :3].astype(np.float64)
    out[:, :3] = (xyz @ T[:3, :3].T + T[:3, 3]).astype(points.dtype)
    return out


def yaw_of(T: np.ndarray) -> float:
    """Heading change (radians, about +z) that ``T`` applies."""
    return float(np.arctan2(T[1, 0], T[0, 0]))


def wrap_angle(a):
    """Wrap radians to [-pi, pi)."""
    return (np.asarray(a) + np.pi) % (2 * np.pi) - np.pi


def heading_in_frame(yaw, T: np.ndarray, pitch=0.0) -> np.ndarray:
    """Yaw (radians) in frame b of objects with ``yaw`` and ``pitch`` (radians) in frame a, ``T = T_a_to_b``.

    The forward axis ``(cos p cos y, cos p sin y, sin p)`` (the first column of :func:`pose_to_matrix`'s
    rotation, which roll does not move) is rotated by ``T`` and its ground-plane direction taken.
    """
    yaw = np.asarray(yaw, dtype=np.float64)
    pitch = np.broadcast_to(np.asarray(pitch, dtype=np.float64), yaw.shape)
    cos_p = np.cos(pitch)
    forward = np.stack([cos_p * np.cos(yaw), cos_p * np.sin(yaw), np.sin(pitch)], axis=-1)
    moved = forward @ T[:3, :3].T
    return wrap_angle(np.arctan2(moved[..., 1], moved[..., 0]))


def is_level(T: np.ndarray) -> bool:
    """``T`` rotates about +z only (no roll or pitch between the two frames)."""
    return bool(T[2, 0] == 0.0 and T[2, 1] == 0.0)


def transform_boxes(boxes: np.ndarray, T: np.ndarray, pitch=None) -> np.ndarray:
    """Move boxes ``[x, y, z, l, w, h, yaw]`` by ``T``: centres by the full transform, sizes unchanged, yaw
    by :func:`heading_in_frame` (``pitch``: the objects' pitch in radians, default level)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 7)
    out = boxes.copy()
    out[:, :3] = boxes[:, :3] @ T[:3, :3].T + T[:3, 3]
    if is_level(T) and not np.any(pitch):
        # Same angle as heading_in_frame; the plain sum keeps level data bit-for-bit what it always was.
        out[:, 6] = wrap_angle(boxes[:, 6] + yaw_of(T))
    else:
        out[:, 6] = heading_in_frame(boxes[:, 6], T, 0.0 if pitch is None else pitch)
    return out


def transform_xy_yaw(traj: np.ndarray, T: np.ndarray, z=0.0) -> np.ndarray:
    """Move trajectory states ``[..., (x, y, yaw)]`` of level objects at height ``z`` (frame a) by ``T``.

    ``z`` matters as soon as ``T`` tilts (``T[:2, 2] * z``); label tracks go through
    :func:`transform_boxes` instead, with their boxes' full centres.
    """
    traj = np.asarray(traj, dtype=np.float64)
    z = np.broadcast_to(np.asarray(z, dtype=np.float64), traj.shape[:-1])
    boxes = np.zeros(traj.shape[:-1] + (7,))
    boxes[..., [0, 1, 6]] = traj
    boxes[..., 2] = z
    moved = transform_boxes(boxes.reshape(-1, 7), T).reshape(boxes.shape)
    out = traj.copy()
    out[..., :] = moved[..., [0, 1, 6]]
    return out


def box_corners_3d(boxes: np.ndarray) -> np.ndarray:
    """(M, 8, 3) corners of boxes ``[x, y, z, l, w, h, yaw]``: the BEV corners at the bottom, then the top."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 7)
    bev = np.concatenate([box_corners_bev(boxes)] * 2, axis=1)
    half_height = boxes[:, 5:6] / 2.0
    z = boxes[:, 2:3] + np.concatenate([-np.repeat(half_height, 4, axis=1), np.repeat(half_height, 4, axis=1)], axis=1)
    return np.concatenate([bev, z[..., None]], axis=-1)


def box_corners_bev(boxes: np.ndarray) -> np.ndarray:
    """(M, 4, 2) BEV corners, counter-clockwise from front-left, of boxes ``[x, y, z, l, w, h, yaw]``."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 7)
    half = np.array([[1, 1], [-1, 1], [-1, -1], [1, -1]], dtype=np.float64) * 0.5
    local = half[None] * boxes[:, None, [3, 4]]
    c, s = np.cos(boxes[:, 6])[:, None], np.sin(boxes[:, 6])[:, None]
    x = local[..., 0] * c - local[..., 1] * s + boxes[:, None, 0]
    y = local[..., 0] * s + local[..., 1] * c + boxes[:, None, 1]
    return np.stack([x, y], axis=-1)


def points_in_boxes(points: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """(N, M) bool: point n lies inside 3D box m (boxes ``[x, y, z, l, w, h, yaw]``)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 7)
    d = points[:, None, :3].astype(np.float64) - boxes[None, :, :3]
    c, s = np.cos(boxes[:, 6]), np.sin(boxes[:, 6])
    local_x = d[..., 0] * c + d[..., 1] * s
    local_y = -d[..., 0] * s + d[..., 1] * c
    return (
        (np.abs(local_x) <= boxes[:, 3] / 2)
        & (np.abs(local_y) <= boxes[:, 4] / 2)
        & (np.abs(d[..., 2]) <= boxes[:, 5] / 2)
    )
