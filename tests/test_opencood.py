"""OpenCOOD layout: writer -> reader round trips, the YAML box convention, and every bad-input case."""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import yaml

from turbotrain.data import opencood
from turbotrain.data.opencood import (
    SkipReport,
    frame_yaml_to_record,
    index_split,
    object_from_yaml,
    read_agent_frame,
    read_lanes,
    read_trajectories,
    record_to_frame_yaml,
    write_agent_frame,
    write_scenario_meta,
)
from turbotrain.data.pcd import write_bin
from turbotrain.data.records import INFRASTRUCTURE, VEHICLE, AgentFrameRecord, Lane, ObjectRecord
from turbotrain.utils.errors import ConfigError, DataError

SPLIT, SCENARIO = "train", "2023-03-17-15-53-02_1_0"
AGENTS = (1, -1)
TIMESTAMPS = ("000068", "000069", "000070")


def make_record(agent_id: int, timestamp: str, seed: int) -> AgentFrameRecord:
    rng = np.random.default_rng(seed)
    points = rng.uniform(-40, 40, size=(50, 4)).astype(np.float32)
    points[:, 3] = rng.uniform(0, 1, size=50)
    objects = [
        ObjectRecord(track_id=11, obj_type="car", box=np.array([5.0, -2.0, 0.9, 4.5, 1.9, 1.6, 0.3]), speed=8.0),
        ObjectRecord(track_id=42, obj_type="pedestrian", box=np.array([-3.0, 7.5, 0.8, 0.6, 0.7, 1.8, -2.5]), speed=1.2),
    ]
    pose = np.array([100.0 + seed, -20.0, 1.8, 0.0, 30.0 + seed, 0.0])
    return AgentFrameRecord(SCENARIO, agent_id, timestamp, pose, points, objects, ego_speed=12.5)


def write_scenario(root, binary: bool = True) -> dict[tuple[int, str], AgentFrameRecord]:
    records = {}
    for agent_index, agent_id in enumerate(AGENTS):
        for step, timestamp in enumerate(TIMESTAMPS):
            record = make_record(agent_id, timestamp, seed=10 * agent_index + step)
            write_agent_frame(root, SPLIT, record, binary=binary)
            records[(agent_id, timestamp)] = record
    return records


def agent_folder(root, agent_id: int):
    return root / SPLIT / SCENARIO / str(agent_id)


def only_index(root, **kwargs):
    indices = index_split(root, SPLIT, **kwargs)
    assert len(indices) == 1
    return indices[0]


def assert_same_frame(got: AgentFrameRecord, want: AgentFrameRecord, atol: float = 0.0) -> None:
    np.testing.assert_allclose(got.lidar_pose, want.lidar_pose)
    np.testing.assert_allclose(got.points, want.points, atol=atol)
    assert got.ego_speed == pytest.approx(want.ego_speed)
    assert [o.track_id for o in got.objects] == [o.track_id for o in want.objects]
    for got_obj, want_obj in zip(got.objects, want.objects):
        assert got_obj.obj_type == want_obj.obj_type
        np.testing.assert_allclose(got_obj.box, want_obj.box, atol=1e-9)
        assert got_obj.speed == pytest.approx(want_obj.speed)


# ----------------------------------------------------------------------------- conventions


def test_yaml_object_to_box_hand_made_case():
    entry = {
        "location": [10.0, 5.0, 1.0], "center": [0.5, -0.25, 0.1], "extent": [2.25, 1.0, 0.75],
        "angle": [1.0, 90.0, -2.0], "speed": 36.0, "obj_type": "car",
    }
    obj = object_from_yaml(7, entry, "f.yaml")
    # centre = location + center, sizes = 2 * half extents, yaw = radians(angle[1]); roll dropped
    np.testing.assert_allclose(obj.box, [10.5, 4.75, 1.1, 4.5, 2.0, 1.5, np.pi / 2])
    assert obj.speed == pytest.approx(10.0)  # 36 km/h
    assert (obj.track_id, obj.obj_type) == (7, "car")
    assert obj.pitch == pytest.approx(np.radians(-2.0))  # kept apart from the box: it tilts the forward axis


