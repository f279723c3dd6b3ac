"""``turbotrain fuse``: build the fusion cache (format in :mod:`.format`) of one split.

A *sample* is an ego agent at a timestamp ``t`` with ``history`` steps ``t-H+1 .. t`` and ``future``
steps after ``t``, the ego present at all of them. Its cooperators are the agents whose sensor lies
within ``comm_range`` of the ego's at ``t`` (the ``max_agents`` closest, ego first).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import math
import multiprocessing
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from tqdm import tqdm

from turbotrain.data.cache.format import (AGENT_TYPE_NAMES, CACHE_FORMAT_VERSION, MANIFEST_NAME, CacheConfig,
                                          cache_config_digest, fraction_key, shard_arrays, concat_or_empty, ragged_offsets)
from turbotrain.data.cache.labels import DEFAULT_RULE, LabelMaker, Labels, object_union
from turbotrain.data.records import INFRASTRUCTURE, VEHICLE, AgentFrameRecord, ScenarioIndex
from turbotrain.data.voxelize import Voxelizer, sort_voxels
from turbotrain.geometry import relative_transform
from turbotrain.grid import Grid
from turbotrain.utils.atomic import write_json, write_npz
from turbotrain.utils.hashing import sha256_file


def build_cache(
    raw_root: str | Path,
    split: str,
    out_dir: str | Path,
    *,
    history: int,
    future: int,
    grid: Grid,
    classes: Sequence[str],
    comm_range: float = 70.0,
    class_map: dict[str, str] | None = None,
    max_agents: int = 5,
    max_points_per_voxel: int = 32,
    max_voxels: int = 40000,
    voxel_backend: str = "auto",
    sample_stride: int = 1,
    ego_types: Sequence[str] = ("vehicle",),
    on_bad_frame: str = "error",
    label_fractions: Sequence[float] = (0.2, 0.5, 1.0),
    seed: int = 0,
    gt_range_rule: str = DEFAULT_RULE,
    target_points_per_cell: int = 64,
    shard_size: int = 256,
    progress: bool = True,
    workers: int = 1,
) -> dict:
    """Fuse ``<raw_root>/<split>`` (OpenCOOD layout) into ``<out_dir>/<split>``; returns the summary.

    ``voxel_backend``, ``shard_size`` and ``workers`` are not part of the config hash: both voxeliser
    backends give the same voxels, which the cache stores in canonical order, and scenarios fused in
    ``workers`` processes are collected in scenario order (the output is the same for any count).
    """
    from turbotrain.data import opencood  # imported here: the reader is the only heavy dependency

    config = CacheConfig(
        history=history, future=future, grid=grid, classes=tuple(classes), comm_range=float(comm_range),
        class_map=dict(class_map or {}), max_agents=max_agents, max_points_per_voxel=max_points_per_voxel,
        max_voxels=max_voxels, sample_stride=sample_stride, ego_types=tuple(ego_types),
        on_bad_frame=on_bad_frame, label_fractions=tuple(label_fractions), seed=seed, gt_range_rule=gt_range_rule,
        target_points_per_cell=target_points_per_cell,
    )
    split_dir = Path(out_dir) / split
    # A previous manifest would vouch for files this run is about to replace.
    (split_dir / MANIFEST_NAME).unlink(missing_ok=True)
    split_dir.mkdir(parents=True, exist_ok=True)
    skipped = opencood.SkipReport()
    scenarios = sorted(opencood.index_split(raw_root, split, on_bad_frame=on_bad_frame, report=skipped), key=lambda s: s.name)
    voxelizer = Voxelizer(grid, max_points_per_voxel, max_voxels, voxel_backend)
    builder = _CacheBuilder(config, split, split_dir, shard_size)
    job = functools.partial(_fuse_scenario, config, split, split_dir, voxelizer)
    with _scenario_map(workers, len(scenarios)) as mapped:
        # Results come back in scenario order whatever the worker count, so shards are byte-identical.
        for result in tqdm(mapped(job, scenarios), total=len(scenarios), desc=f"fuse {split}", unit="scenario",
                           disable=not progress):
            builder.add_result(result)
            skipped.entries.extend(result.skipped)
    return builder.finish(skipped_by_field=dict(sorted(skipped.by_field.items())))


@contextlib.contextmanager
def _scenario_map(workers: int, n_scenarios: int):
    """``map`` in this process (one worker) or over a process pool; both keep the input order."""
    workers = max(1, min(int(workers), n_scenarios))
    if workers == 1:
        yield map
        return
    # spawn, not fork: the parent may hold torch / OpenMP state that a forked child must not inherit.
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield pool.map


@dataclasses.dataclass
class ScenarioResult:
    """What fusing one scenario produced: its samples, its frame store file (already written) and counts."""

    scenario: str
    samples: list
    frame_store: str | None
    counts: Counter
    skipped: list
    unknown_types: Counter


def _fuse_scenario(config: CacheConfig, split: str, split_dir: Path, voxelizer: Voxelizer,
                   index: ScenarioIndex) -> ScenarioResult:
    """Fuse one scenario (a worker process's unit of work): samples in order, frame store written."""
    from turbotrain.data import opencood

    skipped = opencood.SkipReport()
    read = functools.partial(opencood.read_agent_frame, on_bad_frame=config.on_bad_frame, report=skipped)
    read_points = functools.partial(opencood.read_agent_points, on_bad_frame=config.on_bad_frame, report=skipped)
    reader = ScenarioReader(read, index, read_points)
    fuser = _ScenarioFuser(config, split, voxelizer)
    samples, store, counts = fuser.fuse(reader)
    name = None
    if len(store):
        name = f"frames-{_safe_name(index.name)}.npz"
        arrays = store.arrays()
        write_npz(split_dir / name, **arrays)
        counts.update(frames=len(store), voxels=len(arrays["coords"]), points=len(arrays["points"]))
    return ScenarioResult(index.name, samples, name, counts, list(skipped.entries), Counter(fuser.labels.unknown_types))


# --------------------------------------------------------------------------------------------------
# Reading one scenario


class ScenarioReader:
    """One scenario's frames: poses and labels cached per frame, points read when voxelised; counts bad frames."""

    def __init__(self, read_agent_frame: Callable[..., AgentFrameRecord | None], index: ScenarioIndex,
                 read_agent_points: Callable[..., np.ndarray | None]):
        self.index = index
        self._read = read_agent_frame  # (index, agent_id, timestamp, load_points=) -> record | None
        self._read_points = read_agent_points  # (index, agent_id, timestamp) -> points | None
        self._meta: dict[tuple[int, str], AgentFrameRecord | None] = {}
        self.bad_frames = 0
        self.timeline = _timeline(index)
        self._present = {a: set(ts) for a, ts in index.timestamps.items()}

    def has(self, agent_id: int, timestamp: str) -> bool:
        return timestamp in self._present.get(agent_id, ())

    def meta(self, agent_id: int, timestamp: str) -> AgentFrameRecord | None:
        """The frame's pose and objects (no points), or None when absent or unreadable."""
        key = (agent_id, timestamp)
        if key not in self._meta:
            self._meta[key] = self._load(agent_id, timestamp, load_points=False) if self.has(*key) else None
        return self._meta[key]

    def with_points(self, agent_id: int, timestamp: str) -> AgentFrameRecord | None:
        """The cached :meth:`meta` record with its points read: each label YAML is parsed once."""
        meta = self.meta(agent_id, timestamp)
        if meta is None:
            return None
        points = self._read_points(self.index, agent_id, timestamp)
        self.bad_frames += points is None
        return None if points is None else dataclasses.replace(meta, points=points)

    def _load(self, agent_id: int, timestamp: str, load_points: bool) -> AgentFrameRecord | None:
        record = self._read(self.index, agent_id, timestamp, load_points=load_points)
        self.bad_frames += record is None
        return record


def _timeline(index: ScenarioIndex) -> list[str]:
    """All timestamps of a scenario in time order (numeric when they are numbers)."""
    stamps = set().union(*index.timestamps.values()) if index.timestamps else set()
    return sorted(stamps, key=lambda s: (0, int(s), s) if s.isdigit() else (1, 0, s))


def sample_anchors(reader: ScenarioReader, ego_id: int, history: int, future: int, stride: int) -> list[int]:
    """Timeline positions ``t`` at which the ego has every frame ``t-H+1 .. t+F``."""
    timeline = reader.timeline
    anchors = []
    for t in range(history - 1, len(timeline) - future, stride):
        if all(reader.has(ego_id, ts) for ts in timeline[t - history + 1 : t + future + 1]):
            anchors.append(t)
    return anchors


def select_cooperators(poses: dict[int, np.ndarray], ego_id: int, comm_range: float, max_agents: int) -> list[int]:
    """Ego first, then the closest agents whose sensor is within ``comm_range`` (x/y distance, as OpenCOOD)."""
    ego_xy = np.asarray(poses[ego_id][:2], np.float64)
    distances = {a: float(np.hypot(*(np.asarray(p[:2], np.float64) - ego_xy))) for a, p in poses.items() if a != ego_id}
    in_range = sorted((d, a) for a, d in distances.items() if d <= comm_range)
    return [ego_id] + [a for _, a in in_range[: max_agents - 1]]



# --------------------------------------------------------------------------------------------------
# Writing


class FrameStore:
    """One scenario's voxelised frames, each (agent, timestamp) voxelised once and shared by samples."""

    def __init__(self, voxelizer: Voxelizer, target_points_per_cell: int = 0, seed: int = 0):
        self.voxelizer = voxelizer
        self.target_points_per_cell, self.seed = target_points_per_cell, seed
        self._target_points: list[np.ndarray] = []
        self._slot: dict[tuple[int, str], int | None] = {}
        self._agent_ids: list[int] = []
        self._timestamps: list[str] = []
        self._poses: list[np.ndarray] = []
        self._coords: list[np.ndarray] = []
        self._num_points: list[np.ndarray] = []
        self._points: list[np.ndarray] = []

    def __len__(self) -> int:
        return len(self._agent_ids)

    def slot_of(self, reader: ScenarioReader, agent_id: int, timestamp: str) -> int | None:
        """Index of the frame in this store, voxelising it on first use; None if it cannot be read."""
        key = (agent_id, timestamp)
        if key not in self._slot:
            record = reader.with_points(agent_id, timestamp) if reader.has(agent_id, timestamp) else None
            self._slot[key] = None if record is None else self._add(record)
        return self._slot[key]

    def _add(self, record: AgentFrameRecord) -> int:
        voxels, coords, num_points = sort_voxels(*self.voxelizer(record.points), self.voxelizer.grid)
        keep = np.arange(voxels.shape[1])[None, :] < num_points[:, None]
        self._agent_ids.append(int(record.agent_id))
        self._timestamps.append(str(record.timestamp))
        self._poses.append(np.asarray(record.lidar_pose, np.float64))
        self._coords.append(coords.astype(np.int32))
        self._num_points.append(num_points.astype(np.int32))
        self._points.append(voxels[keep].astype(np.float32))  # voxel-grouped, padding dropped
        self._target_points.append(self._target_sample(record))
        return len(self._agent_ids) - 1

    def _target_sample(self, record: AgentFrameRecord) -> np.ndarray:
        """The frame's raw points inside the grid, at most ``target_points_per_cell`` per BEV cell (all
        heights) in the agent's frame, a seeded subsample: the points CooPre's reconstruction targets
        are drawn from, before the per-voxel cap thins dense surfaces."""
        cap = self.target_points_per_cell
        points = np.asarray(record.points, np.float32)[:, :4]
        if cap == 0 or len(points) == 0:
            return np.zeros((0, 4), np.float32)
        grid = self.voxelizer.grid
        points = points[np.isfinite(points).all(axis=1) & grid.contains(points)]
        rows, cols = grid.bev_shape
        row_col = grid.bev_cell_of(points[:, :2]).clip(0, [rows - 1, cols - 1])
        key = f"{self.seed}/{record.agent_id}/{record.timestamp}".encode()
        rng = np.random.default_rng(int.from_bytes(hashlib.sha256(key).digest()[:8], "little"))
        order = rng.permutation(len(points))
        cell = (row_col[:, 0] * cols + row_col[:, 1])[order]
        by_cell = np.argsort(cell, kind="stable")
        sorted_cells = cell[by_cell]
        first = np.searchsorted(sorted_cells, sorted_cells, side="left")
        kept = order[by_cell[np.arange(len(sorted_cells)) - first < cap]]
        return points[np.sort(kept)]

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "agent_ids": np.array(self._agent_ids, np.int64),
            "timestamps": np.array(self._timestamps, dtype=np.str_),
            "lidar_poses": np.array(self._poses, np.float64).reshape(-1, 6),
            "voxel_offsets": ragged_offsets(len(c) for c in self._coords),
            "point_offsets": ragged_offsets(len(p) for p in self._points),
            "coords": concat_or_empty(self._coords, (0, 3), np.int32),
            "num_points": concat_or_empty(self._num_points, (0,), np.int32),
            "points": concat_or_empty(self._points, (0, 4), np.float32),
            "target_offsets": ragged_offsets(len(p) for p in self._target_points),
            "target_points": concat_or_empty(self._target_points, (0, 4), np.float32),
        }


