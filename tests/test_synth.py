"""The synthetic V2X generator: determinism, read-back, motion, ray casting, sensors, occlusion."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from turbotrain.data.opencood import index_split, read_agent_frame, read_lanes, read_trajectories
from turbotrain.data.synth import PRESETS, generate_dataset, resolve_config
from turbotrain.data.synth.lidar import GROUND, NO_HIT, VEHICLE, LidarSpec, RayHits, cast_rays, returns_from_hits, scan
from turbotrain.data.synth.polyline import Polyline
from turbotrain.data.synth.scene import SceneParams, SignalPlan, build_corridor, build_intersection, stratified_kinds
from turbotrain.data.synth.traffic import TrafficParams, TrafficSimulator
from turbotrain.geometry import pose_to_matrix, points_in_boxes, transform_points, wrap_angle
from turbotrain.utils.errors import ConfigError

SEED = 0
CLASSES = {"car", "truck", "pedestrian"}
DT = 0.1


def _file_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("synth_a")
    return root, generate_dataset(root, "smoke", seed=SEED, progress=False)


@pytest.fixture(scope="module")
def frames(smoke) -> list:
    """Every (index, record-with-points) of the smoke data, loaded once."""
    root, summary = smoke
    out = []
    for split in summary["splits"]:
        for index in index_split(root, split):
            for agent in index.agent_ids:
                for ts in index.timestamps[agent]:
                    out.append((index, read_agent_frame(index, agent, ts)))
    return out


# ----------------------------------------------------------------------------- dataset level


def test_same_seed_gives_byte_identical_files(smoke, tmp_path):
    root, _ = smoke
    generate_dataset(tmp_path, "smoke", seed=SEED, progress=False)
    first, second = _file_hashes(root), _file_hashes(tmp_path)
    assert len(first) > 100
    assert first == second


def test_worker_count_does_not_change_the_files(tmp_path):
    overrides = {"splits": {"train": 2}, "frames": 2}
    generate_dataset(tmp_path / "one", "smoke", seed=SEED, overrides={**overrides, "workers": 1}, progress=False)
    generate_dataset(tmp_path / "two", "smoke", seed=SEED, overrides={**overrides, "workers": 2}, progress=False)
    assert _file_hashes(tmp_path / "one") == _file_hashes(tmp_path / "two")


def test_other_seed_gives_other_data(tmp_path):
    overrides = {"splits": {"train": 1}, "frames": 2}
    a = generate_dataset(tmp_path / "a", "smoke", seed=1, overrides=overrides, progress=False)
    b = generate_dataset(tmp_path / "b", "smoke", seed=2, overrides=overrides, progress=False)
    assert _file_hashes(tmp_path / "a") != _file_hashes(tmp_path / "b")
    assert a["splits"]["train"]["scenarios"] == b["splits"]["train"]["scenarios"] == 1


def test_summary_matches_what_is_on_disk(smoke):
    root, summary = smoke
    assert (root / "synth_summary.json").is_file()
    for split, counts in summary["splits"].items():
        indices = index_split(root, split)
        assert len(indices) == counts["scenarios"] == PRESETS["smoke"]["splits"][split]
        n_frames = sum(len(ts) for index in indices for ts in index.timestamps.values())
        assert n_frames == counts["agent_frames"]
        assert counts["points"] > 0


def test_written_frames_read_back_through_the_opencood_reader(smoke, frames):
    root, summary = smoke
    n_frames = PRESETS["smoke"]["frames"]
    for index, record in frames:
        assert index.timestamps[record.agent_id] == [f"{t:06d}" for t in range(n_frames)]
        assert record.points.dtype == np.float32 and record.points.shape[1] == 4 and len(record.points) > 100
        assert np.all((record.points[:, 3] >= 0) & (record.points[:, 3] <= 1))
        assert {o.obj_type for o in record.objects} <= CLASSES
        assert record.agent_id not in {o.track_id for o in record.objects}  # never labels itself
        distances = [np.hypot(*(o.box[:2] - record.lidar_pose[:2])) for o in record.objects]
        assert max(distances) <= 100.0
    for split in summary["splits"]:
        for index in index_split(root, split):
            tracks = read_trajectories(index)
            assert set(tracks["obj_type"]) <= CLASSES and len(tracks) > 0
            kinds = {lane.kind for lane in read_lanes(index)}
            assert kinds == {"lane", "crosswalk"}


def test_agent_ids_mounts_and_counts(frames):
    by_scenario: dict[str, set[int]] = {}
    for index, record in frames:
        by_scenario.setdefault(index.path, set()).add(record.agent_id)
        if record.agent_id < 0:
            assert 4.0 <= record.lidar_pose[2] <= 6.0 and record.ego_speed == 0.0
        else:
            assert record.lidar_pose[2] == pytest.approx(1.9)
    for agents in by_scenario.values():
        assert sum(a < 0 for a in agents) in (1, 2)
        assert sum(a > 0 for a in agents) in (1, 2, 3)


def test_connected_vehicle_pose_matches_its_track(frames, smoke):
    """A connected vehicle's agent id is its track id: its LiDAR sits on its own box."""
    root, _ = smoke
    index, record = next((i, r) for i, r in frames if r.agent_id > 0)
    tracks = read_trajectories(index)
    row = tracks[(tracks.track_id == record.agent_id) & (tracks.timestamp == record.timestamp)].iloc[0]
    assert record.lidar_pose[:2] == pytest.approx([row.x, row.y])
    assert record.lidar_pose[4] == pytest.approx(row.yaw_deg)


