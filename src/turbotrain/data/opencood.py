"""Reader and writer of the OpenCOOD / V2X-Real / V2XPnP-Seq on-disk layout.

Layout::

    <root>/<split>/<scenario>/<agent_id>/<timestamp>.pcd   (or .bin)  LiDAR, sensor frame
    <root>/<split>/<scenario>/<agent_id>/<timestamp>.yaml             pose + labels, map frame
    <root>/<split>/<scenario>/trajectories.csv   every object's whole track (optional)
    <root>/<split>/<scenario>/lanes.json         lane / crosswalk centrelines (optional)

Agent ids < 0 are infrastructure. Timestamps are zero-padded integers (``"000068"``), 10 Hz, and
must be consecutive per agent.

Per-frame YAML keys, as OpenCOOD writes them: ``lidar_pose`` ``[x, y, z, roll, yaw, pitch]`` (map
frame, degrees), ``ego_speed`` (km/h), ``true_ego_pos``, ``predicted_ego_pos`` and ``vehicles: {id:
{location, center, extent, angle, speed, obj_type}}``. Box conversion (OpenCOOD's
``project_world_objects``): the map-frame box is ``[location + center, 2 * extent,
radians(angle[1])]`` -- ``center`` is an offset added in the *map* frame, ``extent`` holds half sizes,
``angle`` is ``[roll, yaw, pitch]`` in degrees. The pitch is kept (``ObjectRecord.pitch``, radians):
it tilts the forward axis whose ground-plane direction is the box's yaw in an ego frame
(:func:`turbotrain.geometry.heading_in_frame`); roll does not move that axis and is dropped. Speeds
are km/h on disk and m/s in the records. The writer stores ``center = 0`` so the box centre is
``location``, and writes ``lidar_pose`` into ``true_ego_pos`` / ``predicted_ego_pos`` (we keep no
separate vehicle pose).
``ego_speed`` and an object's ``speed`` are optional on read (0 when absent); everything else is
required.

Bad input raises :class:`~turbotrain.utils.errors.DataError`. With ``on_bad_frame="skip"`` a bad frame
(or a bad agent folder) is left out instead, logged with ``logging.warning`` and recorded in a
:class:`SkipReport` (``SKIPPED`` unless one is passed). The reader never writes anything.
"""
from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import yaml

from turbotrain.data.pcd import read_points, write_pcd
from turbotrain.data.records import AgentFrameRecord, Lane, ObjectRecord, ScenarioIndex
from turbotrain.geometry import wrap_angle
from turbotrain.utils import fast_yaml
from turbotrain.utils.atomic import atomic_open, write_json, write_text
from turbotrain.utils.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

TRAJECTORY_FILE = "trajectories.csv"
LANES_FILE = "lanes.json"
TRAJECTORY_COLUMNS = (
    "track_id", "timestamp", "x", "y", "z", "yaw_deg", "length", "width", "height", "obj_type", "speed",
)
TRAJECTORY_NUMERIC_COLUMNS = ("track_id", "x", "y", "z", "yaw_deg", "length", "width", "height", "speed")
TRAJECTORY_SIZE_COLUMNS = ("length", "width", "height")
LANE_KINDS = ("lane", "crosswalk")
POINT_SUFFIXES = (".pcd", ".bin")  # .pcd preferred when both exist
TIMESTAMP_WIDTH = 6
KMH_PER_MS = 3.6
MISSING = "(missing)"

BadFramePolicy = Literal["error", "skip"]
_AGENT_DIR_NAME = re.compile(r"-?\d+")
_TIMESTAMP_NAME = re.compile(r"\d+")
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml is ~10x faster when present


# ----------------------------------------------------------------------------- skip bookkeeping


@dataclass
class SkipReport:
    """What ``on_bad_frame="skip"`` left out: one entry per problem, counted by the field at fault."""

    entries: list[DataError] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.entries)

    @property
    def by_field(self) -> Counter[str]:
        return Counter(err.field for err in self.entries)

    def record(self, err: DataError) -> None:
        self.entries.append(err)

    def reset(self) -> None:
        self.entries.clear()


