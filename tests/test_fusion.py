"""The fusion cache on a hand-made world written with the real OpenCOOD writer."""
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from turbotrain.data import opencood
from turbotrain.data.cache import builder as fusion
from turbotrain.data.cache.format import cache_config_digest
from turbotrain.utils.hashing import sha256_file
from turbotrain.data.records import AgentFrameRecord, ObjectRecord
from turbotrain.geometry import pose_to_matrix, transform_points
from turbotrain.grid import Grid
from turbotrain.utils.errors import DataError

GRID = Grid((-40.0, -20.0, -3.0, 40.0, 20.0, 1.0), (0.5, 0.5, 4.0))
CLASSES = ("car", "pedestrian", "truck")
N_STEPS = 6  # timestamps 000000 .. 000005
HISTORY, FUTURE = 2, 2

# Ego 1 (vehicle, yaw 90 deg), vehicle 2 20 m away, infrastructure -1 30 m away, vehicle 3 100 m away.
AGENT_POSES = {
    1: [10.0, 5.0, 1.5, 0.0, 90.0, 0.0],
    2: [30.0, 5.0, 1.5, 0.0, 180.0, 0.0],
    -1: [10.0, 35.0, 4.0, 0.0, -45.0, 0.0],
    3: [110.0, 5.0, 1.5, 0.0, 0.0, 0.0],
}
# A world point on the roof of car 10 at t = 000002, seen by agents 1 and 2.
SHARED_WORLD_POINT = np.array([10.3, 14.8, 0.4])


def _objects(step: int) -> list[ObjectRecord]:
    """Car 10 drives along +y; pedestrian 11 appears at step 2; truck 13 leaves after step 3; 12 is a bus."""
    objects = [
        ObjectRecord(10, "car", np.array([10.0, 13.0 + step, 0.0, 4.0, 2.0, 1.6, np.pi])),
        ObjectRecord(12, "bus", np.array([5.0, 10.0, 0.0, 10.0, 3.0, 3.0, 0.0])),
    ]
    if step >= 2:
        objects.append(ObjectRecord(11, "person", np.array([14.0, 8.0, 0.0, 0.6, 0.6, 1.8, 0.5 * step])))
    if step <= 3:
        objects.append(ObjectRecord(13, "truck", np.array([0.0, 20.0, 0.0, 8.0, 2.5, 3.0, 0.0])))
    return objects


def _points(agent_id: int, step: int) -> np.ndarray:
    rng = np.random.default_rng(100 * step + agent_id + 7)
    cloud = np.hstack([rng.uniform([-30, -15, -2], [30, 15, 0.5], (300, 3)), rng.uniform(0, 1, (300, 1))])
    if agent_id in (1, 2) and step == 2:
        sensor_to_map = pose_to_matrix(AGENT_POSES[agent_id])
        seen = transform_points(SHARED_WORLD_POINT[None], np.linalg.inv(sensor_to_map))
        cloud[0, :3] = seen[0]
        cloud[0, 3] = 0.99
    return cloud.astype(np.float32)


def write_toy_world(root: Path, split: str = "train", scenarios=("scene_a",)) -> Path:
    """Write the toy world with :func:`opencood.write_agent_frame`; returns ``root``."""
    for scenario in scenarios:
        for agent_id, pose in AGENT_POSES.items():
            for step in range(N_STEPS):
                # Every agent annotates every object, so labels only differ by the cooperators chosen.
                record = AgentFrameRecord(
                    scenario=scenario, agent_id=agent_id, timestamp=f"{step:06d}",
                    lidar_pose=np.array(pose), points=_points(agent_id, step), objects=_objects(step),
                )
                opencood.write_agent_frame(root, split, record)
    return root


def fuse(raw: Path, out: Path, **overrides) -> dict:
    kwargs = dict(
        history=HISTORY, future=FUTURE, grid=GRID, classes=CLASSES, class_map={"person": "pedestrian"},
        comm_range=50.0, max_points_per_voxel=4, max_voxels=5000, progress=False, seed=3,
    )
    kwargs.update(overrides)
    return fusion.build_cache(raw, "train", out, **kwargs)


@pytest.fixture(scope="module")
def raw_world(tmp_path_factory) -> Path:
    return write_toy_world(tmp_path_factory.mktemp("raw"))