def test_objects_move_continuously(smoke):
    root, summary = smoke
    config = resolve_config("smoke")
    top_speed = max(config.traffic.car_speed[1], config.traffic.truck_speed[1])
    moving = 0
    for split in summary["splits"]:
        for index in index_split(root, split):
            tracks = read_trajectories(index)
            for _, track in tracks.groupby("track_id"):
                steps = track["timestamp"].astype(int).to_numpy()
                assert np.all(np.diff(steps) == 1), "a track vanished and came back"
                xy = track[["x", "y"]].to_numpy()
                step_length = np.linalg.norm(np.diff(xy, axis=0), axis=1)
                assert np.all(step_length <= top_speed * DT + 1e-6)
                assert np.all(track["speed"] <= top_speed + 1e-6)
                yaw = np.radians(track["yaw_deg"].to_numpy())
                assert np.all(np.abs(wrap_angle(np.diff(yaw))) < 0.3)
                moving += bool(step_length.sum() > 2.0)
    assert moving >= 5


def test_new_objects_enter_at_the_scene_boundary(smoke):
    root, summary = smoke
    edge = resolve_config("smoke").scene.arm_length - 2.0
    for split in summary["splits"]:
        for index in index_split(root, split):
            tracks = read_trajectories(index)
            first = tracks.groupby("track_id").first()
            late = first[first.timestamp.astype(int) > 0]
            assert np.all(np.maximum(np.abs(late.x), np.abs(late.y)) >= edge)


def test_some_objects_are_seen_by_one_agent_and_hidden_from_another(frames):
    by_frame: dict[tuple[str, str], list] = {}
    for index, record in frames:
        by_frame.setdefault((index.path, record.timestamp), []).append(record)
    hidden_somewhere = 0
    for records in by_frame.values():
        counts = {}
        for record in records:
            points = transform_points(record.points, pose_to_matrix(record.lidar_pose))
            boxes = np.array([o.box for o in record.objects])
            near = np.hypot(*(boxes[:, :2] - record.lidar_pose[:2]).T) < 40.0
            inside = points_in_boxes(points, boxes).sum(axis=0)
            counts[record.agent_id] = {o.track_id: n for o, n, close in zip(record.objects, inside, near) if close}
        for a in counts:
            for b in counts:
                shared = counts[a].keys() & counts[b].keys()
                hidden_somewhere += sum(counts[a][t] >= 10 and counts[b][t] == 0 for t in shared)
    assert hidden_somewhere > 0


# ----------------------------------------------------------------------------- ray casting


def _exact(**kwargs) -> LidarSpec:
    return LidarSpec(range_noise=0.0, dropout=0.0, intensity_noise=0.0, **kwargs)


