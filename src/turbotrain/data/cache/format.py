"""The fusion cache's on-disk format, shared by the builder (:mod:`.builder`) and the reader
(:class:`turbotrain.data.dataset.FusedDataset`).

Layout of ``<cache root>/<dataset>/<split>/``:

* ``frames-<scenario>.npz`` - every (agent, timestamp) LiDAR frame that some sample uses, voxelised
  once in the agent's own sensor frame (cropped with the grid range there), stored compactly as the
  voxels' points concatenated plus offsets: ``agent_ids (K,)``, ``timestamps (K,)``,
  ``lidar_poses (K, 6)``, ``voxel_offsets (K+1,)``, ``point_offsets (K+1,)``, ``coords (V, 3)``,
  ``num_points (V,)``, ``points (N, 4)``; voxels are in canonical (linear index) order. Beside them
  ``target_offsets (K+1,)``, ``target_points (T, 4)``: each frame's raw points inside the grid, at most
  ``target_points_per_cell`` per BEV cell of the agent's frame (masked-reconstruction targets, CooPre).
* ``samples-<k>.npz`` - up to ``shard_size`` samples: ids, the agent-frames as references into the
  frame stores with their ``pose_to_ego``, and ego-frame labels; ragged arrays as data + offsets
  (:func:`shard_arrays`).
* ``manifest.json`` - written last: sample ids, counts, per-file sha256, the :class:`CacheConfig`
  and its digest, and nested label-fraction subsets. No manifest means no complete cache.
"""
from __future__ import annotations

import json
import struct
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import numpy as np

from turbotrain.data.cache.labels import DEFAULT_RULE, GT_RANGE_RULES
from turbotrain.data.records import INFRASTRUCTURE, VEHICLE
from turbotrain.grid import Grid
from turbotrain.utils.errors import DataError
from turbotrain.utils.hashing import canonical_sha256, sha256_file

if TYPE_CHECKING:
    from turbotrain.data.cache.builder import SampleRecord

# 2: track states are the label boxes' centres and yaws under tilt (z and pitch included), box yaw is the
# direction of the pitched forward axis in the ego frame, and the ground-truth range rule is a setting.
# 3: frame stores keep raw target points per BEV cell (target_points_per_cell) beside the capped voxels.
CACHE_FORMAT_VERSION = 3
MANIFEST_NAME = "manifest.json"
AGENT_TYPE_NAMES = {"vehicle": VEHICLE, "infrastructure": INFRASTRUCTURE}
_MANIFEST_KEYS = ("format_version", "config", "config_hash", "sample_ids", "shards", "frame_stores", "files", "label_fractions")


@dataclass(frozen=True)
class CacheConfig:
    """Everything that decides the cache's content; its hash identifies a cache."""

    history: int
    future: int
    grid: Grid
    classes: tuple[str, ...]
    comm_range: float = 70.0
    class_map: dict[str, str] = field(default_factory=dict)
    max_agents: int = 5
    max_points_per_voxel: int = 32
    max_voxels: int = 40000
    sample_stride: int = 1
    ego_types: tuple[str, ...] = ("vehicle",)
    on_bad_frame: str = "error"
    label_fractions: tuple[float, ...] = (0.2, 0.5, 1.0)
    seed: int = 0
    gt_range_rule: str = DEFAULT_RULE  # which boxes are ground truth (labels.GT_RANGE_RULES); the tables report it
    target_points_per_cell: int = 64  # raw points kept per BEV cell for reconstruction targets (0: none)

    def __post_init__(self):
        if self.history < 1 or self.future < 0:
            raise ValueError(f"need history >= 1 and future >= 0, got {self.history}, {self.future}")
        if self.max_agents < 1 or self.sample_stride < 1:
            raise ValueError(f"max_agents and sample_stride must be >= 1, got {self.max_agents}, {self.sample_stride}")
        unknown = set(self.ego_types) - set(AGENT_TYPE_NAMES)
        if unknown or not self.ego_types:
            raise ValueError(f"ego_types must be a non-empty subset of {sorted(AGENT_TYPE_NAMES)}, got {self.ego_types}")
        if any(not 0 < f <= 1 for f in self.label_fractions):
            raise ValueError(f"label fractions must lie in (0, 1], got {self.label_fractions}")
        if self.target_points_per_cell < 0:
            raise ValueError(f"target_points_per_cell must be >= 0, got {self.target_points_per_cell}")
        if self.gt_range_rule not in GT_RANGE_RULES:
            raise ValueError(f"gt_range_rule must be one of {list(GT_RANGE_RULES)}, got {self.gt_range_rule!r}")

    def to_json(self) -> dict:
        """JSON-ready form, stored in the manifest (sorted containers, so equal configs hash equally)."""
        cfg = asdict(self)
        cfg["grid"] = {
            "point_cloud_range": list(self.grid.point_cloud_range),
            "voxel_size": list(self.grid.voxel_size),
            "bev_stride": self.grid.bev_stride,
        }
        cfg["classes"] = list(self.classes)
        cfg["class_map"] = dict(sorted(self.class_map.items()))
        cfg["ego_types"] = sorted(self.ego_types)
        cfg["label_fractions"] = sorted(float(f) for f in self.label_fractions)
        cfg["format_version"] = CACHE_FORMAT_VERSION
        return cfg



def cache_config_digest(config_json: dict) -> str:
    """sha256 of the canonical JSON of a :meth:`CacheConfig.to_json` dict (the manifest's ``config_hash``)."""
    return canonical_sha256(config_json)


def fraction_key(fraction: float) -> str:
    """Manifest key of a label fraction: ``0.2 -> "0.2"``, ``1 -> "1.0"``."""
    return str(float(fraction))



