"""Ground truth of a cache sample: the objects the cooperators annotate at t, in the ego frame,
with their tracked history and future."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from turbotrain.data.records import AgentFrameRecord, ObjectRecord
from turbotrain.geometry import points_in_boxes, pose_to_matrix, transform_boxes, transform_xy_yaw
from turbotrain.grid import Grid


def object_union(records: Iterable[AgentFrameRecord | None]) -> dict[int, ObjectRecord]:
    """Objects of several agents' frames by track id; the first agent that lists a track wins."""
    union: dict[int, ObjectRecord] = {}
    for record in records:
        for obj in record.objects if record is not None else ():
            union.setdefault(int(obj.track_id), obj)
    return union



@dataclass
class Labels:
    """Ego-frame ground truth of one sample."""

    boxes: np.ndarray  # (M, 7) float32
    classes: np.ndarray  # (M,) int64
    track_ids: np.ndarray  # (M,) int64
    history: np.ndarray  # (M, H, 3) float32
    history_valid: np.ndarray  # (M, H) bool
    future: np.ndarray  # (M, F, 3) float32
    future_valid: np.ndarray  # (M, F) bool


class LabelMaker:
    """Turns map-frame object lists into :class:`Labels` in the ego frame at ``t``."""

    def __init__(self, grid: Grid, classes: Sequence[str], class_map: dict[str, str] | None = None):
        self.grid = grid
        self.class_index = {name: i for i, name in enumerate(classes)}
        self.class_map = dict(class_map or {})
        self.unknown_types: Counter[str] = Counter()

    def make(self, ego_pose: np.ndarray, current: dict[int, ObjectRecord], past: list[dict[int, ObjectRecord]],
             coming: list[dict[int, ObjectRecord]]) -> Labels:
        """``current``: union at t; ``past``: unions at t-H+1 .. t; ``coming``: unions at t+1 .. t+F."""
        map_to_ego = np.linalg.inv(pose_to_matrix(ego_pose))
        kept = self._kept_objects(current, map_to_ego)
        track_ids = np.array([tid for tid, _, _ in kept], np.int64)
        history, history_valid = _track_states(track_ids, past, map_to_ego)
        future, future_valid = _track_states(track_ids, coming, map_to_ego)
        return Labels(
            boxes=np.array([box for _, box, _ in kept], np.float32).reshape(-1, 7),
            classes=np.array([cls for _, _, cls in kept], np.int64),
            track_ids=track_ids, history=history, history_valid=history_valid,
            future=future, future_valid=future_valid,
        )

    def _kept_objects(self, objects: dict[int, ObjectRecord], map_to_ego: np.ndarray) -> list[tuple[int, np.ndarray, int]]:
        kept = []
        x_min, y_min, _, x_max, y_max, _ = self.grid.point_cloud_range
        for track_id in sorted(objects):
            obj = objects[track_id]
            cls = self.class_index.get(self.class_map.get(obj.obj_type, obj.obj_type))
            if cls is None:
                self.unknown_types[obj.obj_type] += 1
                continue
            box = transform_boxes(obj.box, map_to_ego)[0]
            if _holds_ego_sensor(box):
                continue
            if x_min <= box[0] < x_max and y_min <= box[1] < y_max:
                kept.append((track_id, box, cls))
        return kept


def _holds_ego_sensor(box: np.ndarray) -> bool:
    """The ego vehicle itself, annotated by a cooperator: not an object the ego has to detect.

    OpenCOOD drops it by id; ids are not comparable across agents in every dataset, so we drop the
    box whose footprint holds the ego's sensor (the ego-frame origin).
    """
    return bool(points_in_boxes(np.array([[0.0, 0.0, box[2]]]), box[None])[0, 0])


def _track_states(track_ids: np.ndarray, steps: list[dict[int, ObjectRecord]], map_to_ego: np.ndarray):
    """(M, S, 3) x, y, yaw per step in the ego frame and (M, S) validity (absent -> zeros, invalid)."""
    states = np.zeros((len(track_ids), len(steps), 3), np.float64)
    valid = np.zeros((len(track_ids), len(steps)), bool)
    for s, objects in enumerate(steps):
        for m, track_id in enumerate(track_ids):
            obj = objects.get(int(track_id))
            if obj is not None:
                states[m, s] = np.asarray(obj.box)[[0, 1, 6]]
                valid[m, s] = True
    if valid.any():
        states[valid] = transform_xy_yaw(states[valid], map_to_ego)
    return states.astype(np.float32), valid

