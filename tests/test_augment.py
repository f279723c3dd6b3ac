"""CooPre's pretraining recipe: global augmentation drawn per (seed, epoch, sample), Adam with L2
decay, and a warm-up that starts at a fraction of the rate."""
import math

import numpy as np
import pytest
import torch

from test_dataset import SAMPLE, _index, cache_dir  # noqa: F401 (the toy-world cache fixture)
from turbotrain.data.augment import GlobalAugmentation, conjugate_pose
from turbotrain.data.dataset import FusedDataset
from turbotrain.geometry import transform_points
from turbotrain.train.engine import GlobalBatchSampler, TrainConfig, build_optimizer
from turbotrain.train.schedule import warmup_cosine_lr

COOPRE = GlobalAugmentation(flip_x=True, rotation_deg=45.0, scale=(0.95, 1.05))
key = lambda p: p[np.lexsort(p[:, :3].T[::-1])]  # noqa: E731 - order-free comparison


def test_draws_are_a_function_of_seed_epoch_and_sample_within_coopres_ranges():
    assert np.array_equal(COOPRE.draw(0, 1, 2), COOPRE.draw(0, 1, 2))
    draws = [COOPRE.draw(0, epoch, 7) for epoch in range(200)]
    assert not np.allclose(draws[0], draws[1])
    flips = 0
    for A in draws:
        linear = A[:3, :3]
        scale = abs(np.linalg.det(linear)) ** (1 / 3)
        assert 0.95 <= scale <= 1.05
        flips += np.linalg.det(linear) < 0
        # the angle of the rotation part, with the flip undone: |yaw| <= 45 deg
        unflipped = linear / scale @ (np.diag([1, -1, 1]) if np.linalg.det(linear) < 0 else np.eye(3))
        assert abs(math.degrees(math.atan2(unflipped[1, 0], unflipped[0, 0]))) <= 45.0 + 1e-9
        np.testing.assert_array_equal(A[2, :2], [0, 0])  # about z only
    assert 60 < flips < 140  # probability 0.5
    assert GlobalAugmentation.from_config({}) is None
    assert GlobalAugmentation.from_config({"flip_x": False, "rotation_deg": 0, "scale": [1, 1]}) is None


def test_a_conjugated_pose_is_rigid_and_keeps_the_ego_cloud_consistent():
    rng = np.random.default_rng(0)
    yaw = 0.7
    pose = np.eye(4)
    pose[:2, :2] = [[math.cos(yaw), -math.sin(yaw)], [math.sin(yaw), math.cos(yaw)]]
    pose[:3, 3] = [5.0, -2.0, 0.3]
    points = rng.normal(size=(50, 4)).astype(np.float64)
    for epoch in range(10):
        A = COOPRE.draw(3, epoch, 0)
        moved = conjugate_pose(A, pose)
        np.testing.assert_allclose(moved[:3, :3] @ moved[:3, :3].T, np.eye(3), atol=1e-12)
        assert np.linalg.det(moved[:3, :3]) == pytest.approx(1.0)
        # A (P p) == (A P A^-1)(A p)
        np.testing.assert_allclose(transform_points(transform_points(points, pose), A),
                                   transform_points(transform_points(points, A), moved), atol=1e-9)


def test_the_dataset_augments_by_epoch_key_and_keeps_every_agent_consistent(cache_dir):  # noqa: F811
    from scipy.spatial import cKDTree

    plain = FusedDataset(cache_dir, "train", fusion_mode="intermediate")
    augmented = FusedDataset(cache_dir, "train", fusion_mode="intermediate", augmentation=COOPRE, augmentation_seed=5)
    i, n = _index(plain, SAMPLE), len(plain)
    assert augmented.epoch_keyed and not plain.epoch_keyed
    reference = {(f.step, f.agent_id): f for f in plain[i].frames}
    for epoch in (0, 3):
        A = COOPRE.draw(5, epoch, i)
        for frame in augmented[epoch * n + i].frames:
            own = reference[(frame.step, frame.agent_id)]
            np.testing.assert_allclose(frame.pose_to_ego, conjugate_pose(A, own.pose_to_ego), atol=1e-9)
            # through its augmented pose, the agent's cloud is the augmented ego-frame cloud A P p
            in_ego = transform_points(frame.points(), frame.pose_to_ego)[:, :3]
            expected = transform_points(transform_points(own.points(), own.pose_to_ego), A)[:, :3]
            distance, _ = cKDTree(expected).query(in_ego)
            assert len(in_ego) > 0.8 * len(expected) and distance.max() < 1e-3
    first, again, later = augmented[i], augmented[i], augmented[3 * n + i]
    assert np.array_equal(first.frames[0].voxels, again.frames[0].voxels)
    assert not np.array_equal(first.frames[0].pose_to_ego, later.frames[0].pose_to_ego)


def test_early_fusion_augments_the_fused_cloud(cache_dir):  # noqa: F811
    plain = FusedDataset(cache_dir, "train", fusion_mode="early")
    augmented = FusedDataset(cache_dir, "train", fusion_mode="early", augmentation=COOPRE, augmentation_seed=1)
    i = _index(plain, SAMPLE)
    A = COOPRE.draw(1, 0, i)
    fused = transform_points(plain.early_fused_points(i, 0)[:, :4], A)
    got = next(f for f in augmented[i].frames if f.step == 0)
    fused = fused[augmented.grid.contains(fused)]
    assert len(got.points()) > 0
    np.testing.assert_allclose(key(got.points())[:, :3], key(fused)[:, :3], atol=1e-4)


def test_the_sampler_passes_the_epoch_to_an_epoch_keyed_dataset():
    from turbotrain.train.distributed import DistContext

    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    plain = list(GlobalBatchSampler(10, 2, 1, ctx, seed=0, epoch=2))
    keyed = list(GlobalBatchSampler(10, 2, 1, ctx, seed=0, epoch=2, epoch_keyed=True))
    assert [[k - 20 for k in batch] for batch in keyed] == plain


def test_coopres_optimiser_and_warm_up():
    # warm-up 2e-4 -> 2e-3 over 10 steps: step 0 gives 2e-4, step 5 gives 2e-4 + 0.5 * 1.8e-3 = 1.1e-3
    assert warmup_cosine_lr(0, 2e-3, 2e-5, 10, 15, start_ratio=0.1) == pytest.approx(2e-4)
    assert warmup_cosine_lr(5, 2e-3, 2e-5, 10, 15, start_ratio=0.1) == pytest.approx(1.1e-3)
    assert warmup_cosine_lr(15, 2e-3, 2e-5, 10, 15, start_ratio=0.1) == pytest.approx(2e-5)
    assert warmup_cosine_lr(0, 2e-3, 0.0, 10, 15) == pytest.approx(2e-4)  # default: lr / warm-up steps
    model = torch.nn.Linear(3, 2)
    adam = build_optimizer(model, [], TrainConfig(max_steps=1, optimizer="adam", eps=1e-10, weight_decay=1e-4))
    assert type(adam) is torch.optim.Adam and adam.defaults["eps"] == 1e-10
    assert [g["weight_decay"] for g in adam.param_groups] == [1e-4, 0.0]  # no decay on the bias
    assert type(build_optimizer(model, [], TrainConfig(max_steps=1))) is torch.optim.AdamW
