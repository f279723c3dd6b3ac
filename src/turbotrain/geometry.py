"""Poses, frames and boxes.

Conventions (tested on hand-made cases in tests/test_geometry.py):

* A *pose* is OpenCOOD's ``[x, y, z, roll, yaw, pitch]`` in metres and **degrees**, the sensor (or
  object) frame expressed in the scenario's map frame. ``pose_to_matrix`` is OpenCOOD's ``x_to_world``
  formula, applied literally, so real V2X-Real / V2XPnP-Seq / OPV2V poses mean what they mean there.
  With roll = pitch = 0 it is a rotation by ``yaw`` about +z followed by the translation.
* A *box* is ``[x, y, z, l, w, h, yaw]`` with full sizes (the YAML ``extent`` holds half sizes) and
  yaw in **radians**, counter-clockwise about +z from +x, wrapped to [-pi, pi).
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


def transform_boxes(boxes: np.ndarray, T: np.ndarray) -> np.ndarray:
    """Move boxes ``[x, y, z, l, w, h, yaw]`` by ``T`` (sizes unchanged, yaw rotated)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 7)
    out = boxes.copy()
    out[:, :3] = boxes[:, :3] @ T[:3, :3].T + T[:3, 3]
    out[:, 6] = wrap_angle(boxes[:, 6] + yaw_of(T))
    return out


def transform_xy_yaw(traj: np.ndarray, T: np.ndarray) -> np.ndarray:
    """Move trajectory states ``[..., (x, y, yaw)]`` (ground plane) by ``T``."""
    traj = np.asarray(traj, dtype=np.float64)
    out = traj.copy()
    xy = traj[..., :2]
    out[..., 0] = xy[..., 0] * T[0, 0] + xy[..., 1] * T[0, 1] + T[0, 3]
    out[..., 1] = xy[..., 0] * T[1, 0] + xy[..., 1] * T[1, 1] + T[1, 3]
    out[..., 2] = wrap_angle(traj[..., 2] + yaw_of(T))
    return out


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
