"""``turbotrain generate``: write a synthetic V2X dataset in the OpenCOOD / V2XPnP-Seq layout.

Per scenario: a layout (:mod:`.scene`), traffic warmed up before recording (:mod:`.traffic`), then
``frames`` frames at 10 Hz in which every agent -- 1-2 infrastructure LiDARs on poles (ids -1, -2)
and 1-3 connected vehicles (ids 1, 2, 3) -- scans the scene (:mod:`.lidar`) and lists the objects
within ``object_range`` of it. A connected vehicle is also an object of the scene: its track id
equals its agent id, it appears in the other agents' labels and in ``trajectories.csv``, never in its
own labels. Parked cars are labelled ``car`` (a detector must find them); buildings are not objects.
``obj_type_names`` (e.g. ``{car: vehicle, truck: bus}``) renames the types written into the labels and
``trajectories.csv``, so a second synthetic dataset can speak another class vocabulary, as real
datasets do (the fusion stage maps it back with ``class_map``); the scenes and clouds stay the same.

Determinism: every scenario draws from its own ``np.random.SeedSequence(seed, spawn_key=...)`` keyed
by split name and index, split into independent streams for layout, traffic and sensor noise, so
the same seed gives byte-identical files whatever the number of workers, and changing a sensor
setting leaves the traffic unchanged.

Tilt and map height (both off by default) make the data look like real V2X-Real / V2XPnP-Seq poses:
``sensor_tilt_deg`` mounts every LiDAR with a roll and a pitch drawn uniformly in
``[-sensor_tilt_deg, sensor_tilt_deg]`` (per sensor, from a stream of its own, so the scene and the
noise do not change), and ``map_height`` lifts the map frame's ground to that height. The written
``lidar_pose`` carries the roll, pitch and height, the objects' ``location`` the height, and every
point is expressed in its sensor's tilted frame. The beam pattern is cast level (as from a
self-levelling mount) and the returns are then rotated into the tilted frame, so a tilted dataset is
its untilted twin's world seen through other poses, exactly; the ray caster stays level-only.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import multiprocessing
import os
import shutil
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from turbotrain.data.opencood import write_agent_frame, write_scenario_meta
from turbotrain.data.records import AgentFrameRecord, ObjectRecord
from turbotrain.data.synth.lidar import BUILDING, MATERIAL_OF_TYPE, LidarSpec, scan
from turbotrain.data.synth.scene import Scene, SceneParams, build_scene, stratified_kinds
from turbotrain.data.synth.traffic import OBJECT_SIZES, Actor, TrafficParams, TrafficSimulator
from turbotrain.geometry import pose_to_matrix
from turbotrain.utils.atomic import write_json
from turbotrain.utils.errors import ConfigError

logger = logging.getLogger(__name__)

SUMMARY_FILE = "synth_summary.json"
# ~6-7k returns per sweep: dense enough for 0.1 m voxels near the sensor, light enough for CPU training.
VEHICLE_LIDAR = {"beams": 16, "vertical_fov": (-15.0, 5.0), "horizontal_resolution": 0.8, "max_range": 100.0}
INFRASTRUCTURE_LIDAR = {"beams": 24, "vertical_fov": (-25.0, 3.0), "horizontal_resolution": 1.0, "max_range": 120.0}
MAX_SENSOR_TILT_DEG = 10.0  # "a few degrees", as real mounts and road grades give
# Generation settings added after data was first generated: the summary lists them only when set, so
# data generated without them stays byte-identical, summary included.
MOUNT_DEFAULTS = {"sensor_tilt_deg": 0.0, "map_height": 0.0}

PRESETS: dict[str, dict[str, Any]] = {
    # Seconds to generate: unit and integration tests.
    "smoke": {
        "splits": {"train": 2, "val": 1, "test": 1},
        "frames": 30,
        "warmup_s": 10.0,
        "scene": {"arm_length": 60.0},
        "vehicle_lidar": {"beams": 8, "horizontal_resolution": 2.0, "max_range": 80.0},
        "infrastructure_lidar": {"beams": 12, "horizontal_resolution": 2.0, "max_range": 80.0},
    },
    # A few minutes: benchmarks and quick end-to-end checks.
    "mini": {"splits": {"train": 4, "val": 1, "test": 1}, "frames": 80},
    # A few thousand (vehicle ego, timestamp) samples; CPU-trainable point counts (~4-8k per sensor).
    "default": {"splits": {"train": 14, "val": 3, "test": 3}, "frames": 180},
}

BASE_CONFIG: dict[str, Any] = {
    "splits": {"train": 2, "val": 1, "test": 1},
    "frames": 180,
    "warmup_s": 20.0,
    "object_range": 100.0,
    "binary_pcd": True,
    "workers": 1,
    "agents": {},
    "scene": {},
    "traffic": {},
    "vehicle_lidar": VEHICLE_LIDAR,
    "infrastructure_lidar": INFRASTRUCTURE_LIDAR,
    "obj_type_names": {},  # generator type (car | truck | pedestrian) -> the obj_type written; default: itself
    "sensor_tilt_deg": 0.0,  # each LiDAR's roll and pitch are drawn in [-this, this] degrees
    "map_height": 0.0,  # metres: the map frame's ground height (real maps sit tens of metres up)
}


@dataclass(frozen=True)
class AgentParams:
    infrastructure: tuple[int, int] = (1, 2)  # inclusive range of poles per scenario
    vehicles: tuple[int, int] = (1, 3)  # inclusive range of connected vehicles
    pole_height: tuple[float, float] = (4.0, 6.0)
    roof_height: float = 1.9  # LiDAR above ground on a connected vehicle


@dataclass(frozen=True)
class GenerationConfig:
    splits: dict[str, int]
    frames: int
    warmup_s: float
    object_range: float
    binary_pcd: bool
    workers: int
    agents: AgentParams
    scene: SceneParams
    traffic: TrafficParams
    vehicle_lidar: LidarSpec
    infrastructure_lidar: LidarSpec
    obj_type_names: dict[str, str] = dataclasses.field(default_factory=dict)
    sensor_tilt_deg: float = 0.0
    map_height: float = 0.0

    def written_type(self, obj_type: str) -> str:
        """The ``obj_type`` the files carry for a generator type."""
        return self.obj_type_names.get(obj_type, obj_type)


# ----------------------------------------------------------------------------- configuration


def resolve_config(preset: str | dict = "smoke", overrides: dict | None = None) -> GenerationConfig:
    """Merge ``BASE_CONFIG`` <- preset <- overrides and validate it (unknown keys raise ConfigError).

    Nested sections (``scene``, ``traffic``, ``agents``, ``*_lidar``) merge key by key; ``splits``
    is replaced as a whole, so ``{"splits": {"train": 1}}`` generates a train split only.
    """
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ConfigError(f"unknown synthetic preset {preset!r}; choose one of {sorted(PRESETS)}")
        preset = PRESETS[preset]
    merged = _deep_merge(_deep_merge(BASE_CONFIG, preset, "preset"), overrides or {}, "overrides")
    nested = {
        "agents": AgentParams, "scene": SceneParams, "traffic": TrafficParams,
        "vehicle_lidar": LidarSpec, "infrastructure_lidar": LidarSpec,
    }
    values = {key: _dataclass_from(cls, merged[key], key) for key, cls in nested.items()}
    splits = {str(k): int(v) for k, v in merged["splits"].items()}
    if not splits or any(n < 0 for n in splits.values()) or int(merged["frames"]) < 1:
        raise ConfigError(f"need split sizes >= 0 and frames >= 1, got splits={splits}, frames={merged['frames']}")
    return GenerationConfig(
        splits=splits, frames=int(merged["frames"]), warmup_s=float(merged["warmup_s"]),
        object_range=float(merged["object_range"]), binary_pcd=bool(merged["binary_pcd"]),
        workers=max(int(merged["workers"]), 1), obj_type_names=_obj_type_names(merged["obj_type_names"]),
        **_mount(merged), **values,
    )


def _mount(merged: dict) -> dict[str, float]:
    """Validated ``sensor_tilt_deg`` (0 .. MAX_SENSOR_TILT_DEG) and ``map_height`` (finite metres)."""
    try:
        tilt, height = float(merged["sensor_tilt_deg"]), float(merged["map_height"])
    except (TypeError, ValueError) as err:
        raise ConfigError(f"sensor_tilt_deg and map_height: expected numbers, got {merged['sensor_tilt_deg']!r}, "
                          f"{merged['map_height']!r}") from err
    if not 0.0 <= tilt <= MAX_SENSOR_TILT_DEG:
        raise ConfigError(f"sensor_tilt_deg: expected 0 .. {MAX_SENSOR_TILT_DEG} degrees, got {tilt}")
    if not np.isfinite(height):
        raise ConfigError(f"map_height: expected a finite height in metres, got {height}")
    return {"sensor_tilt_deg": tilt, "map_height": height}


def _obj_type_names(names: Any) -> dict[str, str]:
    """Validated ``obj_type_names``: keys are generator types, values non-empty names."""
    if not isinstance(names, dict):
        raise ConfigError(f"obj_type_names: expected a mapping such as {{car: vehicle}}, got {names!r}")
    unknown = sorted(set(names) - set(OBJECT_SIZES))
    if unknown:
        raise ConfigError(f"obj_type_names: unknown object type(s) {unknown}; the generator writes {sorted(OBJECT_SIZES)}")
    bad = {k: v for k, v in names.items() if not isinstance(v, str) or not v.strip()}
    if bad:
        raise ConfigError(f"obj_type_names: expected non-empty names, got {bad}")
    return dict(sorted(names.items()))


def _deep_merge(base: dict, update: dict, where: str) -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if key not in out:
            raise ConfigError(f"{where}: unknown synthetic-data setting {key!r}; known: {sorted(out)}")
        if isinstance(out[key], dict) and isinstance(value, dict) and key != "splits":
            out[key] = {**out[key], **copy.deepcopy(value)}
        else:
            out[key] = copy.deepcopy(value)
    return out


def _dataclass_from(cls, values: dict, where: str):
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {unknown}; known: {sorted(known)}")
    # YAML configs give lists where the dataclasses hold (hashable) tuples.
    cleaned = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    try:
        return cls(**cleaned)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from err


def config_to_dict(config: GenerationConfig) -> dict:
    """A JSON-ready view of the settings that shape the data (for the summary file).

    ``workers`` is left out: it changes how fast the files appear, never what they hold, and the
    summary must be byte-identical however many workers wrote the data.
    """
    values = dataclasses.asdict(config)
    values.pop("workers")
    for key, default in MOUNT_DEFAULTS.items():
        if values[key] == default:
            values.pop(key)
    return values


# ----------------------------------------------------------------------------- sensors


@dataclass
class SensorAgent:
    """One LiDAR: on a pole (``site`` = x, y, yaw) or on a connected vehicle's roof."""

    agent_id: int
    spec: LidarSpec
    height: float
    site: np.ndarray | None = None
    vehicle: Actor | None = None
    tilt_deg: tuple[float, float] = (0.0, 0.0)  # mount roll, pitch

    def pose(self) -> np.ndarray:
        """Level OpenCOOD ``[x, y, z, roll, yaw, pitch]`` (degrees) over the ground ``z = 0``: what the
        ray caster scans from (the written pose is :meth:`mounted_pose`)."""
        if self.vehicle is not None:
            box = self.vehicle.box()
            x, y, yaw = box[0], box[1], box[6]
        else:
            x, y, yaw = self.site
        return np.array([x, y, self.height, 0.0, np.degrees(yaw), 0.0])

    def mounted_pose(self, level_pose: np.ndarray, map_height: float) -> np.ndarray:
        """The pose the files carry: ``level_pose`` with the mount's roll and pitch, lifted by ``map_height``."""
        x, y, z, _, yaw, _ = level_pose
        roll, pitch = self.tilt_deg
        return np.array([x, y, z + map_height, roll, yaw, pitch])

    def speed(self) -> float:
        return 0.0 if self.vehicle is None else float(self.vehicle.v)

    @property
    def own_track(self) -> int | None:
        return None if self.vehicle is None else self.vehicle.track_id