def shard_arrays(samples: list[SampleRecord]) -> dict[str, np.ndarray]:
    """Per-sample metadata of one shard as flat arrays plus offsets (no pickle)."""
    lab = [s.labels for s in samples]
    return {
        "sample_ids": np.array([s.sample_id for s in samples], dtype=np.str_),
        "scenarios": np.array([s.scenario for s in samples], dtype=np.str_),
        "ego_ids": np.array([s.ego_id for s in samples], np.int64),
        "ego_poses": np.array([s.ego_pose for s in samples], np.float64).reshape(-1, 6),
        "frame_offsets": ragged_offsets(len(s.frame_slots) for s in samples),
        "frame_slots": np.array([x for s in samples for x in s.frame_slots], np.int64),
        "frame_steps": np.array([x for s in samples for x in s.frame_steps], np.int64),
        "frame_agent_ids": np.array([x for s in samples for x in s.frame_agent_ids], np.int64),
        "frame_poses_to_ego": np.array([x for s in samples for x in s.frame_poses_to_ego], np.float64).reshape(-1, 4, 4),
        "box_offsets": ragged_offsets(len(x.boxes) for x in lab),
        "boxes": concat_or_empty([x.boxes for x in lab], (0, 7), np.float32),
        "classes": concat_or_empty([x.classes for x in lab], (0,), np.int64),
        "track_ids": concat_or_empty([x.track_ids for x in lab], (0,), np.int64),
        "history": concat_or_empty([x.history for x in lab], (0,) + lab[0].history.shape[1:], np.float32),
        "history_valid": concat_or_empty([x.history_valid for x in lab], (0,) + lab[0].history_valid.shape[1:], bool),
        "future": concat_or_empty([x.future for x in lab], (0,) + lab[0].future.shape[1:], np.float32),
        "future_valid": concat_or_empty([x.future_valid for x in lab], (0,) + lab[0].future_valid.shape[1:], bool),
    }



class MappedNpz:
    """Arrays of an uncompressed ``.npz`` memory-mapped on first access (``np.load`` cannot map npz members)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(self.path, "file", "a cache file listed in the manifest", "(missing)")
        try:
            with zipfile.ZipFile(self.path) as archive:
                self._members = {info.filename.removesuffix(".npy"): info for info in archive.infolist()}
        except zipfile.BadZipFile as err:
            raise DataError(self.path, "file", "an .npz archive", str(err)) from err
        self._arrays: dict[str, np.ndarray] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            if name not in self._members:
                raise DataError(self.path, name, "an array of that name", "(missing)")
            self._arrays[name] = self._map(self._members[name])
        return self._arrays[name]

    def __getstate__(self) -> dict:
        # Maps are reopened in each worker; pickling them would copy the whole file.
        return {**self.__dict__, "_arrays": {}}

    def _map(self, info: zipfile.ZipInfo) -> np.ndarray:
        if info.compress_type != zipfile.ZIP_STORED:
            with np.load(self.path, allow_pickle=False) as archive:
                return archive[info.filename.removesuffix(".npy")]
        with open(self.path, "rb") as fh:
            fh.seek(info.header_offset)
            name_len, extra_len = struct.unpack("<HH", fh.read(30)[26:30])
            fh.seek(info.header_offset + 30 + name_len + extra_len)
            version = np.lib.format.read_magic(fh)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(fh)
            offset = fh.tell()
        if dtype.hasobject:
            raise DataError(self.path, info.filename, "a plain (non-object) array", str(dtype))
        if int(np.prod(shape)) == 0:
            return np.zeros(shape, dtype)
        return np.memmap(self.path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


def load_manifest(split_dir: str | Path, expected_config_hash: str | None = None) -> dict:
    """The validated manifest of a cache split; :class:`DataError` naming the file otherwise."""
    path = Path(split_dir) / MANIFEST_NAME
    if not path.is_file():
        raise DataError(path, "manifest", "a manifest written by `turbotrain fuse` (without one the cache is incomplete)", "(missing)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(path, "manifest", "valid JSON", str(err)) from err
    missing = [k for k in _MANIFEST_KEYS if not isinstance(manifest, dict) or k not in manifest]
    if missing:
        raise DataError(path, missing[0], "present in the manifest", "(missing)")
    if manifest["format_version"] != CACHE_FORMAT_VERSION:
        raise DataError(path, "format_version", f"{CACHE_FORMAT_VERSION} (rebuild the cache)", manifest["format_version"])
    recomputed = cache_config_digest(manifest["config"])
    if manifest["config_hash"] != recomputed:
        raise DataError(path, "config_hash", f"{recomputed}, the hash of the stored config (the manifest was edited)", manifest["config_hash"])
    if expected_config_hash is not None and manifest["config_hash"] != expected_config_hash:
        raise DataError(path, "config_hash", f"{expected_config_hash} (the cache was built with another config)", manifest["config_hash"])
    return manifest


def verify_cache_files(split_dir: str | Path, manifest: dict) -> None:
    """Compare every cache file's sha256 with the manifest's."""
    for name, expected in sorted(manifest["files"].items()):
        path = Path(split_dir) / name
        if not path.is_file():
            raise DataError(path, "file", "a cache file listed in the manifest", "(missing)")
        actual = sha256_file(path)
        if actual != expected:
            raise DataError(path, "sha256", expected, actual)


def ragged_offsets(lengths: Iterable[int]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(list(lengths), dtype=np.int64)]).astype(np.int64)


def concat_or_empty(parts: list[np.ndarray], empty_shape: tuple, dtype) -> np.ndarray:
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(empty_shape, dtype)
