"""FusedDataset over the toy-world cache of test_fusion (written with the real OpenCOOD writer)."""
import json

import numpy as np
import pytest
import torch

from test_fusion import AGENT_POSES, HISTORY, SHARED_WORLD_POINT, fuse, write_toy_world
from turbotrain.data.dataset import FusedDataset, MappedNpz, make_loader
from turbotrain.data.sample import Batch, collate
from turbotrain.data.voxelize import sort_voxels, voxelize_numpy
from turbotrain.geometry import pose_to_matrix, transform_points
from turbotrain.utils.errors import ConfigError, DataError

SAMPLE = "train/scene_a/1/000002"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    raw = write_toy_world(tmp_path_factory.mktemp("raw"))
    out = tmp_path_factory.mktemp("cache")
    fuse(raw, out)
    return out


def _index(dataset: FusedDataset, sample_id: str) -> int:
    return [dataset.sample_id(i) for i in range(len(dataset))].index(sample_id)


def _frames(dataset: FusedDataset, sample_id: str = SAMPLE):
    sample = dataset[_index(dataset, sample_id)]
    return sample, sorted((f.step, f.agent_id) for f in sample.frames)


def test_intermediate_has_every_cooperating_agent_frame(cache_dir):
    sample, frames = _frames(FusedDataset(cache_dir, "train"))
    assert frames == [(s, a) for s in range(HISTORY) for a in (-1, 1, 2)]
    infra = next(f for f in sample.frames if f.agent_id == -1)
    assert infra.agent_type == 1
    for frame in sample.frames:
        assert frame.voxels.shape[1:] == (4, 4) and frame.voxels.dtype == np.float32
        assert len(frame.coords) == len(frame.num_points) == len(frame.voxels) > 0
        assert (frame.num_points >= 1).all() and frame.coords.dtype == np.int32


def test_no_fusion_keeps_the_ego_only(cache_dir):
    sample, frames = _frames(FusedDataset(cache_dir, "train", fusion_mode="none"))
    assert frames == [(0, 1), (1, 1)]
    assert len(sample.boxes) == 3  # labels do not depend on the fusion mode


def test_fewer_history_steps_keep_the_most_recent(cache_dir):
    full = FusedDataset(cache_dir, "train")
    short = FusedDataset(cache_dir, "train", history=1)
    sample, frames = _frames(short)
    assert frames == [(0, -1), (0, 1), (0, 2)]
    assert sample.history.shape[1] == 1
    reference = full[_index(full, SAMPLE)]
    np.testing.assert_array_equal(sample.history[:, 0], reference.history[:, -1])
    current = {f.agent_id: f for f in reference.frames if f.step == HISTORY - 1}
    for frame in sample.frames:
        np.testing.assert_array_equal(frame.voxels, current[frame.agent_id].voxels)


def test_early_fusion_one_identity_frame_per_step(cache_dir):
    dataset = FusedDataset(cache_dir, "train", fusion_mode="early")
    sample, frames = _frames(dataset)
    assert frames == [(0, 1), (1, 1)]
    for frame in sample.frames:
        np.testing.assert_array_equal(frame.pose_to_ego, np.eye(4))
    fused = dataset.early_fused_points(_index(dataset, SAMPLE), HISTORY - 1)
    assert fused.shape[1] == 5 and set(np.unique(fused[:, 4])) == {0.0, 1.0, 2.0}
    # The shared world point appears twice (ego slot 0 and vehicle 2 = slot 2), at the same ego position.
    marked = fused[np.isclose(fused[:, 3], 0.99)]
    assert sorted(marked[:, 4].tolist()) == [0.0, 2.0]
    expected = transform_points(SHARED_WORLD_POINT[None], np.linalg.inv(pose_to_matrix(AGENT_POSES[1])))[0]
    np.testing.assert_allclose(marked[:, :3], [expected, expected], atol=1e-4)
    # The step's frame is the fused cloud voxelised on the grid.
    current = next(f for f in sample.frames if f.step == HISTORY - 1)
    reference = voxelize_numpy(fused[:, :4], dataset.grid, 4, 100000)
    for got, want in zip(sort_voxels(current.voxels, current.coords, current.num_points, dataset.grid),
                         sort_voxels(*reference, dataset.grid)):
        np.testing.assert_array_equal(got, want)
    assert current.num_points.sum() > 300


def test_intermediate_points_agree_with_early_fused_points(cache_dir):
    dataset = FusedDataset(cache_dir, "train")
    i = _index(dataset, SAMPLE)
    warped = [transform_points(f.points(), f.pose_to_ego) for f in dataset[i].frames if f.step == 0]
    fused = dataset.early_fused_points(i, 0)[:, :4]
    key = lambda p: p[np.lexsort(p.T[::-1])]  # noqa: E731 - order-free comparison
    np.testing.assert_allclose(key(np.concatenate(warped)), key(fused), atol=1e-5)