def place_agents(
    config: GenerationConfig, scene: Scene, sim: TrafficSimulator, rng: np.random.Generator,
) -> list[SensorAgent]:
    """Poles on the scene's best sites (ids -1, -2, ...) and connected cars (ids 1, 2, ...)."""
    n_poles = int(rng.integers(config.agents.infrastructure[0], config.agents.infrastructure[1] + 1))
    n_poles = min(n_poles, len(scene.infrastructure_sites))
    n_cars = int(rng.integers(config.agents.vehicles[0], config.agents.vehicles[1] + 1))
    agents = []
    for i in range(n_poles):
        height = float(rng.uniform(*config.agents.pole_height))
        agents.append(SensorAgent(-(i + 1), config.infrastructure_lidar, height, site=scene.infrastructure_sites[i]))
    horizon = config.frames * 0.1
    for i in range(n_cars):
        vehicle = sim.add_connected_vehicle(track_id=i + 1, horizon_s=horizon)
        agents.append(SensorAgent(i + 1, config.vehicle_lidar, config.agents.roof_height, vehicle=vehicle))
    return agents


def tilt_sensors(agents: list[SensorAgent], max_tilt_deg: float, rng: np.random.Generator) -> None:
    """Give every sensor a mount roll and pitch in ``[-max_tilt_deg, max_tilt_deg]`` (nothing drawn at 0)."""
    if max_tilt_deg <= 0.0:
        return
    for agent in agents:
        roll, pitch = rng.uniform(-max_tilt_deg, max_tilt_deg, 2)
        agent.tilt_deg = (float(roll), float(pitch))