@dataclass
class SampleRecord:
    sample_id: str
    scenario: str
    ego_id: int
    ego_pose: np.ndarray  # (6,)
    frame_slots: list[int]  # into the scenario's frame store
    frame_steps: list[int]
    frame_agent_ids: list[int]
    frame_poses_to_ego: list[np.ndarray]  # (4, 4) each
    labels: Labels



def label_fraction_subsets(sample_ids: Sequence[str], fractions: Iterable[float], seed: int) -> dict[str, list[str]]:
    """Nested, seeded subsets: each fraction takes a prefix of one ranking of the samples.

    The rank of a sample is a hash of (seed, sample id), so it does not depend on which other samples
    exist: adding a scenario leaves the existing samples' membership unchanged except at the cut.
    """
    ranked = sorted(sample_ids, key=lambda sid: hashlib.sha256(f"{seed}:{sid}".encode()).hexdigest())
    position = {sid: i for i, sid in enumerate(sample_ids)}
    subsets = {}
    for fraction in sorted(float(f) for f in fractions):
        count = min(len(ranked), math.ceil(round(fraction * len(ranked), 9)))
        subsets[fraction_key(fraction)] = sorted(ranked[:count], key=position.__getitem__)
    return subsets


class _ScenarioFuser:
    """Turns one scenario into its samples and frame store (no files written, no state across scenarios)."""

    def __init__(self, config: CacheConfig, split: str, voxelizer: Voxelizer):
        self.config = config
        self.split = split
        self.voxelizer = voxelizer
        self.labels = LabelMaker(config.grid, config.classes, config.class_map, config.gt_range_rule)
        self.ego_types = {AGENT_TYPE_NAMES[name] for name in config.ego_types}

    def fuse(self, reader: ScenarioReader) -> tuple[list[SampleRecord], FrameStore, Counter]:
        store, samples, counts = FrameStore(self.voxelizer, self.config.target_points_per_cell, self.config.seed), [], Counter()
        for ego_id in sorted(reader.index.agent_ids):
            if (INFRASTRUCTURE if ego_id < 0 else VEHICLE) not in self.ego_types:
                continue
            anchors = sample_anchors(reader, ego_id, self.config.history, self.config.future, self.config.sample_stride)
            for t in anchors:
                sample = self._make_sample(reader, store, ego_id, t)
                if sample is None:
                    counts["samples_skipped_unreadable_ego"] += 1
                else:
                    samples.append(sample)
        counts["bad_frames"] += reader.bad_frames
        return samples, store, counts

    def _make_sample(self, reader: ScenarioReader, store: FrameStore, ego_id: int, t: int) -> SampleRecord | None:
        cfg = self.config
        timeline = reader.timeline
        history_stamps = timeline[t - cfg.history + 1 : t + 1]
        future_stamps = timeline[t + 1 : t + cfg.future + 1]
        now = timeline[t]
        if any(reader.meta(ego_id, stamp) is None for stamp in history_stamps + future_stamps):
            return None  # an unreadable ego frame (on_bad_frame="skip") means the ego is not there
        ego_meta = reader.meta(ego_id, now)
        readable_now = {a: reader.meta(a, now) for a in reader.index.agent_ids}
        poses_now = {a: record.lidar_pose for a, record in readable_now.items() if record is not None}
        cooperators = select_cooperators(poses_now, ego_id, cfg.comm_range, cfg.max_agents)
        frames = self._agent_frames(reader, store, cooperators, history_stamps, ego_meta.lidar_pose)
        if sorted(step for step, agent, *_ in frames if agent == ego_id) != list(range(cfg.history)):
            return None  # the ego's own LiDAR is what every fusion mode needs
        labels = self._labels(reader, cooperators, ego_meta.lidar_pose, now, history_stamps, future_stamps)
        return SampleRecord(
            sample_id=f"{self.split}/{reader.index.name}/{ego_id}/{now}",
            scenario=reader.index.name, ego_id=ego_id, ego_pose=np.asarray(ego_meta.lidar_pose, np.float64),
            frame_slots=[f[2] for f in frames], frame_steps=[f[0] for f in frames],
            frame_agent_ids=[f[1] for f in frames], frame_poses_to_ego=[f[3] for f in frames], labels=labels,
        )

    def _agent_frames(self, reader: ScenarioReader, store: FrameStore, cooperators: list[int],
                      history_stamps: list[str], ego_pose_now: np.ndarray) -> list[tuple[int, int, int, np.ndarray]]:
        """(step, agent id, store slot, pose_to_ego) of every readable cooperator frame in the history."""
        frames = []
        for step, stamp in enumerate(history_stamps):
            for agent_id in cooperators:
                meta = reader.meta(agent_id, stamp)
                slot = store.slot_of(reader, agent_id, stamp) if meta is not None else None
                if slot is not None:
                    frames.append((step, agent_id, slot, relative_transform(meta.lidar_pose, ego_pose_now)))
        return frames

    def _labels(self, reader: ScenarioReader, cooperators: list[int], ego_pose: np.ndarray, now: str,
                history_stamps: list[str], future_stamps: list[str]) -> Labels:
        # Labels at t come from what the cooperators annotate; tracks use every agent's annotations
        # (cooperators first, so a track's state at t matches its label box) for the fullest ground truth.
        others = sorted(set(reader.index.agent_ids) - set(cooperators))
        order = cooperators + others
        at = {stamp: object_union(reader.meta(a, stamp) for a in order) for stamp in history_stamps + future_stamps}
        current = object_union(reader.meta(a, now) for a in cooperators)
        return self.labels.make(ego_pose, current, [at[s] for s in history_stamps], [at[s] for s in future_stamps])