def test_object_pitch_round_trips_and_roll_is_not_written():
    obj = ObjectRecord(track_id=3, obj_type="car", box=np.array([1.0, 2.0, 40.0, 4.5, 1.9, 1.6, 0.3]), pitch=np.radians(4.0))
    entry = opencood.object_to_yaml(obj)
    assert entry["angle"] == pytest.approx([0.0, np.degrees(0.3), 4.0])
    back = object_from_yaml(3, entry, "f.yaml")
    assert back.pitch == pytest.approx(obj.pitch) and np.allclose(back.box, obj.box)


def test_yaw_is_wrapped_to_minus_pi_pi():
    entry = {"location": [0, 0, 0], "center": [0, 0, 0], "extent": [1, 1, 1], "angle": [0, 270, 0], "obj_type": "car"}
    assert object_from_yaml(1, entry, "f.yaml").box[6] == pytest.approx(-np.pi / 2)


def test_written_yaml_uses_opencood_keys_and_half_extents():
    record = make_record(1, "000068", seed=0)
    data = record_to_frame_yaml(record)
    assert data["lidar_pose"] == data["true_ego_pos"] == data["predicted_ego_pos"] == record.lidar_pose.tolist()
    assert data["ego_speed"] == pytest.approx(12.5 * 3.6)
    car = data["vehicles"][11]
    assert car["extent"] == pytest.approx([2.25, 0.95, 0.8])
    assert car["angle"] == pytest.approx([0.0, np.degrees(0.3), 0.0])
    assert car["obj_type"] == "car" and car["center"] == [0.0, 0.0, 0.0]


def test_numbers_pyyaml_leaves_as_strings_are_accepted():
    data = {"lidar_pose": ["1e-05", 0, 0, 0, 0, 0], "vehicles": {}}
    record = frame_yaml_to_record(data, "s", 1, "000001", "f.yaml")
    assert record.lidar_pose[0] == pytest.approx(1e-5)


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "ascii"])
def test_frame_round_trip(tmp_path, binary):
    records = write_scenario(tmp_path, binary=binary)
    index = only_index(tmp_path)
    assert (index.split, index.name) == (SPLIT, SCENARIO)
    assert index.agent_ids == [-1, 1]
    assert index.timestamps == {agent: list(TIMESTAMPS) for agent in AGENTS}
    for (agent_id, timestamp), want in records.items():
        got = read_agent_frame(index, agent_id, timestamp)
        assert (got.scenario, got.agent_id, got.timestamp) == (SCENARIO, agent_id, timestamp)
        assert got.source.endswith(f"{agent_id}/{timestamp}.yaml")
        assert_same_frame(got, want, atol=0.0 if binary else 1e-6)


def test_agent_type_follows_sign_of_id(tmp_path):
    write_scenario(tmp_path)
    index = only_index(tmp_path)
    assert read_agent_frame(index, -1, "000068").agent_type == INFRASTRUCTURE
    assert read_agent_frame(index, 1, "000068").agent_type == VEHICLE


def test_integer_timestamp_and_labels_only(tmp_path):
    write_scenario(tmp_path)
    index = only_index(tmp_path)
    record = read_agent_frame(index, 1, 69, load_points=False)
    assert record.timestamp == "000069" and record.points.shape == (0, 4) and len(record.objects) == 2


def test_bin_point_files_are_read(tmp_path):
    records = write_scenario(tmp_path)
    folder = agent_folder(tmp_path, 1)
    for timestamp in TIMESTAMPS:
        (folder / f"{timestamp}.pcd").unlink()
        write_bin(folder / f"{timestamp}.bin", records[(1, timestamp)].points)
    index = only_index(tmp_path)
    np.testing.assert_array_equal(read_agent_frame(index, 1, "000070").points, records[(1, "000070")].points)