def mounted_frame(
    agent: SensorAgent, level_pose: np.ndarray, cloud: np.ndarray, map_height: float,
) -> tuple[np.ndarray, np.ndarray]:
    """The written pose and the level scan's points rotated into that (tilted) sensor frame.

    Both frames share the sensor's origin, so the points turn by the rotation between them; the map
    height moves poses and objects alike and no sensor-frame point.
    """
    pose = agent.mounted_pose(level_pose, map_height)
    if agent.tilt_deg == (0.0, 0.0):
        return pose, cloud
    level_to_mounted = pose_to_matrix(pose)[:3, :3].T @ pose_to_matrix(level_pose)[:3, :3]
    out = cloud.copy()
    out[:, :3] = (cloud[:, :3].astype(np.float64) @ level_to_mounted.T).astype(np.float32)
    return pose, out


def lifted(objects: list[ObjectRecord], map_height: float) -> list[ObjectRecord]:
    """The objects in the map frame whose ground is at ``map_height``."""
    if map_height == 0.0:
        return objects
    return [dataclasses.replace(o, box=o.box + np.array([0, 0, map_height, 0, 0, 0, 0])) for o in objects]


def renamed(objects: list[ObjectRecord], config: GenerationConfig) -> list[ObjectRecord]:
    """The objects with the ``obj_type`` the files carry (see ``obj_type_names``)."""
    if not config.obj_type_names:
        return objects
    return [dataclasses.replace(o, obj_type=config.written_type(o.obj_type)) for o in objects]