def test_box_in_front_is_hit_on_its_face_and_hides_what_is_behind():
    spec = _exact(beams=32, vertical_fov=(-10.0, 10.0), horizontal_resolution=0.25)
    front = [10.0, 0.0, 0.0, 2.0, 2.0, 2.0, 0.0]
    behind = [20.0, 0.0, 0.0, 2.0, 2.0, 2.0, 0.3]  # inside the front box's shadow
    rng = np.random.default_rng(0)
    alone = returns_from_hits(cast_rays(spec, np.array([behind]), np.array([VEHICLE]), None), spec, rng)
    assert points_in_boxes(alone, np.array(behind)).sum() > 10  # visible when nothing is in front

    both = returns_from_hits(cast_rays(spec, np.array([front, behind]), np.array([VEHICLE, VEHICLE]), None), spec, rng)
    assert len(both) > 50
    assert np.allclose(both[:, 0], 9.0, atol=1e-4)  # every return lies on the near face x = 9
    assert np.all(np.abs(both[:, 1]) <= 1.0 + 1e-4) and np.all(np.abs(both[:, 2]) <= 1.0 + 1e-4)
    assert points_in_boxes(both, np.array(behind)).sum() == 0


def test_scan_returns_sensor_frame_points_of_a_posed_sensor():
    spec = _exact(beams=16, vertical_fov=(-20.0, 10.0), horizontal_resolution=0.5, max_range=60.0)
    pose = np.array([5.0, 3.0, 2.0, 0.0, 90.0, 0.0])  # facing north, 2 m up
    box = np.array([[5.0, 13.0, 1.0, 2.0, 2.0, 2.0, 0.0]])  # 10 m ahead of it, standing on the ground
    points = scan(spec, pose, box, np.array([VEHICLE]), np.random.default_rng(0))
    on_box = points_in_boxes(transform_points(points, pose_to_matrix(pose)), box + [0, 0, 0, 0.01, 0.01, 0.01, 0])[:, 0]
    assert on_box.sum() > 10
    assert np.allclose(points[on_box, 0], 9.0, atol=1e-4)  # sensor x axis points at the box
    ground = transform_points(points[~on_box], pose_to_matrix(pose))
    assert np.allclose(ground[:, 2], 0.0, atol=1e-6)
    with pytest.raises(ValueError):
        scan(spec, np.array([0.0, 0.0, 2.0, 5.0, 0.0, 0.0]), box, np.array([VEHICLE]), np.random.default_rng(0))


def _wall_hits(spec: LidarSpec, distance: float) -> RayHits:
    shape = (spec.beams, spec.columns)
    return RayHits(np.full(shape, distance), np.full(shape, VEHICLE), np.ones(shape))


def test_dropout_removes_that_share_of_returns():
    spec = LidarSpec(beams=32, horizontal_resolution=0.5, dropout=0.3, range_noise=0.0)
    points = returns_from_hits(_wall_hits(spec, 20.0), spec, np.random.default_rng(0))
    assert len(points) / (spec.beams * spec.columns) == pytest.approx(0.7, abs=0.02)


def test_range_noise_has_the_configured_spread():
    spec = LidarSpec(beams=32, horizontal_resolution=0.5, dropout=0.0, range_noise=0.1)
    points = returns_from_hits(_wall_hits(spec, 20.0), spec, np.random.default_rng(0))
    error = np.linalg.norm(points[:, :3], axis=1) - 20.0
    assert error.std() == pytest.approx(0.1, rel=0.05) and abs(error.mean()) < 0.01
    exact = returns_from_hits(_wall_hits(_exact(), 20.0), _exact(), np.random.default_rng(0))
    assert np.allclose(np.linalg.norm(exact[:, :3], axis=1), 20.0, atol=1e-4)


def test_intensity_is_higher_for_bright_surfaces_hit_head_on():
    spec = _exact(beams=1, horizontal_resolution=90.0)
    hits = RayHits(
        distance=np.array([[10.0, 10.0, 10.0, np.inf]]),
        material=np.array([[VEHICLE, GROUND, VEHICLE, NO_HIT]]),
        cos_incidence=np.array([[1.0, 0.1, 0.1, 0.0]]),
    )
    intensity = returns_from_hits(hits, spec, np.random.default_rng(0))[:, 3]
    assert len(intensity) == 3  # the miss gives no return
    assert intensity[0] > intensity[2] > intensity[1]