SKIPPED = SkipReport()  # process-wide default report, for callers that pass none


def _check_policy(on_bad_frame: str) -> None:
    if on_bad_frame not in ("error", "skip"):
        raise ConfigError(f"on_bad_frame must be 'error' or 'skip', got {on_bad_frame!r}")


def _handle_bad(err: DataError, on_bad_frame: BadFramePolicy, report: SkipReport | None) -> None:
    """Raise ``err`` in "error" mode; otherwise record and log it."""
    if on_bad_frame == "error":
        raise err
    report = SKIPPED if report is None else report
    report.record(err)
    logger.warning("skipped bad input (%d skipped so far): %s", report.count, err)


# ----------------------------------------------------------------------------- YAML <-> records


def _floats(value: Any, length: int, source: str, name: str, expected: str) -> np.ndarray:
    """``value`` as ``length`` finite floats; ``float()`` also accepts '1e-05', which PyYAML leaves a str."""
    if value is None:
        raise DataError(source, name, expected, MISSING)
    try:
        out = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise DataError(source, name, expected, value) from err
    if out.shape != (length,) or not np.all(np.isfinite(out)):
        raise DataError(source, name, expected, value)
    return out


def _number(value: Any, source: str, name: str, default: float = 0.0) -> float:
    if value is None:
        return default
    try:
        out = float(value)
    except (TypeError, ValueError) as err:
        raise DataError(source, name, "a number", value) from err
    if not np.isfinite(out):
        raise DataError(source, name, "a finite number", value)
    return out


def box_from_yaml_object(entry: dict, source: str, name: str) -> tuple[np.ndarray, float]:
    """Map-frame ``[x, y, z, l, w, h, yaw_rad]`` of one ``vehicles`` entry and its pitch in radians
    (see module docstring)."""
    location = _floats(entry.get("location"), 3, source, f"{name}.location", "[x, y, z]")
    center = _floats(entry.get("center"), 3, source, f"{name}.center", "[dx, dy, dz]")
    extent = _floats(entry.get("extent"), 3, source, f"{name}.extent", "[l/2, w/2, h/2]")
    if np.any(extent <= 0):
        raise DataError(source, f"{name}.extent", "three positive half sizes", entry.get("extent"))
    angle = _floats(entry.get("angle"), 3, source, f"{name}.angle", "[roll, yaw, pitch] in degrees")
    yaw = float(wrap_angle(np.radians(angle[1])))
    return np.concatenate([location + center, 2.0 * extent, [yaw]]), float(np.radians(angle[2]))


def object_from_yaml(track_id: Any, entry: Any, source: str) -> ObjectRecord:
    """One ``vehicles`` entry as an :class:`ObjectRecord` (speed km/h -> m/s)."""
    name = f"vehicles.{track_id}"
    try:
        track = int(track_id)
    except (TypeError, ValueError) as err:
        raise DataError(source, name, "an integer object id", track_id) from err
    if not isinstance(entry, dict):
        raise DataError(source, name, "a mapping with location, center, extent, angle, obj_type", entry)
    obj_type = entry.get("obj_type")
    if not isinstance(obj_type, str) or not obj_type:
        got = MISSING if obj_type is None else obj_type
        raise DataError(source, f"{name}.obj_type", "a class name such as 'car'", got)
    box, pitch = box_from_yaml_object(entry, source, name)
    speed = _number(entry.get("speed"), source, f"{name}.speed") / KMH_PER_MS
    return ObjectRecord(track_id=track, obj_type=obj_type, box=box, speed=speed, pitch=pitch)


def object_to_yaml(obj: ObjectRecord) -> dict:
    """Inverse of :func:`object_from_yaml`, with ``center = 0``."""
    box = np.asarray(obj.box, dtype=np.float64)
    return {
        "location": box[:3].tolist(),
        "center": [0.0, 0.0, 0.0],
        "extent": (box[3:6] / 2.0).tolist(),
        "angle": [0.0, float(np.degrees(box[6])), float(np.degrees(obj.pitch))],
        "speed": float(obj.speed) * KMH_PER_MS,
        "obj_type": obj.obj_type,
    }