def objects_near(objects: list[ObjectRecord], agent: SensorAgent, pose: np.ndarray, radius: float) -> list[ObjectRecord]:
    """The labels of one agent: every object within ``radius`` (BEV) except its own vehicle."""
    return [
        o for o in objects
        if o.track_id != agent.own_track and np.hypot(o.box[0] - pose[0], o.box[1] - pose[1]) <= radius
    ]


def scan_frame(
    agent: SensorAgent, pose: np.ndarray, objects: list[ObjectRecord], buildings: np.ndarray, rng: np.random.Generator,
) -> np.ndarray:
    """The agent's sweep over every object but itself, and the buildings."""
    others = [o for o in objects if o.track_id != agent.own_track]
    boxes = np.concatenate([np.array([o.box for o in others]).reshape(-1, 7), buildings])
    materials = np.array([MATERIAL_OF_TYPE[o.obj_type] for o in others] + [BUILDING] * len(buildings), dtype=np.int64)
    return scan(agent.spec, pose, boxes, materials, rng)


# ----------------------------------------------------------------------------- scenarios


def scenario_seed(seed: int, split: str, index: int) -> np.random.SeedSequence:
    """A stream per (split, scenario) that does not shift when other splits change size."""
    return np.random.SeedSequence(int(seed), spawn_key=(zlib.crc32(split.encode()), int(index)))