def test_ground_hits_of_a_level_sensor():
    spec = _exact(beams=4, vertical_fov=(-30.0, 10.0), horizontal_resolution=10.0)
    hits = cast_rays(spec, np.zeros((0, 7)), np.zeros(0, dtype=np.int64), ground_z=-2.0)
    points = returns_from_hits(hits, spec, np.random.default_rng(0))
    assert np.allclose(points[:, 2], -2.0)
    assert np.isinf(hits.distance[-1]).all()  # the upward beam sees nothing


# ----------------------------------------------------------------------------- scene and traffic


def test_routes_are_smooth_and_conflicts_are_symmetric():
    scene = build_intersection(SceneParams(arm_length=60.0), np.random.default_rng(0))
    for route in scene.vehicle_routes:
        heading = route.path.heading_unwrapped
        assert np.max(np.abs(np.diff(heading))) < 0.1  # no kinks between samples 0.25 m apart
        assert route.stop_s < route.reserve_end_s < route.path.length
    assert np.array_equal(scene.conflicts, scene.conflicts.T)
    left = next(r for r in scene.vehicle_routes if r.entry == 0 and r.turn == "left")
    oncoming = next(r for r in scene.vehicle_routes if r.entry == 2 and r.turn == "straight")
    assert scene.conflicts[left.index, oncoming.index]
    assert any(w.crossings for w in scene.walk_routes)


def test_every_split_mixes_scene_kinds_as_the_share_asks(smoke):
    _, summary = smoke
    kinds = [s["kind"] for s in summary["scenarios"] if s["split"] == "train"]
    assert sorted(kinds) == ["corridor", "intersection"]  # 2 scenarios, share 0.6 -> 1 of each
    rng = np.random.default_rng(0)
    assert stratified_kinds(10, 0.6, rng).count("intersection") == 6
    assert stratified_kinds(1, 0.6, rng) == ["intersection"]


def test_connected_vehicles_are_placed_even_in_dense_traffic():
    scene = build_corridor(SceneParams(arm_length=80.0), np.random.default_rng(1))
    sim = TrafficSimulator(scene, TrafficParams(vehicle_rate=2.0), np.random.default_rng(1))
    sim.populate()
    horizon = 15.0
    cavs = [sim.add_connected_vehicle(track_id=i, horizon_s=horizon) for i in (1, 2, 3)]
    assert [c.track_id for c in cavs] == [1, 2, 3] and all(c.persistent for c in cavs)
    assert len({c.track_id for c in sim.actors}) == len(sim.actors)
    for _ in range(int(horizon / DT)):
        sim.step()
    assert all(c in sim.actors and c.s < c.path.length for c in cavs)  # still on the map


def test_polyline_extrapolates_past_its_end():
    line = Polyline(np.array([[0.0, 0.0], [10.0, 0.0]]))
    assert np.allclose(line.position(12.0), [12.0, 0.0])
    assert line.heading(12.0) == pytest.approx(0.0)


def _lone_vehicle_sim(red: bool) -> tuple[TrafficSimulator, object]:
    scene = build_corridor(SceneParams(arm_length=80.0), np.random.default_rng(0))
    greens = (1e-3, 1e3) if red else (1e3, 1e-3)
    scene.signals = SignalPlan(green_s=greens, clearance_s=0.0, offset_s=0.5)
    scene.walk_routes, scene.walk_entries, scene.entries = [], [], []  # no arrivals: only our cars
    sim = TrafficSimulator(scene, TrafficParams(), np.random.default_rng(0))
    return sim, scene.vehicle_routes[0]


def test_vehicles_queue_at_a_red_light_without_touching():
    sim, route = _lone_vehicle_sim(red=True)
    first = sim.add_connected_vehicle(track_id=1, horizon_s=1.0)
    first.route, first.s, first.v = route, route.stop_s - 60.0, 10.0
    second = sim.add_connected_vehicle(track_id=2, horizon_s=1.0)
    second.route, second.s, second.v = route, route.stop_s - 80.0, 10.0
    for _ in range(400):
        sim.step()
    assert first.v < 0.05 and second.v < 0.05
    assert route.stop_s - 2.0 <= first.front_s <= route.stop_s + 1e-6
    bumper_gap = (first.s - first.size[0] / 2) - second.front_s
    assert 0.5 < bumper_gap < 5.0