def frame_yaml_to_record(
    data: Any, scenario: str, agent_id: int, timestamp: str, source: str,
    points: np.ndarray | None = None,
) -> AgentFrameRecord:
    """Validate a parsed frame YAML and turn it into an :class:`AgentFrameRecord`."""
    if not isinstance(data, dict):
        raise DataError(source, "<document>", "a YAML mapping", type(data).__name__)
    pose = _floats(data.get("lidar_pose"), 6, source, "lidar_pose", "6 numbers [x, y, z, roll, yaw, pitch]")
    vehicles = data.get("vehicles") or {}
    if not isinstance(vehicles, dict):
        raise DataError(source, "vehicles", "a mapping of object id -> object", type(vehicles).__name__)
    objects = [object_from_yaml(track_id, entry, source) for track_id, entry in vehicles.items()]
    return AgentFrameRecord(
        scenario=scenario,
        agent_id=int(agent_id),
        timestamp=timestamp,
        lidar_pose=pose,
        points=np.zeros((0, 4), np.float32) if points is None else points,
        objects=objects,
        ego_speed=_number(data.get("ego_speed"), source, "ego_speed") / KMH_PER_MS,
        source=source,
    )


def record_to_frame_yaml(record: AgentFrameRecord) -> dict:
    """The OpenCOOD frame YAML of ``record`` (points are written separately)."""
    pose = [float(v) for v in np.asarray(record.lidar_pose, dtype=np.float64)]
    return {
        "lidar_pose": pose,
        "true_ego_pos": list(pose),
        "predicted_ego_pos": list(pose),
        "ego_speed": float(record.ego_speed) * KMH_PER_MS,
        "vehicles": {int(obj.track_id): object_to_yaml(obj) for obj in record.objects},
    }


# ----------------------------------------------------------------------------- paths and writers


def scenario_dir(root: str | os.PathLike, split: str, scenario: str) -> Path:
    return Path(root) / split / scenario


def agent_dir(root: str | os.PathLike, split: str, scenario: str, agent_id: int) -> Path:
    return scenario_dir(root, split, scenario) / str(int(agent_id))


def write_agent_frame(root: str | os.PathLike, split: str, record: AgentFrameRecord, binary: bool = True,
                      fsync: bool = True) -> None:
    """Write ``record`` as ``<timestamp>.pcd`` + ``<timestamp>.yaml``, each atomically.

    The YAML goes last, so a job killed in between leaves a ``.pcd`` without ``.yaml``, which the
    reader reports instead of loading a frame without labels. The YAML comes from
    :mod:`turbotrain.utils.fast_yaml` (``yaml.dump`` cost ~10 ms a frame); ``fsync=False`` inside a
    folder that is moved into place whole (:mod:`turbotrain.utils.atomic`).
    """
    folder = agent_dir(root, split, record.scenario, record.agent_id)
    write_pcd(folder / f"{record.timestamp}.pcd", record.points, binary=binary, fsync=fsync)
    write_text(folder / f"{record.timestamp}.yaml", fast_yaml.dumps(record_to_frame_yaml(record)), fsync=fsync)


def write_scenario_meta(
    root: str | os.PathLike, split: str, scenario: str,
    tracks: pd.DataFrame | list[dict], lanes: list[Lane],
) -> None:
    """Write ``trajectories.csv`` (columns :data:`TRAJECTORY_COLUMNS`) and ``lanes.json``, atomically."""
    folder = scenario_dir(root, split, scenario)
    frame = _tracks_frame(tracks)
    with atomic_open(folder / TRAJECTORY_FILE, "w", newline="") as fh:
        frame.to_csv(fh, index=False, columns=list(TRAJECTORY_COLUMNS))
    write_json(folder / LANES_FILE, {"lanes": [_lane_to_json(lane) for lane in lanes]})