def test_label_fraction_selects_the_manifest_subset(cache_dir):
    manifest = json.loads((cache_dir / "train" / "manifest.json").read_text())
    half = FusedDataset(cache_dir, "train", label_fraction=0.5)
    assert [half.sample_id(i) for i in range(len(half))] == manifest["label_fractions"]["0.5"]
    assert len(FusedDataset(cache_dir, "train", label_fraction=0.2)) == 2  # ceil(0.2 * 9)
    with pytest.raises(DataError, match="label_fractions"):
        FusedDataset(cache_dir, "train", label_fraction=0.3)


def test_collate_and_seeded_loader(cache_dir):
    dataset = FusedDataset(cache_dir, "train")
    batch = collate([dataset[0], dataset[4]])
    assert isinstance(batch, Batch) and batch.batch_size == 2
    assert batch.frame_pose_to_ego.shape == (len(batch.frame_sample), 4, 4)
    assert int(batch.coords[:, 0].max()) == len(batch.frame_sample) - 1
    assert batch.boxes.shape[0] == 2 and batch.history.shape[2] == HISTORY
    orders = [[sid for b in make_loader(dataset, 4, shuffle=True, seed=s) for sid in b.sample_ids] for s in (1, 1, 2)]
    assert orders[0] == orders[1] != orders[2]
    assert sorted(orders[0]) == sorted(dataset.sample_id(i) for i in range(len(dataset)))


def test_mapped_npz_matches_np_load(cache_dir):
    path = cache_dir / "train" / "frames-scene_a.npz"
    mapped = MappedNpz(path)
    with np.load(path, allow_pickle=False) as archive:
        for name in archive.files:
            np.testing.assert_array_equal(mapped[name], archive[name])
    assert isinstance(mapped["points"], np.memmap)


def test_manifest_errors_name_the_file(cache_dir, tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path}/train/manifest.json.*manifest"):
        FusedDataset(tmp_path, "train")
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="valid JSON"):
        FusedDataset(tmp_path, "train")
    manifest = json.loads((cache_dir / "train" / "manifest.json").read_text())
    manifest["config"]["comm_range"] = 10.0
    (tmp_path / "train" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="config_hash"):
        FusedDataset(tmp_path, "train")
    with pytest.raises(DataError, match="another config"):
        FusedDataset(cache_dir, "train", expected_config_hash="0" * 64)
    with pytest.raises(ConfigError, match="history"):
        FusedDataset(cache_dir, "train", history=HISTORY + 1)


