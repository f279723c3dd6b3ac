"""The training Dataset over a fusion cache (see :mod:`turbotrain.data.cache`) and its DataLoader.

Fusion modes decide which agent-frames a :class:`~turbotrain.data.sample.Sample` holds:

* ``intermediate`` - every cooperating agent-frame, each in its own sensor frame with ``pose_to_ego``;
* ``none`` - the ego's own agent-frames only;
* ``points_first`` - the agent-frames of ``intermediate``, each agent's points first moved into the
  ego frame at t and re-voxelised there (identity ``pose_to_ego``): OpenCOOD's ``proj_first: true``;
* ``early`` - per history step one agent-frame: all agents' points moved into the ego frame at t,
  concatenated and re-voxelised on ``grid`` (identity ``pose_to_ego``, ``agent_id`` = the ego's);
* ``tracks`` - no agent-frames at all: the labels and the objects' tracks only (trajectory
  pretraining reads no LiDAR).
"""
from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from turbotrain.data.augment import GlobalAugmentation, conjugate_pose
from turbotrain.data.cache.format import MANIFEST_NAME, MappedNpz, fraction_key, load_manifest, verify_cache_files
from turbotrain.data.records import INFRASTRUCTURE, VEHICLE
from turbotrain.data.sample import AgentFrame, Sample, collate
from turbotrain.data.voxelize import Voxelizer
from turbotrain.geometry import transform_points
from turbotrain.grid import Grid
from turbotrain.utils.errors import ConfigError, DataError
from turbotrain.utils.seed import seed_worker

FusionMode = Literal["intermediate", "points_first", "early", "none", "tracks"]
FUSION_MODES = ("intermediate", "points_first", "early", "none", "tracks")


@dataclass(frozen=True)
class _FrameRef:
    slot: int  # into the scenario's frame store
    step: int  # already shifted to the dataset's history length
    agent_id: int
    pose_to_ego: np.ndarray