@pytest.fixture(scope="module")
def cache(raw_world, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("cache")
    return out, fuse(raw_world, out)


def _manifest(out: Path) -> dict:
    return json.loads((out / "train" / "manifest.json").read_text())


def _shard(out: Path) -> dict:
    with np.load(out / "train" / "samples-00000.npz", allow_pickle=False) as archive:
        return {k: archive[k] for k in archive.files}


def _row(shard: dict, sample_id: str) -> int:
    return int(np.flatnonzero(shard["sample_ids"] == sample_id)[0])


def test_samples_are_vehicle_egos_with_full_history_and_future(cache):
    out, summary = cache
    ids = _manifest(out)["sample_ids"]
    # Vehicles 1, 2, 3 each at t = 1, 2, 3 (history 2 and future 2 of 6 frames); -1 is infrastructure.
    expected = [f"train/scene_a/{ego}/{t:06d}" for ego in (1, 2, 3) for t in (1, 2, 3)]
    assert ids == expected
    assert summary["samples"] == 9


def test_comm_range_and_max_agents(cache, raw_world, tmp_path):
    out, _ = cache
    shard = _shard(out)
    row = _row(shard, "train/scene_a/1/000002")
    lo, hi = shard["frame_offsets"][row : row + 2]
    # Agent 3 is 100 m away: outside the 50 m communication range.
    assert sorted(set(shard["frame_agent_ids"][lo:hi].tolist())) == [-1, 1, 2]
    assert sorted(shard["frame_steps"][lo:hi].tolist()) == [0, 0, 0, 1, 1, 1]
    lonely = _row(shard, "train/scene_a/3/000002")
    assert set(shard["frame_agent_ids"][shard["frame_offsets"][lonely] : shard["frame_offsets"][lonely + 1]]) == {3}
    fuse(raw_world, tmp_path, max_agents=2)
    capped = _shard(tmp_path)
    row = _row(capped, "train/scene_a/1/000002")
    # With room for one cooperator, the closest (vehicle 2 at 20 m) wins over infrastructure at 30 m.
    assert set(capped["frame_agent_ids"][capped["frame_offsets"][row] : capped["frame_offsets"][row + 1]]) == {1, 2}


def test_each_agent_frame_is_stored_once(cache):
    out, summary = cache
    with np.load(out / "train" / "frames-scene_a.npz", allow_pickle=False) as store:
        keys = list(zip(store["agent_ids"].tolist(), store["timestamps"].tolist()))
    assert len(keys) == len(set(keys)) == summary["frames"]
    # Frames at t-1 .. t for t = 1 .. 3: timestamps 0 .. 3 of all four agents.
    assert set(keys) == {(a, f"{s:06d}") for a in AGENT_POSES for s in range(4)}


def test_shared_world_point_lands_on_the_same_ego_coordinate(cache):
    out, _ = cache
    shard = _shard(out)
    row = _row(shard, "train/scene_a/1/000002")
    lo, hi = shard["frame_offsets"][row : row + 2]
    with np.load(out / "train" / "frames-scene_a.npz", allow_pickle=False) as store:
        seen = []
        for j in range(lo, hi):
            if shard["frame_steps"][j] != HISTORY - 1 or shard["frame_agent_ids"][j] not in (1, 2):
                continue
            slot = shard["frame_slots"][j]
            points = store["points"][store["point_offsets"][slot] : store["point_offsets"][slot + 1]]
            marked = points[np.isclose(points[:, 3], 0.99)]
            seen.append(transform_points(marked[:, :3].astype(np.float64), shard["frame_poses_to_ego"][j])[0])
    assert len(seen) == 2
    np.testing.assert_allclose(seen[0], seen[1], atol=1e-4)
    expected = transform_points(SHARED_WORLD_POINT[None], np.linalg.inv(pose_to_matrix(AGENT_POSES[1])))[0]
    np.testing.assert_allclose(seen[0], expected, atol=1e-4)


def test_label_transform_hand_made_case(cache):
    out, _ = cache
    shard = _shard(out)
    row = _row(shard, "train/scene_a/1/000002")
    lo, hi = shard["box_offsets"][row : row + 2]
    boxes = dict(zip(shard["track_ids"][lo:hi].tolist(), shard["boxes"][lo:hi]))
    # Ego at (10, 5) facing +y (yaw 90 deg); car 10 at (10, 15) facing -x (yaw 180 deg): 10 m straight
    # ahead of the ego (ego x), rotated +90 deg relative to it.
    np.testing.assert_allclose(boxes[10], [10.0, 0.0, -1.5, 4.0, 2.0, 1.6, np.pi / 2], atol=1e-5)
    # Pedestrian at map (14, 8): 3 m ahead, 4 m to the right (-y) of the ego.
    np.testing.assert_allclose(boxes[11][:2], [3.0, -4.0], atol=1e-5)
    classes = dict(zip(shard["track_ids"][lo:hi].tolist(), shard["classes"][lo:hi].tolist()))
    assert classes == {10: 0, 11: 1, 13: 2}  # the bus (12) has no class and is dropped


def test_unknown_types_counted_and_out_of_range_objects_dropped(cache):
    _, summary = cache
    assert summary["skipped"]["unknown_object_types"] == {"bus": 9}
    # Ego 3 sits 100 m from every object: its samples have no labels at all.
    shard = _shard(cache[0])
    row = _row(shard, "train/scene_a/3/000002")
    assert shard["box_offsets"][row + 1] == shard["box_offsets"][row]


def test_history_and_future_masks_follow_appearance(cache):
    out, _ = cache
    shard = _shard(out)

    def track(sample_id, track_id):
        row = _row(shard, sample_id)
        lo, hi = shard["box_offsets"][row : row + 2]
        m = lo + int(np.flatnonzero(shard["track_ids"][lo:hi] == track_id)[0])
        return shard["history"][m], shard["history_valid"][m], shard["future"][m], shard["future_valid"][m]

    history, history_valid, future, future_valid = track("train/scene_a/1/000002", 11)
    assert history_valid.tolist() == [False, True]  # the pedestrian appears at step 2
    np.testing.assert_array_equal(history[0], [0, 0, 0])
    assert future_valid.tolist() == [True, True]
    _, _, future, future_valid = track("train/scene_a/1/000002", 13)
    assert future_valid.tolist() == [True, False]  # the truck leaves after step 3
    np.testing.assert_array_equal(future[1], [0, 0, 0])
    history, history_valid, future, _ = track("train/scene_a/1/000002", 10)
    assert history_valid.all()
    # Car 10 drives +1 m/step along map +y = ego +x; the last history step is the label box itself.
    np.testing.assert_allclose(history[:, 0], [9.0, 10.0], atol=1e-5)
    np.testing.assert_allclose(future[:, 0], [11.0, 12.0], atol=1e-5)
    np.testing.assert_allclose(history[:, 2], np.pi / 2, atol=1e-5)


def test_manifest_counts_and_checksums(cache):
    out, summary = cache
    manifest = _manifest(out)
    counts = manifest["counts"]
    assert counts["objects_per_class"] == {"car": 6, "pedestrian": 4, "truck": 6}
    assert counts["voxels"] > 0 and counts["points"] >= counts["voxels"]
    assert set(manifest["files"]) == {"samples-00000.npz", "frames-scene_a.npz"}
    for name, digest in manifest["files"].items():
        assert sha256_file(out / "train" / name) == digest
    assert manifest["config_hash"] == cache_config_digest(manifest["config"]) == summary["config_hash"]


def test_label_fraction_subsets_nested_and_deterministic():
    ids = [f"train/s/{i}/{t:06d}" for i in range(4) for t in range(25)]
    subsets = fusion.label_fraction_subsets(ids, (0.2, 0.5, 1.0), seed=5)
    assert [len(subsets[k]) for k in ("0.2", "0.5", "1.0")] == [20, 50, 100]
    assert set(subsets["0.2"]) <= set(subsets["0.5"]) <= set(subsets["1.0"]) == set(ids)
    assert subsets == fusion.label_fraction_subsets(ids, (1.0, 0.5, 0.2), seed=5)
    assert subsets["0.5"] != fusion.label_fraction_subsets(ids, (0.5,), seed=6)["0.5"]
    # Membership depends on the sample itself, not on which other samples exist.
    more = fusion.label_fraction_subsets(ids + ["train/t/9/000000"], (1.0,), seed=5)
    assert more["1.0"][:-1] == subsets["1.0"]


def test_deterministic_byte_identical(raw_world, cache, tmp_path):
    out, _ = cache
    fuse(raw_world, tmp_path, voxel_backend="numpy")
    first = sorted(p.name for p in (out / "train").iterdir())
    assert first == sorted(p.name for p in (tmp_path / "train").iterdir())
    for name in first:
        assert (out / "train" / name).read_bytes() == (tmp_path / "train" / name).read_bytes(), name


def test_parallel_fuse_is_byte_identical_to_one_process(tmp_path):
    # Three scenarios over two spawned workers must give the files one process gives, byte for byte
    # (results are collected in scenario order), and the same manifest.
    raw = write_toy_world(tmp_path / "raw", scenarios=("scene_a", "scene_b", "scene_c"))
    one = fuse(raw, tmp_path / "one", workers=1)
    two = fuse(raw, tmp_path / "two", workers=2)
    assert one["samples"] == two["samples"] and one["samples"] > 0
    names = sorted(p.name for p in (tmp_path / "one" / "train").iterdir())
    assert len([n for n in names if n.startswith("frames-")]) == 3
    assert names == sorted(p.name for p in (tmp_path / "two" / "train").iterdir())
    for name in names:
        assert (tmp_path / "one" / "train" / name).read_bytes() == (tmp_path / "two" / "train" / name).read_bytes(), name


def test_parallel_fuse_reports_a_bad_frame_with_its_file(tmp_path):
    # An error raised in a worker process reaches the caller whole: file, field and expectation.
    raw = write_toy_world(tmp_path / "raw", scenarios=("scene_a", "scene_b"))
    label = raw / "train" / "scene_b" / "2" / "000002.yaml"
    label.write_text("lidar_pose: [1, 2]\n")
    with pytest.raises(DataError) as caught:
        fuse(raw, tmp_path / "out", workers=2)
    assert caught.value.path == str(label) and "lidar_pose" in caught.value.field


def test_manifest_written_last_and_absent_after_a_failure(raw_world, tmp_path, monkeypatch):
    written = []
    real_npz, real_json = fusion.write_npz, fusion.write_json
    monkeypatch.setattr(fusion, "write_npz", lambda path, **a: (written.append(Path(path).name), real_npz(path, **a)))
    monkeypatch.setattr(fusion, "write_json", lambda path, obj: (written.append(Path(path).name), real_json(path, obj)))
    fuse(raw_world, tmp_path, shard_size=4)
    assert written[-1] == "manifest.json" and written.count("manifest.json") == 1
    assert {"samples-00000.npz", "samples-00001.npz", "samples-00002.npz"} <= set(written)

    def crash(path, **arrays):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(fusion, "write_npz", crash)
    with pytest.raises(KeyboardInterrupt):
        fuse(raw_world, tmp_path)
    # The complete cache of the earlier run lost its manifest: it must not pass for this run's output.
    assert not (tmp_path / "train" / "manifest.json").exists()
    assert not list((tmp_path / "train").glob("*.partial"))


def test_bad_frame_skipped_and_reported(tmp_path):
    raw = write_toy_world(tmp_path / "raw")
    (raw / "train" / "scene_a" / "2" / "000002.yaml").write_text("lidar_pose: [1, 2]\n")
    with pytest.raises(Exception, match="lidar_pose"):
        fuse(raw, tmp_path / "strict")
    summary = fuse(raw, tmp_path / "lenient", on_bad_frame="skip")
    assert summary["skipped"]["bad_inputs_by_field"] == {"lidar_pose": 1}
    assert summary["skipped"]["bad_frames"] == 1
    manifest = _manifest(tmp_path / "lenient")
    # Ego 2 lost its frame at t = 2, so its samples needing it (t = 1, 2, 3) are gone.
    assert not any(sid.startswith("train/scene_a/2/") for sid in manifest["sample_ids"])
    assert summary["samples"] == 6


def test_infrastructure_egos_optional(raw_world, tmp_path):
    summary = fuse(raw_world, tmp_path, ego_types=("infrastructure",))
    assert _manifest(tmp_path)["sample_ids"] == [f"train/scene_a/-1/{t:06d}" for t in (1, 2, 3)]
    assert summary["samples"] == 3


# ----------------------------------------------------------------------------- a tilted synthetic scene


def test_tilted_synthetic_scene_track_states_and_points_agree_with_the_label_boxes(tmp_path):
    """Sensors tilted up to 5 degrees on a map 40 m up: every track state is the ego-frame centre of the
    generator's own track (trajectories.csv), the state at t is the label box, and an object's points
    land inside its label box (grown by what its tilt relative to the ego can move a corner)."""
    from turbotrain.data.dataset import FusedDataset
    from turbotrain.data.synth import generate_dataset
    from turbotrain.geometry import heading_in_frame, points_in_boxes

    generate_dataset(tmp_path / "raw", "smoke", seed=1, progress=False,
                     overrides={"splits": {"train": 1}, "frames": 10, "sensor_tilt_deg": 5.0, "map_height": 40.0})
    grid = Grid((-25.6, -12.8, -3.0, 25.6, 12.8, 3.0), (0.4, 0.4, 0.5), 2)
    fusion.build_cache(tmp_path / "raw", "train", tmp_path / "cache", history=3, future=4, grid=grid, classes=CLASSES,
                       max_points_per_voxel=32, max_voxels=20000, sample_stride=1, progress=False)
    index = opencood.index_split(tmp_path / "raw", "train")[0]
    tracks = opencood.read_trajectories(index).set_index(["track_id", "timestamp"])
    dataset = FusedDataset(tmp_path / "cache", "train", fusion_mode="early")
    shard = _shard(tmp_path / "cache")
    checked_states = object_points = 0
    for row, sample_id in enumerate(shard["sample_ids"].tolist()):
        ego_pose = shard["ego_poses"][row]
        assert np.abs(ego_pose[[3, 5]]).max() > 0.1 and ego_pose[2] > 40.0
        t = int(sample_id.rsplit("/", 1)[1])
        lo, hi = shard["box_offsets"][row : row + 2]
        boxes, states = shard["boxes"][lo:hi], np.concatenate([shard["history"][lo:hi], shard["future"][lo:hi]], axis=1)
        valid = np.concatenate([shard["history_valid"][lo:hi], shard["future_valid"][lo:hi]], axis=1)
        assert np.array_equal(states[:, 2], boxes[:, [0, 1, 6]])  # the state at t is the label box
        map_to_ego = np.linalg.inv(pose_to_matrix(ego_pose))
        for m, track_id in enumerate(shard["track_ids"][lo:hi].tolist()):
            for s in np.flatnonzero(valid[m]):
                truth = tracks.loc[(track_id, f"{t - 2 + s:06d}")]
                centre = (map_to_ego @ [truth.x, truth.y, truth.z, 1.0])[:2]
                assert np.abs(states[m, s, :2] - centre).max() < 1e-5  # float32 storage
                yaw = heading_in_frame(np.radians(truth.yaw_deg), map_to_ego)
                assert abs(np.angle(np.exp(1j * (states[m, s, 2] - yaw)))) < 1e-5
                checked_states += 1
        # points: in the map frame inside the generator's box, in the ego frame inside the label box
        assert dataset.sample_id(row) == sample_id
        points = dataset.early_fused_points(row, step=2)[:, :3]  # every agent's points at t, ego frame
        in_map = transform_points(points.astype(np.float64), pose_to_matrix(ego_pose))
        for m, track_id in enumerate(shard["track_ids"][lo:hi].tolist()):
            truth = tracks.loc[(track_id, f"{t:06d}")]
            map_box = np.array([[truth.x, truth.y, truth.z, truth.length, truth.width, truth.height, np.radians(truth.yaw_deg)]])
            on_object = points_in_boxes(in_map, map_box + [0, 0, 0, 0.1, 0.1, 0.1, 0])[:, 0]
            # tilt relative to the ego below 10 degrees: a corner moves at most half the diagonal * sin(10)
            margin = 0.5 * np.linalg.norm(boxes[m, 3:6]) * np.sin(np.radians(10.0)) + 0.1
            grown = boxes[m : m + 1].astype(np.float64) + [0, 0, 0, 2 * margin, 2 * margin, 2 * margin, 0]
            assert points_in_boxes(points[on_object], grown)[:, 0].all()
            object_points += int(on_object.sum())
    assert checked_states > 50 and object_points > 50


def test_each_label_file_is_parsed_once(raw_world, tmp_path, monkeypatch):
    parsed = Counter()
    real = opencood._load_yaml
    monkeypatch.setattr(opencood, "_load_yaml", lambda path: (parsed.update([str(path)]), real(path))[1])
    summary = fuse(raw_world, tmp_path / "cache")
    assert summary["samples"] > 0 and parsed and max(parsed.values()) == 1
