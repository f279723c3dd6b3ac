"""Typed records of the OpenCOOD / V2X-Real / V2XPnP-Seq on-disk layout.

Layout: ``<root>/<split>/<scenario>/<agent_id>/<timestamp>.pcd`` and ``.yaml``; agent ids < 0 are
infrastructure. Per scenario a trajectory file and the lane map sit beside the agent folders
(see :mod:`turbotrain.data.opencood`). Boxes here are in the **map** frame, as the YAML stores them,
converted to ``[x, y, z, l, w, h, yaw_rad]`` (full sizes).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

VEHICLE, INFRASTRUCTURE = 0, 1


@dataclass(frozen=True)
class ObjectRecord:
    track_id: int
    obj_type: str
    box: np.ndarray  # (7,) map frame: x, y, z, l, w, h, yaw (rad)
    speed: float = 0.0  # m/s
    pitch: float = 0.0  # rad, map frame (the YAML angle[2]): tilts the forward axis whose direction is the yaw in another frame


@dataclass
class AgentFrameRecord:
    """One agent's sensor reading at one timestamp."""

    scenario: str
    agent_id: int
    timestamp: str
    lidar_pose: np.ndarray  # (6,) OpenCOOD pose, map frame, degrees
    points: np.ndarray  # (N, 4) float32 x, y, z, intensity in the sensor frame
    objects: list[ObjectRecord] = field(default_factory=list)
    ego_speed: float = 0.0  # m/s (the YAML stores km/h)
    source: str = ""  # the yaml path, for error messages

    @property
    def agent_type(self) -> int:
        return INFRASTRUCTURE if self.agent_id < 0 else VEHICLE


@dataclass
class Lane:
    """A lane centreline in the map frame (polyline, metres)."""

    lane_id: int
    centerline: np.ndarray  # (P, 2)
    kind: str = "lane"  # lane | crosswalk


@dataclass
class ScenarioIndex:
    """What a scenario folder holds, without loading any points."""

    split: str
    name: str
    path: str
    agent_ids: list[int]
    timestamps: dict[int, list[str]]  # agent id -> sorted timestamps
