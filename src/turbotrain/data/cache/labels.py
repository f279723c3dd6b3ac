"""Ground truth of a cache sample: the objects the cooperators annotate at t, in the ego frame,
with their tracked history and future.

A track state at any step is the ``(x, y, yaw)`` of the label box the object would get at that step in
the ego frame at t (same transform, same yaw rule), so the state at t is the label box's centre, tilt
or not. Which boxes count is a per-dataset rule (:data:`GT_RANGE_RULES`) on the ego-frame box and the
grid's ``point_cloud_range``.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from turbotrain.data.records import AgentFrameRecord, ObjectRecord
from turbotrain.geometry import box_corners_3d, points_in_boxes, pose_to_matrix, transform_boxes
from turbotrain.grid import Grid
from turbotrain.utils.errors import ConfigError

# Which ego-frame boxes are ground truth, given the range [x_min, y_min, z_min, x_max, y_max, z_max]:
#   center_xy      the centre's x and y in [min, max) (no z test; this project's rule before it was a setting)
#   all_corners    all 8 corners in [min, max], z included (OpenCOOD's and V2XPnP's
#                  mask_boxes_outside_range_numpy, min_num_corners=8)
#   min_corners_2  at least 2 of the 8 corners in [min, max] (V2X-Real's min_num_corners=2)
GT_RANGE_RULES = ("center_xy", "all_corners", "min_corners_2")
_MIN_CORNERS = {"all_corners": 8, "min_corners_2": 2}
# `dataset.gt_range_rule: auto`: each dataset's own rule, by its name with case, '-' and '_' dropped.
# The synthetic data stands in for V2XPnP-Seq (same layout, the paper config's dataset), so it counts
# boxes as V2XPnP-Seq does; so does any other dataset in the OpenCOOD layout (OpenCOOD's rule).
KNOWN_DATASET_RULES = {"v2xpnp": "all_corners", "v2xpnpseq": "all_corners", "opv2v": "all_corners",
                       "v2xset": "all_corners", "v2xreal": "min_corners_2"}
SYNTHETIC_RULE = "all_corners"
DEFAULT_RULE = "all_corners"


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


def resolve_gt_range_rule(name: str, source: str, setting: str = "auto") -> str:
    """The rule a dataset's fusion cache uses: ``setting`` itself, or for ``"auto"`` the dataset's own."""
    if setting != "auto":
        if setting not in GT_RANGE_RULES:
            raise ConfigError(f"dataset.gt_range_rule: expected auto or one of {list(GT_RANGE_RULES)} (dataset {name!r}), got {setting!r}")
        return setting
    if source == "synthetic":
        return SYNTHETIC_RULE
    return KNOWN_DATASET_RULES.get("".join(ch for ch in name.lower() if ch.isalnum()), DEFAULT_RULE)


def boxes_in_range(boxes: np.ndarray, point_cloud_range, rule: str) -> np.ndarray:
    """(M,) bool: which ego-frame boxes ``[x, y, z, l, w, h, yaw]`` count under ``rule`` (:data:`GT_RANGE_RULES`)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 7)
    low, high = np.asarray(point_cloud_range[:3], np.float64), np.asarray(point_cloud_range[3:], np.float64)
    if rule == "center_xy":
        return np.all((boxes[:, :2] >= low[:2]) & (boxes[:, :2] < high[:2]), axis=1)
    if rule not in _MIN_CORNERS:
        raise ConfigError(f"gt_range_rule: expected one of {list(GT_RANGE_RULES)}, got {rule!r}")
    corners = box_corners_3d(boxes)
    inside = np.all((corners >= low) & (corners <= high), axis=2)
    return inside.sum(axis=1) >= _MIN_CORNERS[rule]


def object_box_in_frame(obj: ObjectRecord, map_to_frame: np.ndarray) -> np.ndarray:
    """(7,) box of a map-frame object in another frame (full transform; yaw from its pitched forward axis)."""
    return transform_boxes(obj.box, map_to_frame, pitch=[obj.pitch])[0]


class LabelMaker:
    """Turns map-frame object lists into :class:`Labels` in the ego frame at ``t``."""

    def __init__(self, grid: Grid, classes: Sequence[str], class_map: dict[str, str] | None = None,
                 gt_range_rule: str = DEFAULT_RULE):
        if gt_range_rule not in GT_RANGE_RULES:
            raise ConfigError(f"gt_range_rule: expected one of {list(GT_RANGE_RULES)}, got {gt_range_rule!r}")
        self.grid = grid
        self.gt_range_rule = gt_range_rule
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
        for track_id in sorted(objects):
            obj = objects[track_id]
            cls = self.class_index.get(self.class_map.get(obj.obj_type, obj.obj_type))
            if cls is None:
                self.unknown_types[obj.obj_type] += 1
                continue
            box = object_box_in_frame(obj, map_to_ego)
            if _holds_ego_sensor(box):
                continue
            if boxes_in_range(box, self.grid.point_cloud_range, self.gt_range_rule)[0]:
                kept.append((track_id, box, cls))
        return kept


def _holds_ego_sensor(box: np.ndarray) -> bool:
    """The ego vehicle itself, annotated by a cooperator: not an object the ego has to detect.

    OpenCOOD drops it by id; ids are not comparable across agents in every dataset, so we drop the
    box whose footprint holds the ego's sensor (the ego-frame origin).
    """
    return bool(points_in_boxes(np.array([[0.0, 0.0, box[2]]]), box[None])[0, 0])


def _track_states(track_ids: np.ndarray, steps: list[dict[int, ObjectRecord]], map_to_ego: np.ndarray):
    """(M, S, 3) x, y, yaw per step in the ego frame and (M, S) validity (absent -> zeros, invalid).

    Each state is the centre and yaw of the object's box moved as a label box is
    (:func:`object_box_in_frame`), z and pitch included.
    """
    boxes = np.zeros((len(track_ids), len(steps), 7), np.float64)
    pitches = np.zeros((len(track_ids), len(steps)), np.float64)
    valid = np.zeros((len(track_ids), len(steps)), bool)
    for s, objects in enumerate(steps):
        for m, track_id in enumerate(track_ids):
            obj = objects.get(int(track_id))
            if obj is not None:
                boxes[m, s] = obj.box
                pitches[m, s] = obj.pitch
                valid[m, s] = True
    states = np.zeros((len(track_ids), len(steps), 3), np.float64)
    if valid.any():
        states[valid] = transform_boxes(boxes[valid], map_to_ego, pitch=pitches[valid])[:, [0, 1, 6]]
    return states.astype(np.float32), valid