def test_vehicles_pass_on_green_and_slow_for_turns():
    sim, route = _lone_vehicle_sim(red=False)
    car = sim.add_connected_vehicle(track_id=1, horizon_s=1.0)
    car.route, car.s, car.v = route, 10.0, car.v_desired
    for _ in range(100):
        sim.step()
    assert car.front_s > route.stop_s and car.v > 0.8 * car.v_desired

    scene = build_intersection(SceneParams(arm_length=60.0), np.random.default_rng(0))
    scene.walk_routes, scene.walk_entries, scene.entries = [], [], []
    scene.signals = SignalPlan(green_s=(1e3, 1e3), clearance_s=0.0, offset_s=0.0)  # entry 0 is group 0: green
    params = TrafficParams()
    sim = TrafficSimulator(scene, params, np.random.default_rng(0))
    right = next(r for r in scene.vehicle_routes if r.entry == 0 and r.turn == "right")
    car = sim.add_connected_vehicle(track_id=1, horizon_s=1.0)
    car.route, car.s, car.v, car.v_desired = right, 5.0, 12.0, 12.0
    on_turn = []
    for _ in range(150):
        sim.step()
        if abs(np.interp(car.s, right.path.s, right.path.curvature)) > 0.2:
            on_turn.append(car.v)
    assert on_turn and max(on_turn) <= np.sqrt(params.max_lateral_accel / 0.2) + 0.1


# ----------------------------------------------------------------------------- configuration


def test_presets_resolve_and_unknown_settings_are_rejected():
    for name in PRESETS:
        config = resolve_config(name)
        assert set(config.splits) == {"train", "val", "test"}
    assert resolve_config("smoke", {"vehicle_lidar": {"vertical_fov": [-10, 2]}}).vehicle_lidar.vertical_fov == (-10, 2)
    with pytest.raises(ConfigError):
        resolve_config("smoke", {"lidar": {}})
    with pytest.raises(ConfigError):
        resolve_config("smoke", {"traffic": {"speed_of_light": 1}})
    with pytest.raises(ConfigError):
        resolve_config("no_such_preset")


# ----------------------------------------------------------------------------- class vocabulary


def test_obj_type_names_rename_the_written_labels_and_nothing_else(tmp_path):
    """A second synthetic dataset can speak another vocabulary: same scenes and clouds, renamed types."""
    names = {"car": "vehicle", "truck": "bus", "pedestrian": "walker"}
    base = {"splits": {"train": 1}, "frames": 3}
    plain = generate_dataset(tmp_path / "plain", "smoke", seed=SEED, overrides=base, progress=False)
    named = generate_dataset(tmp_path / "named", "smoke", seed=SEED, overrides={**base, "obj_type_names": names},
                             progress=False)
    # part of the data's identity: the summary says which names the files carry
    assert plain["config"]["obj_type_names"] == {} and named["config"]["obj_type_names"] == names
    assert plain["scenarios"] == named["scenarios"]
    (a,), (b,) = index_split(tmp_path / "plain", "train"), index_split(tmp_path / "named", "train")
    written = set()
    for agent in a.agent_ids:
        for ts in a.timestamps[agent]:
            ra, rb = read_agent_frame(a, agent, ts), read_agent_frame(b, agent, ts)
            np.testing.assert_array_equal(ra.points, rb.points)
            assert [o.track_id for o in ra.objects] == [o.track_id for o in rb.objects]
            for oa, ob in zip(ra.objects, rb.objects):
                np.testing.assert_array_equal(oa.box, ob.box)
                assert ob.obj_type == names[oa.obj_type]
                written.add(ob.obj_type)
    assert {"vehicle", "walker"} <= written and not written & CLASSES
    ta, tb = read_trajectories(a), read_trajectories(b)
    assert list(tb["obj_type"]) == [names[t] for t in ta["obj_type"]]
    assert (ta.drop(columns="obj_type").to_numpy() == tb.drop(columns="obj_type").to_numpy()).all()


def test_obj_type_names_accept_generator_types_only():
    assert resolve_config("smoke", {"obj_type_names": {"truck": "bus"}}).written_type("truck") == "bus"
    assert resolve_config("smoke", {"obj_type_names": {"truck": "bus"}}).written_type("car") == "car"
    with pytest.raises(ConfigError, match="bicycle"):
        resolve_config("smoke", {"obj_type_names": {"bicycle": "bike"}})
    with pytest.raises(ConfigError, match="non-empty"):
        resolve_config("smoke", {"obj_type_names": {"car": ""}})
    with pytest.raises(ConfigError, match="mapping"):
        resolve_config("smoke", {"obj_type_names": ["car"]})


