"""A small synthetic cooperative scene as a :class:`Batch`, for model smoke tests, overfitting and benchmarks.

Objects (car, pedestrian, truck) move at constant velocity on a flat ground. Two agents observe them:
the ego (moving, so its past frames need warping too) and one cooperator with a different, rotated
pose (an infrastructure node by default). LiDAR points are sampled on the objects' side and top
faces and on the ground, expressed in each agent's sensor frame at each history step, and voxelised
with :class:`~turbotrain.data.voxelize.Voxelizer`. Everything is drawn from one seeded generator.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from turbotrain.data.sample import AgentFrame, Batch, Sample, collate
from turbotrain.data.voxelize import Voxelizer
from turbotrain.geometry import transform_points
from turbotrain.grid import Grid

# Full sizes (l, w, h) in metres per class index of CLASS_NAMES_DEFAULT (car, pedestrian, truck).
CLASS_SIZES = np.array([[4.5, 2.0, 1.6], [0.8, 0.8, 1.7], [8.0, 2.6, 3.0]])
CLASS_SPEEDS = np.array([6.0, 1.3, 4.0])  # m/s, along the heading
GROUND_Z = -1.8  # metres below the sensor
DT = 0.1  # s between steps (10 Hz)


@dataclass(frozen=True)
class ToySceneConfig:
    history: int = 2
    future: int = 4
    num_objects: int = 4
    points_per_box: int = 400
    ground_points: int = 600
    ego_speed: float = 5.0  # m/s along +x
    cooperator_yaw: float = 0.6  # rad, the cooperator's heading in the ego frame
    cooperator_xy: tuple[float, float] = (4.0, -3.0)
    cooperator_is_infrastructure: bool = True
    ego_is_infrastructure: bool = False  # infrastructure-centric sample: a static ego of type 1
    max_points_per_voxel: int = 8
    max_voxels: int = 20000


def rigid_2d(x: float, y: float, yaw: float) -> np.ndarray:
    """4x4 transform: rotation ``yaw`` about +z, then translation (x, y, 0)."""
    T = np.eye(4)
    T[:2, :2] = [[np.cos(yaw), -np.sin(yaw)], [np.sin(yaw), np.cos(yaw)]]
    T[:2, 3] = (x, y)
    return T


def surface_points(box: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 3) points on the four side faces and the top face of a box ``[x, y, z, l, w, h, yaw]``."""
    l, w, h = box[3:6]
    face = rng.integers(0, 5, n)
    u, v = rng.uniform(-0.5, 0.5, n), rng.uniform(-0.5, 0.5, n)
    local = np.stack([u * l, v * w, rng.uniform(-0.5, 0.5, n) * h], axis=1)
    local[face == 0, 0], local[face == 1, 0] = l / 2, -l / 2
    local[face == 2, 1], local[face == 3, 1] = w / 2, -w / 2
    local[face == 4, 2] = h / 2
    c, s = np.cos(box[6]), np.sin(box[6])
    xy = local[:, :2] @ np.array([[c, s], [-s, c]])
    return np.column_stack([xy + box[:2], local[:, 2] + box[2]])