def track_rows(objects: list[ObjectRecord], timestamp: str) -> list[dict]:
    """``trajectories.csv`` rows of one frame."""
    return [
        {
            "track_id": o.track_id, "timestamp": timestamp, "x": float(o.box[0]), "y": float(o.box[1]), "z": float(o.box[2]),
            "yaw_deg": float(np.degrees(o.box[6])), "length": float(o.box[3]), "width": float(o.box[4]),
            "height": float(o.box[5]), "obj_type": o.obj_type, "speed": float(o.speed),
        }
        for o in objects
    ]


def split_kinds(seed: int, split: str, config: GenerationConfig) -> list[str]:
    """Scene kind of every scenario of a split (stratified, shuffled by a per-split stream)."""
    rng = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(zlib.crc32(split.encode()),)))
    return stratified_kinds(config.splits[split], config.scene.intersection_share, rng)


def generate_scenario(
    root: str | os.PathLike, split: str, index: int, kind: str, config: GenerationConfig, seed: int,
    progress: bool = False, fsync: bool = True,
) -> dict:
    """Simulate and write one scenario; returns its summary (name, kind, agents, frames, points).

    ``fsync=False``: ``root`` is a folder moved into place whole once finished (see
    :mod:`turbotrain.utils.atomic`), so the frame files skip their per-file flush.
    """
    # spawn(4) gives the same first three children as spawn(3): the mount stream came later.
    layout_seq, traffic_seq, sensor_seq, mount_seq = scenario_seed(seed, split, index).spawn(4)
    layout_rng, traffic_rng, sensor_rng = (np.random.default_rng(s) for s in (layout_seq, traffic_seq, sensor_seq))
    scene = build_scene(config.scene, layout_rng, kind)
    name = f"{scenario_prefix(index)}{scene.kind}"
    _clear_scenario(root, split, index)
    sim = TrafficSimulator(scene, config.traffic, traffic_rng)
    sim.populate()
    sim.warm_up(config.warmup_s)
    agents = place_agents(config, scene, sim, layout_rng)
    tilt_sensors(agents, config.sensor_tilt_deg, np.random.default_rng(mount_seq))
    rows, points, labels = [], 0, 0
    for frame in tqdm(range(config.frames), desc=f"{split}/{name}", leave=False, disable=not progress):
        timestamp = f"{frame:06d}"
        objects = sim.snapshot()
        for agent in agents:
            level_pose = agent.pose()
            cloud = scan_frame(agent, level_pose, objects, scene.buildings, sensor_rng)
            pose, cloud = mounted_frame(agent, level_pose, cloud, config.map_height)
            near = renamed(lifted(objects_near(objects, agent, level_pose, config.object_range), config.map_height), config)
            record = AgentFrameRecord(
                scenario=name, agent_id=agent.agent_id, timestamp=timestamp, lidar_pose=pose,
                points=cloud, objects=near, ego_speed=agent.speed(),
            )
            write_agent_frame(root, split, record, binary=config.binary_pcd, fsync=fsync)
            points += len(cloud)
            labels += len(near)
        rows += track_rows(renamed(lifted(objects, config.map_height), config), timestamp)
        sim.step()
    write_scenario_meta(root, split, name, rows, scene.lanes)
    return {
        "split": split, "name": name, "kind": scene.kind, "agents": [a.agent_id for a in agents],
        "frames": config.frames, "agent_frames": config.frames * len(agents), "points": points,
        "labels": labels, "tracks": len({r["track_id"] for r in rows}),
    }