class FusedDataset(Dataset):
    """``len()`` samples of a cache split; ``dataset[i]`` is a :class:`Sample`."""

    def __init__(
        self,
        cache_dir: str | Path,
        split: str,
        fusion_mode: FusionMode = "intermediate",
        label_fraction: float = 1.0,
        history: int | None = None,
        grid: Grid | None = None,
        max_points_per_voxel: int | None = None,
        max_voxels: int | None = None,
        voxel_backend: str = "auto",
        verify_checksums: bool = False,
        expected_config_hash: str | None = None,
        augmentation: GlobalAugmentation | None = None,
        augmentation_seed: int = 0,
        target_points: bool = False,
    ):
        """``history``: use the most recent steps of the cached ones; ``grid`` / ``max_*``: early fusion's
        re-voxelisation (default: the cache's grid and points per voxel, and room for every agent's voxels).
        ``augmentation``: a global augmentation of the LiDAR drawn per (``augmentation_seed``, epoch,
        sample); the dataset is then indexed by ``epoch * len(dataset) + i`` (:attr:`epoch_keyed`).
        ``target_points``: every frame also carries the cache's raw target points, moved as its voxels
        (masked-reconstruction pretraining)."""
        if fusion_mode not in FUSION_MODES:
            raise ConfigError(f"fusion_mode must be one of {', '.join(FUSION_MODES)}, got {fusion_mode!r}")
        self.split_dir = Path(cache_dir) / split
        self.fusion_mode = fusion_mode
        self.manifest = load_manifest(self.split_dir, expected_config_hash)
        if verify_checksums:
            verify_cache_files(self.split_dir, self.manifest)
        cfg = self.manifest["config"]
        self.cached_history = int(cfg["history"])
        self.history = self.cached_history if history is None else int(history)
        if not 1 <= self.history <= self.cached_history:
            raise ConfigError(f"history must be in 1..{self.cached_history} (the cached steps), got {history}")
        self.max_points_per_voxel = int(cfg["max_points_per_voxel"])
        self.grid = grid or Grid.from_config(cfg["grid"])
        # A fused cloud holds up to max_agents agents' voxels; the per-agent cap would drop points.
        self.early_voxelizer = Voxelizer(
            self.grid,
            max_points_per_voxel or self.max_points_per_voxel,
            max_voxels or int(cfg["max_voxels"]) * int(cfg["max_agents"]),
            voxel_backend,
        )
        # points_first: one agent's cloud in the ego frame, under the cache's per-agent caps
        self.agent_voxelizer = Voxelizer(self.grid, self.max_points_per_voxel, int(cfg["max_voxels"]), voxel_backend)
        self.augmentation, self.augmentation_seed = augmentation, int(augmentation_seed)
        self.target_points = bool(target_points)
        self._rows = self._select_rows(label_fraction)
        self._shards: dict[int, dict[str, np.ndarray]] = {}
        self._stores: dict[str, MappedNpz] = {}

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def epoch_keyed(self) -> bool:
        """Whether indices carry the epoch (``epoch * len + i``): the engine's sampler then passes it."""
        return self.augmentation is not None and self.fusion_mode != "tracks"

    def __getitem__(self, i: int) -> Sample:
        epoch = 0
        if self.epoch_keyed and i >= len(self):
            epoch, i = divmod(i, len(self))
        shard, row = self._locate(i)
        if self.fusion_mode == "tracks":
            return self._sample(shard, row, [])
        refs = self._frame_refs(shard, row)
        ego_id = int(shard["ego_ids"][row])
        if self.epoch_keyed:
            return self._sample(shard, row, self._augmented_frames(shard, row, refs, ego_id, epoch, i))
        if self.fusion_mode == "none":
            frames = [self._agent_frame(shard, row, ref) for ref in refs if ref.agent_id == ego_id]
        elif self.fusion_mode == "intermediate":
            frames = [self._agent_frame(shard, row, ref) for ref in refs]
        elif self.fusion_mode == "points_first":
            frames = [self._projected_frame(shard, row, ref) for ref in refs]
        else:
            frames = [self._early_frame(shard, row, refs, step, ego_id) for step in range(self.history)]
        return self._sample(shard, row, frames)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_shards": {}, "_stores": {}}

    def sample_id(self, i: int) -> str:
        shard, row = self._locate(i)
        return str(shard["sample_ids"][row])

    def early_fused_points(self, i: int, step: int) -> np.ndarray:
        """(N, 5) all agents' points at ``step`` in the ego frame at t; column 4 is the agent slot (0 = ego)."""
        shard, row = self._locate(i)
        return self._fused_points(shard, row, self._frame_refs(shard, row), step)

    # -- indexing

    def _select_rows(self, label_fraction: float) -> list[tuple[int, int]]:
        subsets = self.manifest["label_fractions"]
        key = fraction_key(label_fraction)
        if key not in subsets:
            raise DataError(self.split_dir / MANIFEST_NAME, "label_fractions", f"a subset for {key} (one of {sorted(subsets)})", key)
        shard_and_row = [(k, r) for k, shard in enumerate(self.manifest["shards"]) for r in range(int(shard["count"]))]
        where = dict(zip(self.manifest["sample_ids"], shard_and_row))
        return [where[sid] for sid in subsets[key]]

    def _locate(self, i: int) -> tuple[dict[str, np.ndarray], int]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples")
        k, row = self._rows[i]
        if k not in self._shards:
            path = self.split_dir / self.manifest["shards"][k]["file"]
            if not path.is_file():
                raise DataError(path, "file", "a sample shard listed in the manifest", "(missing)")
            with np.load(path, allow_pickle=False) as archive:
                self._shards[k] = {name: archive[name] for name in archive.files}
        return self._shards[k], row

    def _store(self, scenario: str) -> MappedNpz:
        if scenario not in self._stores:
            self._stores[scenario] = MappedNpz(self.split_dir / self.manifest["frame_stores"][scenario])
        return self._stores[scenario]

    def _frame_refs(self, shard: dict, row: int) -> list[_FrameRef]:
        """The sample's cached agent-frames within the used history, steps renumbered to 0 .. history-1."""
        lo, hi = shard["frame_offsets"][row], shard["frame_offsets"][row + 1]
        dropped_steps = self.cached_history - self.history
        return [
            _FrameRef(int(shard["frame_slots"][j]), int(shard["frame_steps"][j]) - dropped_steps,
                      int(shard["frame_agent_ids"][j]), shard["frame_poses_to_ego"][j])
            for j in range(lo, hi)
            if shard["frame_steps"][j] >= dropped_steps
        ]

    # -- frames

    def _agent_frame(self, shard: dict, row: int, ref: _FrameRef) -> AgentFrame:
        scenario = str(shard["scenarios"][row])
        voxels, coords, num_points = self._stored_voxels(scenario, ref.slot)
        return AgentFrame(voxels=voxels, num_points=num_points, coords=coords, pose_to_ego=ref.pose_to_ego.copy(),
                          agent_id=ref.agent_id, agent_type=_agent_type(ref.agent_id), step=ref.step,
                          target_points=self._targets(scenario, ref.slot, np.eye(4)))

    def _augmented_frames(self, shard: dict, row: int, refs: list[_FrameRef], ego_id: int, epoch: int,
                          i: int) -> list[AgentFrame]:
        """The mode's frames with the sample's global augmentation ``A`` applied before voxelising:
        early / points-first clouds (ego frame) get ``A``; own-frame agents get ``A`` on their points
        and ``A P A^-1`` as their pose (data/augment.py)."""
        A = self.augmentation.draw(self.augmentation_seed, epoch, i)
        if self.fusion_mode == "early":
            return [self._early_frame(shard, row, refs, step, ego_id, A) for step in range(self.history)]
        if self.fusion_mode == "none":
            refs = [ref for ref in refs if ref.agent_id == ego_id]
        frames = []
        for ref in refs:
            if self.fusion_mode == "points_first":
                moved, pose = A @ ref.pose_to_ego, np.eye(4)
            else:
                moved, pose = A, conjugate_pose(A, ref.pose_to_ego)
            scenario = str(shard["scenarios"][row])
            points = transform_points(self._stored_points(scenario, ref.slot), moved)
            frames.append(self._voxelised_frame(points, pose, ref, self._targets(scenario, ref.slot, moved)))
        return frames

    def _voxelised_frame(self, points: np.ndarray, pose_to_ego: np.ndarray, ref: _FrameRef,
                         target_points: np.ndarray | None = None) -> AgentFrame:
        voxels, coords, num_points = self.agent_voxelizer(points)
        return AgentFrame(voxels=voxels, num_points=num_points, coords=coords, pose_to_ego=pose_to_ego,
                          agent_id=ref.agent_id, agent_type=_agent_type(ref.agent_id), step=ref.step,
                          target_points=target_points)

    def _projected_frame(self, shard: dict, row: int, ref: _FrameRef) -> AgentFrame:
        """The agent's cached points moved into the ego frame at t, voxelised there (identity pose)."""
        scenario = str(shard["scenarios"][row])
        points = transform_points(self._stored_points(scenario, ref.slot), ref.pose_to_ego)
        return self._voxelised_frame(points, np.eye(4), ref, self._targets(scenario, ref.slot, ref.pose_to_ego))

    def _early_frame(self, shard: dict, row: int, refs: list[_FrameRef], step: int, ego_id: int,
                     augmentation: np.ndarray | None = None) -> AgentFrame:
        points = self._fused_points(shard, row, refs, step)[:, :4]
        if augmentation is not None:
            points = transform_points(points, augmentation)
        voxels, coords, num_points = self.early_voxelizer(points)
        targets = None
        if self.target_points:
            moved = np.eye(4) if augmentation is None else augmentation
            scenario = str(shard["scenarios"][row])
            targets = np.concatenate([np.zeros((0, 4), np.float32)] + [
                self._targets(scenario, ref.slot, moved @ ref.pose_to_ego) for ref in refs if ref.step == step])
        return AgentFrame(voxels=voxels, num_points=num_points, coords=coords, pose_to_ego=np.eye(4),
                          agent_id=ego_id, agent_type=_agent_type(ego_id), step=step, target_points=targets)

    def _fused_points(self, shard: dict, row: int, refs: list[_FrameRef], step: int) -> np.ndarray:
        scenario = str(shard["scenarios"][row])
        slots = _agent_slots(int(shard["ego_ids"][row]), refs)
        parts = [np.zeros((0, 5), np.float32)]
        for ref in sorted((r for r in refs if r.step == step), key=lambda r: slots[r.agent_id]):
            points = transform_points(self._stored_points(scenario, ref.slot), ref.pose_to_ego)
            parts.append(np.hstack([points, np.full((len(points), 1), slots[ref.agent_id], np.float32)]))
        return np.concatenate(parts)

    def _stored_points(self, scenario: str, slot: int) -> np.ndarray:
        store = self._store(scenario)
        lo, hi = store["point_offsets"][slot], store["point_offsets"][slot + 1]
        return np.array(store["points"][lo:hi], np.float32)

    def _targets(self, scenario: str, slot: int, transform: np.ndarray) -> np.ndarray | None:
        """The frame's raw target points under ``transform`` (None unless ``target_points``)."""
        if not self.target_points:
            return None
        store = self._store(scenario)
        lo, hi = store["target_offsets"][slot], store["target_offsets"][slot + 1]
        return transform_points(np.array(store["target_points"][lo:hi], np.float32), transform)

    def _stored_voxels(self, scenario: str, slot: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(V, P, 4) zero-padded voxels rebuilt from the store's voxel-grouped points."""
        store = self._store(scenario)
        v_lo, v_hi = store["voxel_offsets"][slot], store["voxel_offsets"][slot + 1]
        num_points = np.array(store["num_points"][v_lo:v_hi], np.int32)
        coords = np.array(store["coords"][v_lo:v_hi], np.int32)
        points = self._stored_points(scenario, slot)
        voxel_of_point = np.repeat(np.arange(len(num_points)), num_points)
        slot_in_voxel = np.arange(len(points)) - np.repeat(np.cumsum(num_points) - num_points, num_points)
        voxels = np.zeros((len(num_points), self.max_points_per_voxel, 4), np.float32)
        voxels[voxel_of_point, slot_in_voxel] = points
        return voxels, coords, num_points

    # -- labels

    def _sample(self, shard: dict, row: int, frames: list[AgentFrame]) -> Sample:
        lo, hi = shard["box_offsets"][row], shard["box_offsets"][row + 1]
        return Sample(
            sample_id=str(shard["sample_ids"][row]),
            frames=frames,
            boxes=shard["boxes"][lo:hi].copy(),
            classes=shard["classes"][lo:hi].copy(),
            track_ids=shard["track_ids"][lo:hi].copy(),
            history=shard["history"][lo:hi, -self.history :].copy(),
            history_valid=shard["history_valid"][lo:hi, -self.history :].copy(),
            future=shard["future"][lo:hi].copy(),
            future_valid=shard["future_valid"][lo:hi].copy(),
        )


class UnionDataset(Dataset):
    """Several :class:`FusedDataset` s (e.g. cross-dataset pretraining data) read as one, in order.

    Like ``torch.utils.data.ConcatDataset``: index ``i`` runs through the first member's samples,
    then the second's, and so on. Every member's ``class_map`` was applied when it was fused, so
    the members' class indices already refer to one ``classes`` list; the union checks that they
    were fused with the same list (and with grids, history/future lengths, voxel capacities and
    fusion modes that batch together) and only concatenates. ``sources`` names each member
    (default: its cache folder's name, ``<cache.root>/<dataset>/<split>`` -> ``<dataset>``).
    """

    # manifest config keys whose values must agree for samples of different members to batch together
    _SAME_CONFIG = ("classes", "grid", "future", "max_points_per_voxel")

    def __init__(self, datasets: Sequence[FusedDataset], sources: Sequence[str] | None = None):
        self.datasets = list(datasets)
        if not self.datasets:
            raise ConfigError("UnionDataset needs at least one dataset")
        self.sources = [d.split_dir.parent.name for d in self.datasets] if sources is None else [str(s) for s in sources]
        if len(self.sources) != len(self.datasets):
            raise ConfigError(f"UnionDataset: {len(self.sources)} source names for {len(self.datasets)} datasets")
        if len(set(self.sources)) != len(self.sources):
            raise ConfigError(f"UnionDataset: source names must be unique, got {self.sources} "
                              "(pass sources=... when two caches share a folder name)")
        first = self.datasets[0]
        for other in self.datasets[1:]:
            _check_compatible(first, other)
        self.classes = list(first.manifest["config"]["classes"])
        self.cumulative_sizes = np.cumsum([len(d) for d in self.datasets]).tolist()

    def __len__(self) -> int:
        return self.cumulative_sizes[-1]

    @property
    def epoch_keyed(self) -> bool:
        return any(getattr(d, "epoch_keyed", False) for d in self.datasets)

    def __getitem__(self, i: int) -> Sample:
        epoch = 0
        if self.epoch_keyed and i >= len(self):
            epoch, i = divmod(i, len(self))
        member, j = self.locate(i)
        dataset = self.datasets[member]
        return dataset[epoch * len(dataset) + j if getattr(dataset, "epoch_keyed", False) else j]

    def locate(self, i: int) -> tuple[int, int]:
        """(member index, index within that member) of union index ``i`` (negative indices allowed)."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples")
        i = i + len(self) if i < 0 else i
        member = bisect.bisect_right(self.cumulative_sizes, i)
        return member, i - (self.cumulative_sizes[member - 1] if member else 0)

    def source_of(self, i: int) -> str:
        """Name of the dataset sample ``i`` comes from."""
        return self.sources[self.locate(i)[0]]

    def sample_id(self, i: int) -> str:
        """The member's sample id (``<split>/<scenario>/<ego_id>/<t>``; ids may repeat across sources)."""
        member, j = self.locate(i)
        return self.datasets[member].sample_id(j)


def _check_compatible(a: FusedDataset, b: FusedDataset) -> None:
    """ConfigError naming both cache folders unless samples of ``a`` and ``b`` mean the same and batch together."""
    ca, cb = a.manifest["config"], b.manifest["config"]
    for key in UnionDataset._SAME_CONFIG:
        if ca[key] != cb[key]:
            hint = (" (map each dataset's types onto the same `classes` with its dataset's class_map and fuse again)"
                    if key == "classes" else "")
            raise ConfigError(f"UnionDataset: {a.split_dir} was fused with {key} {ca[key]} but {b.split_dir} "
                              f"with {key} {cb[key]}{hint}")
    for attr in ("history", "fusion_mode"):
        if getattr(a, attr) != getattr(b, attr):
            raise ConfigError(f"UnionDataset: {a.split_dir} is read with {attr} {getattr(a, attr)!r} but "
                              f"{b.split_dir} with {getattr(b, attr)!r}")


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int, num_workers: int = 0) -> DataLoader:
    """DataLoader over ``dataset`` with :func:`collate`; the shuffle order depends on ``seed`` only."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collate, num_workers=num_workers,
        generator=generator, worker_init_fn=seed_worker,
    )


def _agent_type(agent_id: int) -> int:
    return INFRASTRUCTURE if agent_id < 0 else VEHICLE


def _agent_slots(ego_id: int, refs: list[_FrameRef]) -> dict[int, int]:
    """Ego 0, other agents 1.. by ascending id (the slots :func:`collate` assigns)."""
    others = sorted({r.agent_id for r in refs} - {ego_id})
    return {ego_id: 0, **{a: i + 1 for i, a in enumerate(others)}}