class ToyScene:
    """Random objects and two agents in the ego frame at the current time; see the module docstring."""

    def __init__(self, grid: Grid, cfg: ToySceneConfig, rng: np.random.Generator):
        self.grid, self.cfg, self.rng = grid, cfg, rng
        self.boxes, self.classes, self.velocities = self._place_objects()

    def _place_objects(self):
        r = self.grid.point_cloud_range
        margin = 3.0
        boxes, classes, velocities = [], [], []
        while len(boxes) < self.cfg.num_objects:
            xy = self.rng.uniform([r[0] + margin, r[1] + margin], [r[3] - margin, r[4] - margin])
            if any(np.hypot(*(xy - b[:2])) < 7.0 for b in boxes):
                continue  # keep objects apart so their points and heatmaps do not mix
            cls = len(boxes) % len(CLASS_SIZES)
            yaw = self.rng.uniform(-np.pi, np.pi)
            l, w, h = CLASS_SIZES[cls]
            boxes.append(np.array([xy[0], xy[1], GROUND_Z + h / 2, l, w, h, yaw]))
            classes.append(cls)
            velocities.append(CLASS_SPEEDS[cls] * np.array([np.cos(yaw), np.sin(yaw)]))
        return np.stack(boxes), np.array(classes, np.int64), np.stack(velocities)

    def boxes_at(self, step_offset: int) -> np.ndarray:
        """Boxes ``step_offset`` steps from now (negative = past)."""
        moved = self.boxes.copy()
        moved[:, :2] += self.velocities * step_offset * DT
        return moved

    @property
    def ego_id(self) -> int:
        return -2 if self.cfg.ego_is_infrastructure else 0

    def agent_poses(self, step: int) -> list[tuple[int, int, np.ndarray]]:
        """``(agent_id, agent_type, pose_to_ego)`` of the ego and the cooperator at history ``step``."""
        offset = step - (self.cfg.history - 1)
        ego_speed = 0.0 if self.cfg.ego_is_infrastructure else self.cfg.ego_speed
        ego = rigid_2d(ego_speed * offset * DT, 0.0, 0.0)
        coop = rigid_2d(*self.cfg.cooperator_xy, self.cfg.cooperator_yaw)
        coop_id, coop_type = (-1, 1) if self.cfg.cooperator_is_infrastructure else (7, 0)
        return [(self.ego_id, int(self.cfg.ego_is_infrastructure), ego), (coop_id, coop_type, coop)]

    def world_points(self, step: int) -> np.ndarray:
        """(N, 4) object-surface and ground points in the ego frame at the current time, intensity last."""
        boxes = self.boxes_at(step - (self.cfg.history - 1))
        objects = [surface_points(b, self.cfg.points_per_box, self.rng) for b in boxes]
        r = self.grid.point_cloud_range
        ground = np.column_stack(
            [self.rng.uniform(r[0], r[3], self.cfg.ground_points), self.rng.uniform(r[1], r[4], self.cfg.ground_points),
             np.full(self.cfg.ground_points, GROUND_Z + 0.05)]
        )
        xyz = np.concatenate(objects + [ground])
        return np.column_stack([xyz, self.rng.uniform(0, 1, len(xyz))]).astype(np.float32)

    def sample(self, sample_id: str, voxelizer: Voxelizer) -> Sample:
        frames = []
        for step in range(self.cfg.history):
            points = self.world_points(step)
            for agent_id, agent_type, pose in self.agent_poses(step):
                local = transform_points(points, np.linalg.inv(pose))
                voxels, coords, num_points = voxelizer(local)
                frames.append(AgentFrame(voxels, num_points, coords, pose, agent_id, agent_type, step))
        return Sample(
            sample_id=sample_id,
            frames=frames,
            boxes=self.boxes.astype(np.float32),
            classes=self.classes,
            track_ids=np.arange(len(self.boxes), dtype=np.int64),
            history=self._states(range(-self.cfg.history + 1, 1)),
            history_valid=np.ones((len(self.boxes), self.cfg.history), bool),
            future=self._states(range(1, self.cfg.future + 1)),
            future_valid=np.ones((len(self.boxes), self.cfg.future), bool),
        )

    def _states(self, offsets) -> np.ndarray:
        """(M, len(offsets), 3) x, y, yaw at the given step offsets."""
        states = [self.boxes_at(k)[:, [0, 1, 6]] for k in offsets]
        return np.stack(states, axis=1).astype(np.float32)


def toy_samples(grid: Grid, configs: Sequence[ToySceneConfig] = (ToySceneConfig(),), seed: int = 0) -> list[Sample]:
    """One independent toy scene per config, all drawn from one generator seeded with ``seed``."""
    rng = np.random.default_rng(seed)
    samples = []
    for b, cfg in enumerate(configs):
        voxelizer = Voxelizer(grid, cfg.max_points_per_voxel, cfg.max_voxels, backend="numpy")
        scene = ToyScene(grid, cfg, rng)
        samples.append(scene.sample(f"toy/scene{b}/{scene.ego_id}/{b:06d}", voxelizer))
    return samples


def toy_batch(grid: Grid, configs: Sequence[ToySceneConfig] = (ToySceneConfig(),), seed: int = 0) -> Batch:
    """:func:`toy_samples` collated into a :class:`Batch`."""
    return collate(toy_samples(grid, configs, seed))
