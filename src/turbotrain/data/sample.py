"""The data contract between the fusion cache and every model: :class:`Sample` and :class:`Batch`.

A *sample* is one ego agent at one timestamp ``t`` with ``H`` history steps (``t-H+1 .. t``, the last
one is the current frame) and ``F`` future steps. Everything is in the ego's sensor frame **at t**
(right-handed as the source data, x forward, z up; boxes ``[x, y, z, l, w, h, yaw_rad]``).

Point clouds are *agent-frames*: one agent's voxelised LiDAR at one history step, in that agent's
own sensor frame, plus ``pose_to_ego`` (4x4) that maps the agent's sensor frame at that step into
the ego frame at t. Intermediate fusion encodes each agent-frame on its own and warps BEV features
with ``pose_to_ego``; early fusion is one agent-frame per step holding the fused cloud (identity
pose); no fusion keeps only the ego's agent-frames.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

CLASS_NAMES_DEFAULT = ("car", "pedestrian", "truck")


@dataclass
class AgentFrame:
    voxels: np.ndarray  # (V, P, 4) float32: x, y, z, intensity (sensor frame), zero-padded
    num_points: np.ndarray  # (V,) int32, >= 1
    coords: np.ndarray  # (V, 3) int32: z, y, x voxel indices (spconv order)
    pose_to_ego: np.ndarray  # (4, 4) float64
    agent_id: int
    agent_type: int  # 0 vehicle, 1 infrastructure
    step: int  # 0 .. H-1, H-1 is the current frame
    # (N, 4) raw points in the same frame as the voxels, before the per-voxel cap (pretraining targets
    # only, FusedDataset(target_points=True)); None when not read
    target_points: np.ndarray | None = None

    def points(self) -> np.ndarray:
        """(N, 4) the raw points held by the voxels (sensor frame)."""
        P = self.voxels.shape[1]
        keep = np.arange(P)[None, :] < self.num_points[:, None]
        return self.voxels[keep]


@dataclass
class Sample:
    sample_id: str  # "<split>/<scenario>/<ego_id>/<timestamp>"
    frames: list[AgentFrame]  # any order; (step, agent slot) identify them
    boxes: np.ndarray  # (M, 7) float32, ego frame at t
    classes: np.ndarray  # (M,) int64 index into the class list
    track_ids: np.ndarray  # (M,) int64
    history: np.ndarray  # (M, H, 3) float32: x, y, yaw, ego frame at t; last step = current
    history_valid: np.ndarray  # (M, H) bool
    future: np.ndarray  # (M, F, 3) float32
    future_valid: np.ndarray  # (M, F) bool


@dataclass
class Batch:
    """Collated samples; ``F = number of agent-frames`` in the batch."""

    sample_ids: list[str]
    voxels: torch.Tensor  # (V, P, 4) float32
    num_points: torch.Tensor  # (V,) int32
    coords: torch.Tensor  # (V, 4) int32: frame index, z, y, x
    frame_sample: torch.Tensor  # (F,) int64 sample index in the batch
    frame_step: torch.Tensor  # (F,) int64 history step, H-1 = current
    frame_agent: torch.Tensor  # (F,) int64 agent slot, 0 = ego
    frame_agent_type: torch.Tensor  # (F,) int64
    frame_pose_to_ego: torch.Tensor  # (F, 4, 4) float32
    boxes: torch.Tensor  # (B, M, 7) padded
    classes: torch.Tensor  # (B, M) int64, -1 = padding
    box_mask: torch.Tensor  # (B, M) bool
    track_ids: torch.Tensor  # (B, M) int64
    history: torch.Tensor  # (B, M, H, 3)
    history_valid: torch.Tensor  # (B, M, H) bool
    future: torch.Tensor  # (B, M, F, 3)
    future_valid: torch.Tensor  # (B, M, F) bool
    target_points: torch.Tensor | None = None  # (N, 3) float32 raw points in their frame's own coordinates
    target_frame: torch.Tensor | None = None  # (N,) int64 frame index of each target point

    @property
    def batch_size(self) -> int:
        return len(self.sample_ids)

    def to(self, device) -> "Batch":
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            moved[f.name] = value.to(device) if isinstance(value, torch.Tensor) else value
        return Batch(**moved)


def collate(samples: list[Sample]) -> Batch:
    """Stack samples into a :class:`Batch`; agent slots are ego first, then ascending agent id."""
    voxels, num_points, coords = [], [], []
    frame_sample, frame_step, frame_agent, frame_type, frame_pose = [], [], [], [], []
    targets, target_frame = [], []
    frame_index = 0
    for b, sample in enumerate(samples):
        slots = _agent_slots(sample)
        for frame in sorted(sample.frames, key=lambda f: (f.step, slots[f.agent_id])):
            voxels.append(frame.voxels)
            num_points.append(frame.num_points)
            c = np.empty((len(frame.coords), 4), dtype=np.int32)
            c[:, 0] = frame_index
            c[:, 1:] = frame.coords
            coords.append(c)
            frame_sample.append(b)
            frame_step.append(frame.step)
            frame_agent.append(slots[frame.agent_id])
            frame_type.append(frame.agent_type)
            frame_pose.append(frame.pose_to_ego)
            if frame.target_points is not None:
                targets.append(frame.target_points[:, :3])
                target_frame.append(np.full(len(frame.target_points), frame_index, np.int64))
            frame_index += 1
    max_m = max([len(s.boxes) for s in samples] + [1])
    B = len(samples)
    H = samples[0].history.shape[1] if samples[0].history.ndim == 3 else 1
    Fut = samples[0].future.shape[1] if samples[0].future.ndim == 3 else 1
    boxes = np.zeros((B, max_m, 7), np.float32)
    classes = np.full((B, max_m), -1, np.int64)
    track_ids = np.full((B, max_m), -1, np.int64)
    history = np.zeros((B, max_m, H, 3), np.float32)
    history_valid = np.zeros((B, max_m, H), bool)
    future = np.zeros((B, max_m, Fut, 3), np.float32)
    future_valid = np.zeros((B, max_m, Fut), bool)
    for b, s in enumerate(samples):
        m = len(s.boxes)
        if m == 0:
            continue
        boxes[b, :m] = s.boxes
        classes[b, :m] = s.classes
        track_ids[b, :m] = s.track_ids
        history[b, :m] = s.history
        history_valid[b, :m] = s.history_valid
        future[b, :m] = s.future
        future_valid[b, :m] = s.future_valid
    P = max((v.shape[1] for v in voxels), default=1)
    return Batch(
        sample_ids=[s.sample_id for s in samples],
        voxels=torch.from_numpy(np.concatenate([_pad_points(v, P) for v in voxels]) if voxels else np.zeros((0, P, 4), np.float32)),
        num_points=torch.from_numpy(np.concatenate(num_points).astype(np.int32) if num_points else np.zeros(0, np.int32)),
        coords=torch.from_numpy(np.concatenate(coords) if coords else np.zeros((0, 4), np.int32)),
        frame_sample=torch.tensor(frame_sample, dtype=torch.int64),
        frame_step=torch.tensor(frame_step, dtype=torch.int64),
        frame_agent=torch.tensor(frame_agent, dtype=torch.int64),
        frame_agent_type=torch.tensor(frame_type, dtype=torch.int64),
        frame_pose_to_ego=torch.from_numpy(np.stack(frame_pose).astype(np.float32)) if frame_pose else torch.zeros(0, 4, 4),
        boxes=torch.from_numpy(boxes),
        classes=torch.from_numpy(classes),
        box_mask=torch.from_numpy(classes >= 0),
        track_ids=torch.from_numpy(track_ids),
        history=torch.from_numpy(history),
        history_valid=torch.from_numpy(history_valid),
        future=torch.from_numpy(future),
        future_valid=torch.from_numpy(future_valid),
        target_points=torch.from_numpy(np.concatenate(targets).astype(np.float32)) if target_frame else None,
        target_frame=torch.from_numpy(np.concatenate(target_frame)) if target_frame else None,
    )


def _agent_slots(sample: Sample) -> dict[int, int]:
    ego_id = int(sample.sample_id.split("/")[2])
    others = sorted({f.agent_id for f in sample.frames} - {ego_id})
    return {ego_id: 0, **{a: i + 1 for i, a in enumerate(others)}}


def _pad_points(voxels: np.ndarray, P: int) -> np.ndarray:
    if voxels.shape[1] == P:
        return voxels.astype(np.float32, copy=False)
    out = np.zeros((voxels.shape[0], P, voxels.shape[2]), np.float32)
    out[:, : voxels.shape[1]] = voxels
    return out