def _tracks_frame(tracks: pd.DataFrame | list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(tracks, columns=list(TRAJECTORY_COLUMNS)) if isinstance(tracks, list) else tracks.copy()
    missing = [c for c in TRAJECTORY_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"tracks lack columns {missing}; expected {list(TRAJECTORY_COLUMNS)}")
    frame["timestamp"] = [_timestamp_str(ts) for ts in frame["timestamp"]]
    return frame


def _timestamp_str(timestamp: str | int) -> str:
    """Integer timestamps are zero-padded as the frame files are; strings are kept as given."""
    return timestamp if isinstance(timestamp, str) else str(int(timestamp)).zfill(TIMESTAMP_WIDTH)


def _lane_to_json(lane: Lane) -> dict:
    return {
        "id": int(lane.lane_id),
        "kind": lane.kind,
        "centerline": np.asarray(lane.centerline, dtype=np.float64).tolist(),
    }


# ----------------------------------------------------------------------------- index


def index_split(
    root: str | os.PathLike, split: str, on_bad_frame: BadFramePolicy = "error",
    report: SkipReport | None = None,
) -> list[ScenarioIndex]:
    """Index every scenario of ``<root>/<split>`` from file names alone (no YAML or points parsed)."""
    _check_policy(on_bad_frame)
    split_path = Path(root) / split
    if not split_path.is_dir():
        raise DataError(split_path, "split", "an existing directory", MISSING)
    indices = []
    for scenario_path in _visible_subdirs(split_path):
        index = index_scenario(scenario_path, split, on_bad_frame, report)
        if index is not None:
            indices.append(index)
    return indices


def index_scenario(
    scenario_path: str | os.PathLike, split: str, on_bad_frame: BadFramePolicy = "error",
    report: SkipReport | None = None,
) -> ScenarioIndex | None:
    """Index one scenario folder; ``None`` when "skip" left none of its agents."""
    _check_policy(on_bad_frame)
    scenario_path = Path(scenario_path)
    folders = _agent_folders(scenario_path)
    if not folders:
        err = DataError(scenario_path, "agents", "at least one <agent_id> folder", MISSING)
        _handle_bad(err, on_bad_frame, report)
        return None
    timestamps: dict[int, list[str]] = {}
    for agent_id, folder in folders.items():
        try:
            timestamps[agent_id] = _index_agent(folder, on_bad_frame, report)
        except DataError as err:
            _handle_bad(err, on_bad_frame, report)
    if not timestamps:
        return None
    return ScenarioIndex(
        split=split, name=scenario_path.name, path=str(scenario_path),
        agent_ids=sorted(timestamps), timestamps=timestamps,
    )


def _visible_subdirs(path: Path) -> list[Path]:
    # Hidden folders are our own temporaries (download/extraction) or tool caches, never scenarios.
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _agent_folders(scenario_path: Path) -> dict[int, Path]:
    """Integer-named subfolders; others (e.g. a map folder shipped beside the agents) are not agents."""
    folders = {int(p.name): p for p in _visible_subdirs(scenario_path) if _AGENT_DIR_NAME.fullmatch(p.name)}
    return dict(sorted(folders.items()))


def _index_agent(folder: Path, on_bad_frame: BadFramePolicy, report: SkipReport | None) -> list[str]:
    """Sorted timestamps with both a point file and a YAML; raises if none is left."""
    point_stems, yaml_stems = _frame_stems(folder)
    complete = []
    for stem in sorted(point_stems | yaml_stems, key=int):
        try:
            _check_pair(folder, stem, point_stems, yaml_stems)
            complete.append(stem)
        except DataError as err:
            _handle_bad(err, on_bad_frame, report)
    if not complete:
        raise DataError(folder, "frames", "at least one <timestamp>.pcd + <timestamp>.yaml pair", 0)
    _check_consecutive(folder, complete, on_bad_frame, report)
    return complete


def _frame_stems(folder: Path) -> tuple[set[str], set[str]]:
    """Timestamps of point files and of YAML files; other files (camera images, ...) are ignored."""
    points, yamls = set(), set()
    for entry in folder.iterdir():
        if not _TIMESTAMP_NAME.fullmatch(entry.stem) or not entry.is_file():
            continue
        if entry.suffix in POINT_SUFFIXES:
            points.add(entry.stem)
        elif entry.suffix == ".yaml":
            yamls.add(entry.stem)
    return points, yamls


def _check_pair(folder: Path, stem: str, point_stems: set[str], yaml_stems: set[str]) -> None:
    if stem not in yaml_stems:
        raise DataError(folder / f"{stem}.pcd", "yaml", f"a matching {stem}.yaml beside it", MISSING)
    if stem not in point_stems:
        raise DataError(folder / f"{stem}.yaml", "pcd", f"a matching {stem}.pcd or {stem}.bin beside it", MISSING)


def _check_consecutive(
    folder: Path, timestamps: list[str], on_bad_frame: BadFramePolicy, report: SkipReport | None,
) -> None:
    """Report each gap (or duplicate) between sorted timestamps; "skip" keeps the frames around it."""
    for before, after in zip(timestamps, timestamps[1:]):
        step = int(after) - int(before)
        if step == 1:
            continue
        if step == 0:
            got = f"both {before} and {after}"
        else:
            missing = [str(t).zfill(len(before)) for t in range(int(before) + 1, int(after))]
            got = "missing " + ", ".join(missing)
        err = DataError(folder, "timestamps", f"consecutive 10 Hz frames between {before} and {after}", got)
        _handle_bad(err, on_bad_frame, report)


# ----------------------------------------------------------------------------- frame reader


def read_agent_frame(
    index: ScenarioIndex, agent_id: int, timestamp: str | int, load_points: bool = True,
    on_bad_frame: BadFramePolicy = "error", report: SkipReport | None = None,
) -> AgentFrameRecord | None:
    """Load one agent's frame; ``None`` when it is bad and ``on_bad_frame="skip"``."""
    _check_policy(on_bad_frame)
    try:
        return _load_frame(index, int(agent_id), _resolve_timestamp(index, agent_id, timestamp), load_points)
    except DataError as err:
        _handle_bad(err, on_bad_frame, report)
        return None


def read_agent_points(
    index: ScenarioIndex, agent_id: int, timestamp: str, on_bad_frame: BadFramePolicy = "error",
    report: SkipReport | None = None,
) -> np.ndarray | None:
    """The points of a frame whose labels were read already; ``None`` when bad and ``on_bad_frame="skip"``."""
    _check_policy(on_bad_frame)
    try:
        return read_points(_points_path(Path(index.path) / str(int(agent_id)), timestamp))
    except DataError as err:
        _handle_bad(err, on_bad_frame, report)
        return None


def _resolve_timestamp(index: ScenarioIndex, agent_id: int, timestamp: str | int) -> str:
    """An int is matched against the agent's indexed timestamps, whatever their padding."""
    if isinstance(timestamp, str):
        return timestamp
    by_value = {int(ts): ts for ts in index.timestamps.get(int(agent_id), [])}
    return by_value.get(int(timestamp), _timestamp_str(timestamp))


def _load_frame(index: ScenarioIndex, agent_id: int, timestamp: str, load_points: bool) -> AgentFrameRecord:
    folder = Path(index.path) / str(agent_id)
    if not folder.is_dir():
        raise DataError(folder, "agent_id", f"a folder for agent {agent_id} in scenario {index.name}", MISSING)
    yaml_path = folder / f"{timestamp}.yaml"
    points_path = _points_path(folder, timestamp)
    if not yaml_path.is_file():
        raise DataError(points_path, "yaml", f"a matching {timestamp}.yaml beside it", MISSING)
    record = frame_yaml_to_record(_load_yaml(yaml_path), index.name, agent_id, timestamp, str(yaml_path))
    if load_points:
        record.points = read_points(points_path)
    return record


def _points_path(folder: Path, timestamp: str) -> Path:
    for suffix in POINT_SUFFIXES:
        candidate = folder / f"{timestamp}{suffix}"
        if candidate.is_file():
            return candidate
    raise DataError(folder / f"{timestamp}.pcd", "pcd", f"a {timestamp}.pcd or {timestamp}.bin point file", MISSING)


def _load_yaml(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return yaml.load(fh, Loader=_YAML_LOADER)
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(path, "yaml", "a valid YAML document", first_line) from err


# ----------------------------------------------------------------------------- scenario metadata


def read_trajectories(index: ScenarioIndex) -> pd.DataFrame | None:
    """The scenario's ``trajectories.csv`` (rows in file order), or ``None`` when it is absent."""
    path = Path(index.path) / TRAJECTORY_FILE
    if not path.is_file():
        return None
    try:
        frame = pd.read_csv(path, dtype={"timestamp": str, "obj_type": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DataError(path, "csv", "a CSV with a header row", str(err).splitlines()[0]) from err
    _validate_trajectories(path, frame)
    frame["track_id"] = frame["track_id"].astype(np.int64)
    return frame


def _validate_trajectories(path: Path, frame: pd.DataFrame) -> None:
    missing = [c for c in TRAJECTORY_COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(path, "columns", f"all of {list(TRAJECTORY_COLUMNS)}", f"missing {missing}")
    for column in TRAJECTORY_NUMERIC_COLUMNS:
        values = pd.to_numeric(frame[column], errors="coerce")
        _raise_on_first_bad_row(path, frame, column, values.isna() | ~np.isfinite(values), "finite numbers")
    track_ids = pd.to_numeric(frame["track_id"])
    _raise_on_first_bad_row(path, frame, "track_id", track_ids % 1 != 0, "integer ids")
    for column in TRAJECTORY_SIZE_COLUMNS:
        _raise_on_first_bad_row(path, frame, column, frame[column] <= 0, "positive sizes")
    for column in ("obj_type", "timestamp"):
        _raise_on_first_bad_row(path, frame, column, frame[column].isna(), "a value on every row")


def _raise_on_first_bad_row(path: Path, frame: pd.DataFrame, column: str, bad: pd.Series, expected: str) -> None:
    if not bad.any():
        return
    row = bad.idxmax()
    value = frame[column][row]
    shown = MISSING if pd.isna(value) else repr(value)
    # +2: the header is line 1 and rows count from 1 in an editor
    raise DataError(path, column, expected, f"line {int(row) + 2}: {shown}")


def read_lanes(index: ScenarioIndex) -> list[Lane]:
    """The scenario's lanes, or ``[]`` when ``lanes.json`` is absent (real data ships the map apart)."""
    path = Path(index.path) / LANES_FILE
    if not path.is_file():
        return []
    try:
        with open(path, encoding="utf-8") as fh:
            document = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(path, "json", "a valid JSON document", str(err)) from err
    lanes = document.get("lanes") if isinstance(document, dict) else None
    if not isinstance(lanes, list):
        raise DataError(path, "lanes", "a list of {id, kind, centerline}", MISSING if lanes is None else lanes)
    return [_lane_from_json(path, position, entry) for position, entry in enumerate(lanes)]


def _lane_from_json(path: Path, position: int, entry: Any) -> Lane:
    name = f"lanes[{position}]"
    if not isinstance(entry, dict):
        raise DataError(path, name, "a mapping {id, kind, centerline}", entry)
    try:
        lane_id = int(entry["id"])
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(path, f"{name}.id", "an integer", entry.get("id", MISSING)) from err
    kind = entry.get("kind", "lane")
    if kind not in LANE_KINDS:
        raise DataError(path, f"{name}.kind", f"one of {list(LANE_KINDS)}", kind)
    try:
        centerline = np.asarray(entry["centerline"], dtype=np.float64)
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(path, f"{name}.centerline", "[[x, y], ...]", entry.get("centerline", MISSING)) from err
    is_polyline = centerline.ndim == 2 and centerline.shape[0] >= 2 and centerline.shape[1] == 2
    if not is_polyline or not np.isfinite(centerline).all():
        raise DataError(path, f"{name}.centerline", "at least two finite [x, y] points", centerline.tolist())
    return Lane(lane_id=lane_id, centerline=centerline, kind=kind)