class _CacheBuilder:
    """Collects scenario results in order and writes the shards and the manifest."""

    def __init__(self, config: CacheConfig, split: str, split_dir: Path, shard_size: int):
        self.config = config
        self.split = split
        self.split_dir = split_dir
        self.shard_size = shard_size
        self.pending: list[SampleRecord] = []
        self.sample_ids: list[str] = []
        self.shards: list[dict] = []
        self.frame_stores: dict[str, str] = {}
        self.counts = Counter()
        self.class_counts = Counter()
        self.unknown_types = Counter()
        self.skipped_by_field: dict[str, int] = {}

    def add_result(self, result: ScenarioResult) -> None:
        for sample in result.samples:
            self._append(sample)
        self.counts.update(result.counts)
        self.unknown_types.update(result.unknown_types)
        if result.frame_store is not None:
            if result.frame_store in self.frame_stores.values():
                raise ValueError(f"two scenarios map to the frame store file {result.frame_store}; rename one of them")
            self.frame_stores[result.scenario] = result.frame_store

    def _append(self, sample: SampleRecord) -> None:
        self.pending.append(sample)
        self.sample_ids.append(sample.sample_id)
        for cls in sample.labels.classes:
            self.class_counts[self.config.classes[cls]] += 1
        if len(self.pending) == self.shard_size:
            self._flush_shard()

    def _flush_shard(self) -> None:
        name = f"samples-{len(self.shards):05d}.npz"
        write_npz(self.split_dir / name, **shard_arrays(self.pending))
        self.shards.append({"file": name, "count": len(self.pending)})
        self.pending = []

    def finish(self, skipped_by_field: dict[str, int] | None = None) -> dict:
        """Write the last shard, then the manifest (last of all); returns the summary."""
        self.skipped_by_field = dict(skipped_by_field or {})
        if self.pending:
            self._flush_shard()
        self.split_dir.mkdir(parents=True, exist_ok=True)
        written = [s["file"] for s in self.shards] + sorted(self.frame_stores.values())
        _remove_stale_files(self.split_dir, set(written))
        manifest = self._manifest(written)
        write_json(self.split_dir / MANIFEST_NAME, manifest)
        return {"manifest": str(self.split_dir / MANIFEST_NAME), "config_hash": manifest["config_hash"],
                **manifest["counts"], "skipped": manifest["skipped"]}

    def _manifest(self, written: list[str]) -> dict:
        config_json = self.config.to_json()
        return {
            "format_version": CACHE_FORMAT_VERSION,
            "split": self.split,
            "config": config_json,
            "config_hash": cache_config_digest(config_json),
            "sample_ids": self.sample_ids,
            "shards": self.shards,
            "frame_stores": self.frame_stores,
            "counts": {
                "samples": len(self.sample_ids),
                "scenarios_with_samples": len(self.frame_stores),
                "frames": self.counts["frames"],
                "points": self.counts["points"],
                "voxels": self.counts["voxels"],
                "objects_per_class": {name: self.class_counts[name] for name in self.config.classes},
            },
            "skipped": {
                "bad_frames": self.counts["bad_frames"],
                "bad_inputs_by_field": self.skipped_by_field,
                "samples_without_ego_frames": self.counts["samples_skipped_unreadable_ego"],
                # per sample an object of an unknown type was dropped from
                "unknown_object_types": dict(sorted(self.unknown_types.items())),
            },
            "files": {name: sha256_file(self.split_dir / name) for name in written},
            "label_fractions": label_fraction_subsets(self.sample_ids, self.config.label_fractions, self.config.seed),
        }


def _remove_stale_files(split_dir: Path, keep: set[str]) -> None:
    """Drop cache files of an earlier run that this run did not write (they would not be in the manifest)."""
    for path in split_dir.glob("*.npz"):
        if (path.name.startswith("frames-") or path.name.startswith("samples-")) and path.name not in keep:
            path.unlink()


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)