def make_tracks() -> list[dict]:
    return [
        {"track_id": 11, "timestamp": ts, "x": 5.0 + i, "y": -2.0, "z": 0.9, "yaw_deg": 17.2,
         "length": 4.5, "width": 1.9, "height": 1.6, "obj_type": "car", "speed": 8.0}
        for i, ts in enumerate(TIMESTAMPS)
    ] + [
        {"track_id": 42, "timestamp": 68, "x": -3.0, "y": 7.5, "z": 0.8, "yaw_deg": -143.2,
         "length": 0.6, "width": 0.7, "height": 1.8, "obj_type": "pedestrian", "speed": 1.2}
    ]


def make_lanes() -> list[Lane]:
    return [
        Lane(3, np.array([[0.0, 0.0], [10.0, 0.5], [20.0, 2.0]])),
        Lane(4, np.array([[1.0, -3.0], [1.0, 3.0]]), kind="crosswalk"),
    ]


@pytest.mark.parametrize("as_frame", [False, True], ids=["dicts", "dataframe"])
def test_tracks_and_lanes_round_trip(tmp_path, as_frame):
    write_scenario(tmp_path)
    tracks = make_tracks()
    write_scenario_meta(tmp_path, SPLIT, SCENARIO, pd.DataFrame(tracks) if as_frame else tracks, make_lanes())
    index = only_index(tmp_path)
    got = read_trajectories(index)
    assert list(got.columns) == list(opencood.TRAJECTORY_COLUMNS)
    assert got["timestamp"].tolist() == [*TIMESTAMPS, "000068"]  # integer 68 is zero-padded like the files
    assert got["track_id"].tolist() == [11, 11, 11, 42]
    assert got["obj_type"].tolist() == ["car", "car", "car", "pedestrian"]
    np.testing.assert_allclose(got["yaw_deg"], [17.2, 17.2, 17.2, -143.2])
    np.testing.assert_allclose(got["x"], [5.0, 6.0, 7.0, -3.0])
    lanes = read_lanes(index)
    assert [(lane.lane_id, lane.kind) for lane in lanes] == [(3, "lane"), (4, "crosswalk")]
    np.testing.assert_array_equal(lanes[0].centerline, make_lanes()[0].centerline)


def test_scenario_meta_is_optional(tmp_path):
    write_scenario(tmp_path)
    index = only_index(tmp_path)
    assert read_trajectories(index) is None
    assert read_lanes(index) == []


def test_non_agent_and_hidden_folders_are_ignored(tmp_path):
    write_scenario(tmp_path)
    (tmp_path / SPLIT / SCENARIO / "map").mkdir()
    (tmp_path / SPLIT / ".scratch").mkdir()
    (agent_folder(tmp_path, 1) / "000068_camera0.png").write_bytes(b"\x89PNG")
    index = only_index(tmp_path)
    assert index.agent_ids == [-1, 1] and index.timestamps[1] == list(TIMESTAMPS)


# ----------------------------------------------------------------------------- bad input: frames


def rewrite_yaml(root, agent_id: int, timestamp: str, edit) -> str:
    path = agent_folder(root, agent_id) / f"{timestamp}.yaml"
    data = yaml.safe_load(path.read_text())
    edit(data)
    path.write_text(yaml.safe_dump(data))
    return str(path)


def read_bad_frame(root, agent_id: int = 1, timestamp: str = "000069") -> DataError:
    index = only_index(root)
    with pytest.raises(DataError) as info:
        read_agent_frame(index, agent_id, timestamp)
    return info.value


def test_corrupted_pcd_names_file(tmp_path):
    write_scenario(tmp_path)
    pcd = agent_folder(tmp_path, 1) / "000069.pcd"
    pcd.write_bytes(pcd.read_bytes()[:-7])
    err = read_bad_frame(tmp_path)
    assert err.path == str(pcd) and "000069.pcd" in str(err) and err.field == "pcd data"


def test_yaml_without_lidar_pose(tmp_path):
    write_scenario(tmp_path)
    path = rewrite_yaml(tmp_path, 1, "000069", lambda d: d.pop("lidar_pose"))
    err = read_bad_frame(tmp_path)
    assert (err.path, err.field) == (path, "lidar_pose")
    assert "000069.yaml" in str(err) and "lidar_pose" in str(err)


