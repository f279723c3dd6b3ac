import numpy as np
import pytest
import torch

from turbotrain.data.sample import AgentFrame, Sample, collate
from turbotrain.grid import Grid
from turbotrain.pretrain.masking import BevCellIndexer, plan_masking

GRID = Grid((-12.8, -6.4, -2.0, 12.8, 6.4, 2.0), (0.4, 0.4, 0.5), 2)


def frame_from_points(points, agent_id, step, pose, agent_type=0):
    """Voxelise points (sensor frame) with a plain numpy loop-free binning (test helper)."""
    r, vs = np.array(GRID.point_cloud_range), np.array(GRID.voxel_size)
    idx = np.floor((points[:, :3] - r[:3]) / vs).astype(np.int64)
    keep = np.all((idx >= 0) & (idx < np.array(GRID.grid_size)), axis=1)
    points, idx = points[keep], idx[keep]
    keys, inverse = np.unique(idx[:, ::-1], axis=0, return_inverse=True)
    P = 8
    voxels = np.zeros((len(keys), P, 4), np.float32)
    num = np.zeros(len(keys), np.int32)
    for p, v in zip(points, inverse.reshape(-1)):
        if num[v] < P:
            voxels[v, num[v]] = p
            num[v] += 1
    return AgentFrame(voxels, num, keys.astype(np.int32), pose, agent_id, agent_type, step)


def make_sample(rng, steps=2, agents=(1, 2), sid="train/s0/1/000010"):
    frames = []
    for step in range(steps):
        for a in agents:
            pts = np.concatenate([rng.uniform([-12, -6, -1.5], [12, 6, 1.5], size=(400, 3)),
                                  rng.uniform(0, 1, size=(400, 1))], axis=1).astype(np.float32)
            pose = np.eye(4)
            pose[0, 3] = 0.0 if a == agents[0] else 1.6  # cooperator offset by two BEV cells
            frames.append(frame_from_points(pts, a, step, pose))
    empty = np.zeros((0, 7), np.float32)
    return Sample(sid, frames, empty, np.zeros(0, np.int64), np.zeros(0, np.int64),
                  np.zeros((0, steps, 3), np.float32), np.zeros((0, steps), bool),
                  np.zeros((0, 5, 3), np.float32), np.zeros((0, 5), bool))


@pytest.mark.parametrize("ratio", [0.6, 0.7, 0.8])
def test_independent_masking_hits_exact_share_per_step(ratio):
    rng = np.random.default_rng(0)
    batch = collate([make_sample(rng), make_sample(rng, sid="train/s1/1/000011")])
    plan = plan_masking(batch, GRID, 2, ratio, "independent", generator=torch.Generator().manual_seed(1))
    indexer = BevCellIndexer(GRID, 2)
    keys = indexer.keys(indexer.voxel_centres(batch.coords), batch.coords[:, 0].long(), batch)
    cells = indexer.decode(torch.unique(keys[keys >= 0]))
    for b in range(2):
        for s in range(2):
            n = int(((cells[:, 0] == b) & (cells[:, 1] == s)).sum())
            m = int(((plan.cells[:, 0] == b) & (plan.cells[:, 1] == s)).sum())
            assert m == round(n * ratio)


def test_shared_masking_masks_the_same_cells_at_every_step():
    rng = np.random.default_rng(1)
    batch = collate([make_sample(rng, steps=3)])
    plan = plan_masking(batch, GRID, 3, 0.7, "shared", generator=torch.Generator().manual_seed(2))
    by_step = [set(map(tuple, plan.cells[plan.cells[:, 1] == s][:, 2:].tolist())) for s in range(3)]
    union = set().union(*by_step)
    indexer = BevCellIndexer(GRID, 3)
    keys = indexer.keys(indexer.voxel_centres(batch.coords), batch.coords[:, 0].long(), batch)
    cells = indexer.decode(torch.unique(keys[keys >= 0]))
    spatial_nonempty = {tuple(c) for c in cells[:, 2:].tolist()}
    assert len(union) == round(0.7 * len(spatial_nonempty))
    # a masked spatial cell is masked at every step where it is non-empty
    for s in range(3):
        nonempty_s = {tuple(c) for c in cells[cells[:, 1] == s][:, 2:].tolist()}
        assert by_step[s] == union & nonempty_s


def test_masked_voxels_are_exactly_those_in_masked_cells_and_targets_come_from_all_agents():
    rng = np.random.default_rng(2)
    batch = collate([make_sample(rng, steps=1)])
    plan = plan_masking(batch, GRID, 1, 0.5, "independent", max_target_points=64,
                        generator=torch.Generator().manual_seed(3))
    indexer = BevCellIndexer(GRID, 1)
    keys = indexer.keys(indexer.voxel_centres(batch.coords), batch.coords[:, 0].long(), batch)
    masked_keys = set(((plan.cells[:, 0] * 1 + plan.cells[:, 1]) * GRID.bev_shape[0] * GRID.bev_shape[1]
                       + plan.cells[:, 2] * GRID.bev_shape[1] + plan.cells[:, 3]).tolist())
    expected = torch.tensor([k in masked_keys for k in keys.tolist()])
    assert torch.equal(plan.voxel_masked, expected)
    # targets: every masked cell has points, offsets lie inside the cell, both agents contribute
    assert plan.target_mask.any(1).all()
    offsets = plan.target[plan.target_mask]
    assert (offsets[:, :2].abs() <= 0.4 + 1e-5).all()
    masked_frames = set(batch.coords[plan.voxel_masked, 0].tolist())
    assert masked_frames == {0, 1}


def test_target_cap_and_determinism():
    rng = np.random.default_rng(3)
    batch = collate([make_sample(rng, steps=1)])
    a = plan_masking(batch, GRID, 1, 0.7, "independent", max_target_points=2, generator=torch.Generator().manual_seed(5))
    b = plan_masking(batch, GRID, 1, 0.7, "independent", max_target_points=2, generator=torch.Generator().manual_seed(5))
    assert a.target.shape[1] == 2
    assert torch.equal(a.cells, b.cells) and torch.equal(a.target, b.target)


def test_targets_come_from_the_batchs_raw_points_when_it_carries_them():
    rng = np.random.default_rng(4)
    sample = make_sample(rng, steps=1)
    for frame in sample.frames:  # raw points: the voxels' points plus a dense copy 1 cm above them
        points = frame.points()
        frame.target_points = np.vstack([points, points + np.array([0, 0, 0.01, 0], np.float32)])
    raw = collate([sample])
    capped = collate([make_sample(np.random.default_rng(4), steps=1)])
    plan_raw = plan_masking(raw, GRID, 1, 0.5, "independent", max_target_points=400,
                            generator=torch.Generator().manual_seed(3))
    plan_capped = plan_masking(capped, GRID, 1, 0.5, "independent", max_target_points=400,
                               generator=torch.Generator().manual_seed(3))
    assert torch.equal(plan_raw.cells, plan_capped.cells)  # masking reads the voxels either way
    assert plan_raw.target_mask.sum() == 2 * plan_capped.target_mask.sum()  # targets: the raw points
