"""The assembled CooperativePnP model with the real SECOND encoder on toy cooperative batches."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from turbotrain.data.sample import collate
from turbotrain.grid import Grid
from turbotrain.models.joint import CooperativePnP
from turbotrain.testing import ToySceneConfig, toy_batch, toy_samples
from turbotrain.utils.seed import seed_everything

CLASSES = ["car", "pedestrian", "truck"]
HISTORY, FUTURE = 2, 4
TINY_GRID = Grid((-12.8, -12.8, -3.0, 12.8, 12.8, 1.0), (0.4, 0.4, 0.5), 2)  # 32 x 32 BEV
# A crop small enough for the paper-size model on CPU: 16 x 16 BEV at SECOND's stride 8.
PAPER_GRID = Grid((-6.4, -6.4, -3.0, 6.4, 6.4, 1.0), (0.1, 0.1, 0.25), 8)
# One vehicle-centric and one infrastructure-centric sample, so every agent-type pair occurs.
SCENES = (ToySceneConfig(history=HISTORY, future=FUTURE), ToySceneConfig(history=HISTORY, future=FUTURE, ego_is_infrastructure=True))


def model_cfg(fusion: str = "attfuse", temporal: str = "attention", size: str = "tiny") -> dict:
    return {
        "size": size,
        "encoder": {"name": "second", "backend": "auto"},
        "bev_backbone": {"name": "resnet_fpn"},
        "fusion": {"name": fusion},
        "temporal": {"name": temporal},
        "detection_head": {"name": "center"},
        "prediction_head": {"name": "multimodal"},
    }


def build(fusion: str = "attfuse", temporal: str = "attention", size: str = "tiny", grid: Grid = TINY_GRID) -> CooperativePnP:
    seed_everything(0)
    return CooperativePnP(model_cfg(fusion, temporal, size), grid, CLASSES, HISTORY, FUTURE)


@pytest.fixture(scope="module")
def batch():
    return toy_batch(TINY_GRID, SCENES, seed=3)


def test_tiny_forward_shapes(batch):
    model = build()
    bev = model.forward_bev(batch)
    C = model.bev_backbone.out_channels
    assert bev["step_bev"].shape == (2, HISTORY, C, 32, 32)
    assert bev["bev"].shape == (2, C, 32, 32)
    assert bev["step_valid"].all()
    out = model(batch)
    assert out["detection"]["heatmap"].shape == (2, len(CLASSES), 32, 32)
    assert out["prediction"]["trajectories"].shape == (2, batch.boxes.shape[1], 3, FUTURE, 2)


def test_paper_size_on_a_small_grid_crop():
    model = build(size="paper", grid=PAPER_GRID).eval()
    scenes = (ToySceneConfig(history=HISTORY, future=FUTURE, num_objects=1, points_per_box=150, ground_points=200),)
    small = toy_batch(PAPER_GRID, scenes, seed=0)
    with torch.no_grad():
        out = model(small)
        losses = model.losses(out, small)
    assert model.bev_backbone.out_channels == 384
    assert out["bev"].shape == (1, 384, 16, 16)
    assert out["prediction"]["trajectories"].shape == (1, 1, 6, FUTURE, 2)
    assert all(torch.isfinite(v) for v in losses.values())


COMBINATIONS = [(f, "attention") for f in ("ego", "fcooper", "attfuse", "attfuse_mha", "hmsa_lite", "v2xvit")] + [("v2xvit", "conv_gru"), ("fcooper", "none")]


@pytest.mark.parametrize("fusion,temporal", COMBINATIONS)
def test_every_parameter_receives_a_gradient(batch, fusion, temporal):
    model = build(fusion, temporal)
    losses = model.losses(model(batch), batch)
    (losses["detection"] + losses["prediction"]).backward()
    silent = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert silent == []


def test_losses_are_finite_and_named(batch):
    model = build("v2xvit")
    losses = model.losses(model(batch), batch)
    assert {"detection", "prediction"} <= set(losses)
    assert {"detection/heatmap", "detection/regression", "detection/direction"} <= set(losses)
    assert {"prediction/regression", "prediction/classification"} <= set(losses)
    assert all(v.ndim == 0 and torch.isfinite(v) for v in losses.values())


def test_predict_returns_well_formed_outputs(batch):
    model = build()
    model.train()
    results = model.predict(batch, score_threshold=0.0, max_detections=7)
    assert model.training  # predict restores the caller's mode
    assert len(results) == batch.batch_size
    for r in results:
        n = len(r["boxes"])
        assert 0 < n <= 7
        assert r["boxes"].shape == (n, 7) and r["boxes"].dtype == np.float32
        assert r["scores"].shape == (n,) and np.all(np.diff(r["scores"]) <= 0)
        assert r["classes"].shape == (n,) and set(r["classes"].tolist()) <= {0, 1, 2}
        assert r["trajectories"].shape == (n, 3, FUTURE, 2) and r["trajectories"].dtype == np.float32
        assert r["mode_probs"].shape == (n, 3)
        np.testing.assert_allclose(r["mode_probs"].sum(axis=1), 1.0, rtol=1e-5)
        assert np.isfinite(r["trajectories"]).all()


def test_predict_without_detections_gives_empty_arrays(batch):
    (r, _) = build().predict(batch, score_threshold=1.0)
    assert r["boxes"].shape == (0, 7) and r["trajectories"].shape == (0, 3, FUTURE, 2) and r["mode_probs"].shape == (0, 3)


def test_feature_hook_sees_voxel_features_and_changes_the_result(batch):
    model = build().eval()
    seen = []

    def blank(features: torch.Tensor) -> torch.Tensor:
        seen.append(features.shape)
        return torch.zeros_like(features)

    with torch.no_grad():
        plain = model.forward_bev(batch)["bev"]
        hooked = model.forward_bev(batch, feature_hook=blank)["bev"]
    assert seen and seen[0][0] == len(batch.voxels)
    assert not torch.allclose(plain, hooked)


def test_cooperator_order_does_not_change_the_fused_map():
    # Two cooperators: the scene's one and a copy of it 2.4 m further. Swapping their ids swaps their slots.
    def with_extra_cooperator(extra_id: int, original_id: int):
        (sample,) = toy_samples(TINY_GRID, SCENES[:1], seed=5)
        coop = [f for f in sample.frames if f.agent_id == -1]
        for f in coop:
            shifted = f.pose_to_ego.copy()
            shifted[0, 3] += 2.4
            sample.frames.append(dataclasses.replace(f, agent_id=extra_id, pose_to_ego=shifted))
            f.agent_id = original_id
        return collate([sample])

    first, swapped = with_extra_cooperator(-3, -1), with_extra_cooperator(-1, -3)
    assert first.frame_agent.max() == 2
    assert not torch.equal(first.frame_pose_to_ego, swapped.frame_pose_to_ego)  # the slots really differ
    for fusion in ("fcooper", "attfuse", "v2xvit"):
        model = build(fusion).eval()
        with torch.no_grad():
            a, b = model.forward_bev(first)["bev"], model.forward_bev(swapped)["bev"]
        assert torch.allclose(a, b, atol=1e-4), fusion


def test_per_scale_attfuse_of_the_ego_alone_is_the_unfused_backbone(batch):
    """With only the ego's frames, each at the ego's pose (warping is then the identity at every
    scale), attention over one agent returns its feature, so fusing each stage's output (attfuse)
    must give what the backbone gives unfused (the ego fuser)."""
    (sample,) = toy_samples(TINY_GRID, SCENES[:1], seed=5)
    sample.frames = [dataclasses.replace(f, pose_to_ego=np.eye(4)) for f in sample.frames if f.agent_id >= 0]
    alone = collate([sample])
    torch.manual_seed(0)
    per_scale = build("attfuse").eval()
    unfused = build("ego").eval()
    unfused.load_state_dict(per_scale.state_dict())
    with torch.no_grad():
        assert torch.allclose(per_scale.forward_bev(alone)["bev"], unfused.forward_bev(alone)["bev"], atol=1e-5)
        # with a cooperator the two differ: the fusion does act at the scales
        two = collate(toy_samples(TINY_GRID, SCENES[:1], seed=5))
        assert not torch.allclose(per_scale.forward_bev(two)["bev"], unfused.forward_bev(two)["bev"], atol=1e-3)


def test_parameter_groups_split_the_model_exactly():
    model = build("v2xvit")
    groups = model.parameter_groups()
    assert set(groups) == {"encoder", "bev_backbone", "fusion", "temporal", "detection_head", "prediction_head"}
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in model.parameters()}
    shared = {id(p) for p in model.shared_parameters()}
    tasks = model.task_parameters()
    assert set(tasks) == {"detection", "prediction"}
    task_ids = [id(p) for ps in tasks.values() for p in ps]
    assert shared.isdisjoint(task_ids) and shared | set(task_ids) == set(ids)


def test_unknown_part_name_lists_the_choices():
    cfg = model_cfg()
    cfg["fusion"] = {"name": "nope"}
    with pytest.raises(KeyError, match="attfuse"):
        CooperativePnP(cfg, TINY_GRID, CLASSES, HISTORY, FUTURE)