# ----------------------------------------------------------------------------- tilted sensors, lifted map

TILT = {"sensor_tilt_deg": 5.0, "map_height": 40.0}


@pytest.fixture(scope="module")
def tilted_twins(tmp_path_factory) -> tuple[Path, Path]:
    """One small scenario generated level and on a 40 m map with sensors tilted up to 5 degrees."""
    level, tilted = tmp_path_factory.mktemp("level"), tmp_path_factory.mktemp("tilted")
    overrides = {"splits": {"train": 1}, "frames": 4}
    generate_dataset(level, "smoke", seed=SEED, overrides=overrides, progress=False)
    generate_dataset(tilted, "smoke", seed=SEED, overrides={**overrides, **TILT}, progress=False)
    return level, tilted


def test_tilted_data_is_its_level_twin_seen_through_tilted_poses(tilted_twins):
    level_root, tilted_root = tilted_twins
    level, tilted = index_split(level_root, "train")[0], index_split(tilted_root, "train")[0]
    assert level.agent_ids == tilted.agent_ids and level.timestamps == tilted.timestamps
    tilts = []
    for agent in level.agent_ids:
        for ts in level.timestamps[agent]:
            a, b = read_agent_frame(level, agent, ts), read_agent_frame(tilted, agent, ts)
            assert np.allclose(b.lidar_pose[[0, 1, 4]], a.lidar_pose[[0, 1, 4]])
            assert b.lidar_pose[2] == pytest.approx(a.lidar_pose[2] + 40.0)
            assert np.all(np.abs(b.lidar_pose[[3, 5]]) <= 5.0)
            tilts.append(b.lidar_pose[[3, 5]])
            # the same returns in the map frame (points are in each sensor's tilted frame) ...
            in_map_a = transform_points(a.points.astype(np.float64), pose_to_matrix(a.lidar_pose))
            in_map_b = transform_points(b.points.astype(np.float64), pose_to_matrix(b.lidar_pose))
            assert np.abs(in_map_b[:, :3] - in_map_a[:, :3] - [0, 0, 40.0]).max() < 1e-4
            assert np.array_equal(a.points[:, 3], b.points[:, 3])
            # ... and the same objects, 40 m up
            assert [o.track_id for o in a.objects] == [o.track_id for o in b.objects]
            for oa, ob in zip(a.objects, b.objects):
                assert np.allclose(ob.box, oa.box + [0, 0, 40.0, 0, 0, 0, 0]) and ob.pitch == oa.pitch == 0.0
            # the ground the sensor sees is at the map's height, although the sensor frame is tilted
            ground = in_map_b[b.points[:, 2] < b.points[:, 2].min() + 0.5]
            assert np.abs(np.median(ground[:, 2]) - 40.0) < 0.1
    assert np.abs(np.array(tilts)).max() > 1.0  # the sensors are tilted indeed
    tracks_a, tracks_b = read_trajectories(level), read_trajectories(tilted)
    assert np.allclose(tracks_b.z, tracks_a.z + 40.0) and np.allclose(tracks_b.x, tracks_a.x)


def test_tilt_settings_are_validated_and_off_by_default(tilted_twins):
    assert (resolve_config("smoke").sensor_tilt_deg, resolve_config("smoke").map_height) == (0.0, 0.0)
    with pytest.raises(ConfigError, match="sensor_tilt_deg"):
        resolve_config("smoke", {"sensor_tilt_deg": 20.0})
    with pytest.raises(ConfigError, match="map_height"):
        resolve_config("smoke", {"map_height": "high"})
    level_root, tilted_root = tilted_twins
    level_config = json.loads((level_root / "synth_summary.json").read_text())["config"]
    tilted_config = json.loads((tilted_root / "synth_summary.json").read_text())["config"]
    # off: the summary is what it was before the settings existed; on: it records them
    assert "sensor_tilt_deg" not in level_config and "map_height" not in level_config
    assert (tilted_config["sensor_tilt_deg"], tilted_config["map_height"]) == (5.0, 40.0)