def test_yaml_with_short_lidar_pose(tmp_path):
    write_scenario(tmp_path)
    rewrite_yaml(tmp_path, 1, "000069", lambda d: d.update(lidar_pose=[1.0, 2.0, 3.0]))
    err = read_bad_frame(tmp_path)
    assert err.field == "lidar_pose" and "[1.0, 2.0, 3.0]" in str(err)


@pytest.mark.parametrize("bad_extent", [[2.0, -1.0, 0.8], [2.0, 1.0, 0.0]], ids=["negative", "zero"])
def test_non_positive_extent(tmp_path, bad_extent):
    write_scenario(tmp_path)
    rewrite_yaml(tmp_path, 1, "000069", lambda d: d["vehicles"][42].update(extent=bad_extent))
    err = read_bad_frame(tmp_path)
    assert err.field == "vehicles.42.extent" and "000069.yaml" in str(err)


def test_missing_obj_type(tmp_path):
    write_scenario(tmp_path)
    rewrite_yaml(tmp_path, 1, "000069", lambda d: d["vehicles"][11].pop("obj_type"))
    err = read_bad_frame(tmp_path)
    assert err.field == "vehicles.11.obj_type" and "000069.yaml" in str(err)


def test_invalid_yaml_syntax(tmp_path):
    write_scenario(tmp_path)
    path = agent_folder(tmp_path, 1) / "000069.yaml"
    path.write_text("lidar_pose: [1, 2\nvehicles: {")
    err = read_bad_frame(tmp_path)
    assert (err.path, err.field) == (str(path), "yaml")


def test_missing_agent_folder_referenced(tmp_path):
    write_scenario(tmp_path)
    err = read_bad_frame(tmp_path, agent_id=7)
    assert err.path == str(agent_folder(tmp_path, 7)) and err.field == "agent_id"


def test_agent_folder_removed_after_indexing(tmp_path):
    write_scenario(tmp_path)
    index = only_index(tmp_path)
    for path in agent_folder(tmp_path, -1).iterdir():
        path.unlink()
    agent_folder(tmp_path, -1).rmdir()
    with pytest.raises(DataError, match=r"/-1: field 'agent_id'"):
        read_agent_frame(index, -1, "000068")


# ----------------------------------------------------------------------------- bad input: index


def index_error(root) -> DataError:
    with pytest.raises(DataError) as info:
        index_split(root, SPLIT)
    return info.value


def test_agent_folder_without_frames(tmp_path):
    write_scenario(tmp_path)
    empty = agent_folder(tmp_path, 2)
    empty.mkdir()
    err = index_error(tmp_path)
    assert (err.path, err.field) == (str(empty), "frames")


def test_scenario_without_agent_folders(tmp_path):
    (tmp_path / SPLIT / "empty_scenario").mkdir(parents=True)
    err = index_error(tmp_path)
    assert err.field == "agents" and "empty_scenario" in err.path


def test_gap_in_timestamps_names_folder_and_missing_frame(tmp_path):
    for timestamp in ("000001", "000002", "000004"):
        write_agent_frame(tmp_path, SPLIT, make_record(1, timestamp, seed=0))
    err = index_error(tmp_path)
    assert err.path == str(agent_folder(tmp_path, 1)) and err.field == "timestamps"
    assert "000003" in str(err)


def test_pcd_without_yaml(tmp_path):
    write_scenario(tmp_path)
    (agent_folder(tmp_path, 1) / "000070.yaml").unlink()
    err = index_error(tmp_path)
    assert err.path.endswith("/1/000070.pcd") and err.field == "yaml"


def test_yaml_without_pcd(tmp_path):
    write_scenario(tmp_path)
    (agent_folder(tmp_path, -1) / "000068.pcd").unlink()
    err = index_error(tmp_path)
    assert err.path.endswith("/-1/000068.yaml") and err.field == "pcd"


def test_missing_split(tmp_path):
    with pytest.raises(DataError, match="split"):
        index_split(tmp_path, "val")


def test_unknown_policy_is_a_config_error(tmp_path):
    write_scenario(tmp_path)
    with pytest.raises(ConfigError):
        index_split(tmp_path, SPLIT, on_bad_frame="ignore")