def test_checksum_verification(cache_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(cache_dir, copy)
    assert len(FusedDataset(copy, "train", verify_checksums=True)) == 9
    with open(copy / "train" / "frames-scene_a.npz", "r+b") as fh:
        fh.seek(-8, 2)
        fh.write(b"\x00\x01\x02\x03\x04\x05\x06\x07")
    with pytest.raises(DataError, match="frames-scene_a.npz.*sha256"):
        FusedDataset(copy, "train", verify_checksums=True)


def test_dataset_survives_worker_pickling(cache_dir):
    import pickle

    dataset = FusedDataset(cache_dir, "train", fusion_mode="early")
    first = dataset[3]
    clone = pickle.loads(pickle.dumps(dataset))
    assert not clone._stores and not clone._shards
    again = clone[3]
    assert torch.equal(collate([first]).voxels, collate([again]).voxels)


def test_bev_picture_written_atomically(cache_dir, tmp_path):
    from test_fusion import CLASSES, GRID
    from turbotrain.viz import plot_sample_bev

    dataset = FusedDataset(cache_dir, "train")
    sample = dataset[_index(dataset, SAMPLE)]
    predictions = {"boxes": sample.boxes, "scores": np.linspace(0.9, 0.3, len(sample.boxes)),
                   "trajectories": np.zeros((len(sample.boxes), 2, 3, 2)), "mode_probs": np.full((len(sample.boxes), 2), 0.5)}
    out = plot_sample_bev(sample, tmp_path / "bev.png", GRID, CLASSES, title="toy", predictions=predictions)
    header = out.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")
    assert width > 1000 and 0.3 < height / width < 0.8
    assert [p.name for p in tmp_path.iterdir()] == ["bev.png"]  # no temporary left behind


def test_points_first_moves_each_agents_points_into_the_ego_frame(cache_dir):
    warped = FusedDataset(cache_dir, "train")
    projected = FusedDataset(cache_dir, "train", fusion_mode="points_first")
    i = _index(warped, SAMPLE)
    own = {(f.step, f.agent_id): f for f in warped[i].frames}
    moved = {(f.step, f.agent_id): f for f in projected[i].frames}
    assert set(own) == set(moved)  # the same agent-frames, each now in the ego frame
    key = lambda p: p[np.lexsort(p.T[::-1])]  # noqa: E731 - order-free comparison
    for slot, frame in moved.items():
        np.testing.assert_array_equal(frame.pose_to_ego, np.eye(4))
        expected = transform_points(own[slot].points(), own[slot].pose_to_ego)
        expected = expected[projected.grid.contains(expected)]
        np.testing.assert_allclose(key(frame.points()), key(expected), atol=1e-5)


def test_points_first_and_feature_warp_agree_for_an_agent_at_the_ego_pose(cache_dir):
    """The ego's current frame is at the ego's pose: moving its points is the identity, and so is the
    feature warp, so a model must see the same map through either alignment."""
    from test_joint_model import model_cfg
    from turbotrain.models.joint import CooperativePnP
    from turbotrain.utils.seed import seed_everything

    def ego_now(mode: str):
        dataset = FusedDataset(cache_dir, "train", fusion_mode=mode, history=1)
        sample = dataset[_index(dataset, SAMPLE)]
        sample.frames = [f for f in sample.frames if f.agent_id == 1]  # the ego (vehicle 1)
        return dataset.grid, collate([sample])

    grid, warped = ego_now("intermediate")
    _, projected = ego_now("points_first")
    np.testing.assert_array_equal(warped.frame_pose_to_ego.numpy(), projected.frame_pose_to_ego.numpy())
    seed_everything(0)
    model = CooperativePnP(model_cfg("fcooper"), grid, ["car", "pedestrian", "truck"], history=1, future=2).eval()
    with torch.no_grad():
        a, b = model.forward_bev(warped)["bev"], model.forward_bev(projected)["bev"]
    assert a.abs().sum() > 0
    assert torch.allclose(a, b, atol=1e-5)


def test_raw_target_points_keep_a_dense_cell_the_voxel_cap_thins():
    """CooPre's targets are the pillar's raw points: a cell far denser than the per-voxel cap keeps up
    to target_points_per_cell of them, all inside the grid, the same ones on every build."""
    from turbotrain.data.cache.builder import FrameStore
    from turbotrain.data.records import AgentFrameRecord
    from turbotrain.data.voxelize import Voxelizer
    from turbotrain.grid import Grid

    grid = Grid((-8.0, -8.0, -2.0, 8.0, 8.0, 2.0), (0.4, 0.4, 0.5), 2)  # 0.8 m cells
    rng = np.random.default_rng(0)
    dense = np.c_[rng.uniform(0.05, 0.35, (500, 2)), rng.uniform(-1.0, 1.0, 500), np.ones(500)]  # one voxel column
    sparse = np.c_[rng.uniform(-7.9, 7.9, (300, 2)), rng.uniform(-1.9, 1.9, 300), np.ones(300)]
    outside = np.array([[20.0, 0.0, 0.0, 1.0], [0.0, 0.0, 5.0, 1.0]])
    record = AgentFrameRecord("s", 1, "000001", np.zeros(6), np.vstack([dense, sparse, outside]).astype(np.float32))
    stores = [FrameStore(Voxelizer(grid, 4, 10000, "numpy"), target_points_per_cell=64, seed=0) for _ in range(2)]
    arrays = [store.arrays() if store.slot_of(_Reader(record), 1, "000001") == 0 else None for store in stores]
    targets = arrays[0]["target_points"]
    np.testing.assert_array_equal(targets, arrays[1]["target_points"])  # seeded: the same on every build
    assert grid.contains(targets).all() and arrays[0]["target_offsets"].tolist() == [0, len(targets)]
    cells = grid.bev_cell_of(targets[:, :2])
    _, per_cell = np.unique(cells, axis=0, return_counts=True)
    assert per_cell.max() == 64  # the dense cell: 64 raw points
    in_dense_voxels = (arrays[0]["points"][:, :2] >= 0).all(1) & (arrays[0]["points"][:, :2] < 0.4).all(1)
    assert in_dense_voxels.sum() <= 4 * 4  # the voxels keep 4 points in each of the 4 z cells it spans
    off = FrameStore(Voxelizer(grid, 4, 10000, "numpy"), target_points_per_cell=0)
    off.slot_of(_Reader(record), 1, "000001")
    assert off.arrays()["target_points"].shape == (0, 4)


class _Reader:
    """The one ScenarioReader method FrameStore calls, over a single record."""

    def __init__(self, record):
        self.record = record

    def has(self, agent_id, timestamp):
        return True

    def with_points(self, agent_id, timestamp):
        return self.record


def test_frames_carry_their_raw_target_points_in_the_voxels_frame(cache_dir):
    own = FusedDataset(cache_dir, "train", target_points=True)
    moved = FusedDataset(cache_dir, "train", fusion_mode="points_first", target_points=True)
    i = _index(own, SAMPLE)
    assert all(f.target_points is None for f in FusedDataset(cache_dir, "train")[i].frames)
    own_frames = {(f.step, f.agent_id): f for f in own[i].frames}
    for frame in moved[i].frames:
        source = own_frames[(frame.step, frame.agent_id)]
        assert len(source.target_points) > 0
        np.testing.assert_allclose(frame.target_points, transform_points(source.target_points, source.pose_to_ego),
                                   atol=1e-5)
    early = FusedDataset(cache_dir, "train", fusion_mode="early", target_points=True)[i]
    current = [f for f in early.frames if f.step == HISTORY - 1][0]
    expected = sum(len(f.target_points) for f in own_frames.values() if f.step == HISTORY - 1)
    assert len(current.target_points) == expected
    batch = collate([own[i]])
    assert len(batch.target_points) == sum(len(f.target_points) for f in own[i].frames)
    assert batch.target_frame.max() < len(batch.frame_pose_to_ego)