def scenario_prefix(index: int) -> str:
    return f"scene_{index:03d}_"


def _clear_scenario(root: str | os.PathLike, split: str, index: int) -> None:
    """Remove an earlier run's scenario of this index (of any kind), so no stale agent or frame survives."""
    split_dir = Path(root) / split
    if split_dir.is_dir():
        for folder in split_dir.glob(f"{scenario_prefix(index)}*"):
            if folder.is_dir():
                shutil.rmtree(folder)


def _scenario_task(args: tuple) -> dict:
    return generate_scenario(*args)


# ----------------------------------------------------------------------------- dataset


def generate_dataset(
    root: str | os.PathLike, preset: str | dict = "smoke", seed: int = 0,
    overrides: dict | None = None, progress: bool = True, fsync: bool = True,
) -> dict:
    """Generate every split of a preset under ``root``; returns (and writes) a summary.

    The summary counts scenarios, agent-frames and points per split, lists every scenario, and is
    written last to ``<root>/synth_summary.json`` (its presence marks a finished run). ``fsync=False``
    when ``root`` is a temporary folder its caller syncs once and renames into place.
    """
    config = resolve_config(preset, overrides)
    tasks = [
        (str(root), split, i, kind, config, int(seed))
        for split in config.splits for i, kind in enumerate(split_kinds(seed, split, config))
    ]
    _warn_unplanned(root, config)
    scenarios = _run_tasks(tasks, config.workers, progress, fsync)
    summary = _summarise(scenarios, config, preset, seed)
    write_json(Path(root) / SUMMARY_FILE, summary)
    return summary


def _run_tasks(tasks: list[tuple], workers: int, progress: bool, fsync: bool) -> list[dict]:
    bar = tqdm(total=len(tasks), desc="scenarios", disable=not progress)
    results = []
    if workers == 1:
        for task in tasks:
            results.append(generate_scenario(*task, progress=progress, fsync=fsync))
            bar.update()
    else:
        # "spawn": forking a process that runs tqdm's monitor thread can deadlock.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            for result in pool.map(_scenario_task, [(*task, False, fsync) for task in tasks]):
                results.append(result)
                bar.update()
    bar.close()
    return results


def _warn_unplanned(root: str | os.PathLike, config: GenerationConfig) -> None:
    """Scenario folders this run will not write (e.g. from a bigger preset) would be indexed too."""
    for split in config.splits:
        split_dir = Path(root) / split
        if split_dir.is_dir():
            planned = tuple(scenario_prefix(i) for i in range(config.splits[split]))
            stale = [p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(planned)]
            if stale:
                logger.warning("%s holds %d scenario folder(s) this run does not write: %s", split_dir, len(stale), stale[:5])


def _summarise(scenarios: list[dict], config: GenerationConfig, preset: str | dict, seed: int) -> dict:
    splits = {}
    for split in config.splits:
        mine = [s for s in scenarios if s["split"] == split]
        splits[split] = {
            "scenarios": len(mine),
            "frames": sum(s["frames"] for s in mine),
            "agent_frames": sum(s["agent_frames"] for s in mine),
            "points": sum(s["points"] for s in mine),
            "vehicle_ego_frames": sum(s["frames"] * sum(a > 0 for a in s["agents"]) for s in mine),
        }
    return {
        "preset": preset if isinstance(preset, str) else "custom",
        "seed": int(seed),
        "splits": splits,
        "scenarios": scenarios,
        "config": config_to_dict(config),
    }