# ----------------------------------------------------------------------------- bad input: metadata


def test_trajectories_without_obj_type(tmp_path):
    write_scenario(tmp_path)
    tracks = make_tracks()
    tracks[2]["obj_type"] = None
    write_scenario_meta(tmp_path, SPLIT, SCENARIO, tracks, [])
    with pytest.raises(DataError, match=r"trajectories.csv: field 'obj_type'.*line 4: \(missing\)"):
        read_trajectories(only_index(tmp_path))


def test_trajectories_missing_column(tmp_path):
    write_scenario(tmp_path)
    csv = tmp_path / SPLIT / SCENARIO / opencood.TRAJECTORY_FILE
    pd.DataFrame(make_tracks()).drop(columns=["yaw_deg"]).to_csv(csv, index=False)
    with pytest.raises(DataError, match=r"field 'columns'.*yaw_deg"):
        read_trajectories(only_index(tmp_path))


def test_trajectories_non_positive_size(tmp_path):
    write_scenario(tmp_path)
    tracks = make_tracks()
    tracks[0]["width"] = 0.0
    write_scenario_meta(tmp_path, SPLIT, SCENARIO, tracks, [])
    with pytest.raises(DataError, match="field 'width'"):
        read_trajectories(only_index(tmp_path))


def test_lanes_with_bad_centerline(tmp_path):
    write_scenario(tmp_path)
    (tmp_path / SPLIT / SCENARIO / opencood.LANES_FILE).write_text('{"lanes": [{"id": 1, "centerline": [[0, 1]]}]}')
    with pytest.raises(DataError, match=r"lanes.json: field 'lanes\[0\].centerline'"):
        read_lanes(only_index(tmp_path))


# ----------------------------------------------------------------------------- skip mode


def break_several_frames(root) -> None:
    pcd = agent_folder(root, 1) / "000069.pcd"
    pcd.write_bytes(pcd.read_bytes()[:-7])  # found by the reader, not the index
    (agent_folder(root, -1) / "000070.yaml").unlink()  # unpaired .pcd: left out of the index
    agent_folder(root, 5).mkdir()  # agent folder without frames: agent left out


def snapshot(root) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def test_skip_mode_leaves_bad_frames_out_and_counts(tmp_path, caplog):
    write_scenario(tmp_path)
    break_several_frames(tmp_path)
    before = snapshot(tmp_path)
    report = SkipReport()
    with caplog.at_level(logging.WARNING, logger="turbotrain.data.opencood"):
        index = only_index(tmp_path, on_bad_frame="skip", report=report)
        frames = {
            (agent, ts): read_agent_frame(index, agent, ts, on_bad_frame="skip", report=report)
            for agent in index.agent_ids for ts in index.timestamps[agent]
        }
    assert index.agent_ids == [-1, 1]
    assert index.timestamps[-1] == ["000068", "000069"]
    assert frames[(1, "000069")] is None
    assert sum(frame is not None for frame in frames.values()) == 4
    assert report.count == 3
    assert report.by_field == {"yaml": 1, "frames": 1, "pcd data": 1}
    assert "3 skipped so far" in caplog.records[-1].getMessage()
    assert snapshot(tmp_path) == before  # the reader wrote nothing


def test_skip_mode_keeps_frames_around_a_gap(tmp_path):
    for timestamp in ("000001", "000002", "000004"):
        write_agent_frame(tmp_path, SPLIT, make_record(1, timestamp, seed=0))
    report = SkipReport()
    index = only_index(tmp_path, on_bad_frame="skip", report=report)
    assert index.timestamps[1] == ["000001", "000002", "000004"]
    assert report.count == 1 and "000003" in str(report.entries[0])


def test_skip_mode_defaults_to_module_report(tmp_path):
    write_scenario(tmp_path)
    index = only_index(tmp_path)
    opencood.SKIPPED.reset()
    assert read_agent_frame(index, 9, "000068", on_bad_frame="skip") is None
    assert opencood.SKIPPED.count == 1 and opencood.SKIPPED.by_field == {"agent_id": 1}
    opencood.SKIPPED.reset()
