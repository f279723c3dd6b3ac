"""Masked multi-agent reconstruction: no leak of hidden points, the loss falls, and the stage runs."""
from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch

from turbotrain.config import load_config
from turbotrain.data.sample import Batch
from turbotrain.data.synth import generate_dataset
from turbotrain.grid import Grid
from turbotrain.models.joint import CooperativePnP
from turbotrain.testing import ToySceneConfig, toy_batch
from turbotrain.pretrain.objective import VARIANT_INPUT, MaskedReconstruction
from turbotrain.stages.data import fuse
from turbotrain.stages.pretrain import pretrain
from turbotrain.utils.errors import ConfigError
from turbotrain.utils.seed import seed_everything
from turbotrain.viz.pretraining import masking_view, plot_masking, render_masking_example

CLASSES = ["car", "pedestrian", "truck"]
HISTORY = 2
# 24 x 24 BEV cells of 0.8 m; SECOND wants several z voxels, PointPillars exactly one (a pillar).
VOXEL_GRID = Grid((-9.6, -9.6, -3.0, 9.6, 9.6, 1.0), (0.4, 0.4, 0.5), 2)
PILLAR_GRID = Grid((-9.6, -9.6, -3.0, 9.6, 9.6, 1.0), (0.4, 0.4, 4.0), 2)
SCENE = ToySceneConfig(history=HISTORY, future=4, num_objects=2, points_per_box=200, ground_points=300)


def build_objective(encoder: str, grid: Grid, seed: int = 0) -> MaskedReconstruction:
    seed_everything(seed)
    cfg = {"size": "tiny", "encoder": {"name": encoder}, "bev_backbone": {"name": "resnet_fpn"},
           "fusion": {"name": "attfuse"}, "temporal": {"name": "attention"},
           "detection_head": {"name": "center"}, "prediction_head": {"name": "multimodal"}}
    model = CooperativePnP(cfg, grid, CLASSES, HISTORY, future=4)
    return MaskedReconstruction(model, grid, {"mask_ratio": 0.7}, HISTORY, model.encoder.vfe.out_channels,
                                model.bev_backbone.out_channels)


def repoint(batch: Batch, grid: Grid, which: torch.Tensor, seed: int) -> Batch:
    """A copy of ``batch`` whose voxels ``which`` hold fresh random points inside the same voxel."""
    generator = torch.Generator().manual_seed(seed)
    vs = torch.tensor(grid.voxel_size)
    low = torch.tensor(grid.point_cloud_range[:3]) + batch.coords[which, 1:].flip(1).float() * vs
    voxels = batch.voxels.clone()
    chosen = voxels[which]
    P = chosen.shape[1]
    valid = torch.arange(P)[None, :] < batch.num_points[which][:, None]
    fresh_xyz = low[:, None, :] + torch.rand(len(chosen), P, 3, generator=generator) * vs
    fresh = torch.cat([fresh_xyz, torch.rand(len(chosen), P, 1, generator=generator)], dim=2)
    voxels[which] = torch.where(valid[..., None], fresh, chosen)
    return dataclasses.replace(batch, voxels=voxels)


@pytest.mark.parametrize("encoder,grid", [("second", VOXEL_GRID), ("pointpillars", PILLAR_GRID)])
def test_points_of_masked_voxels_never_reach_the_encoder(encoder, grid):
    batch = toy_batch(grid, (SCENE,), seed=1)
    objective = build_objective(encoder, grid)  # training mode: BatchNorm uses batch statistics
    plan = objective.draw_plan(batch, torch.Generator().manual_seed(4))
    assert 0 < int(plan.voxel_masked.sum()) < len(plan.voxel_masked)

    with torch.no_grad():
        reference = objective.encode(batch, plan)
        hidden_changed = objective.encode(repoint(batch, grid, plan.voxel_masked, seed=7), plan)
        one_visible = torch.zeros_like(plan.voxel_masked)
        one_visible[int(torch.nonzero(~plan.voxel_masked)[0])] = True
        visible_changed = objective.encode(repoint(batch, grid, one_visible, seed=7), plan)

    for key in ("step_bev", "bev"):
        assert torch.equal(reference[key], hidden_changed[key]), key
    assert not torch.equal(reference["bev"], visible_changed["bev"])


def test_reconstruction_loss_falls_on_a_fixed_batch():
    batch = toy_batch(VOXEL_GRID, (SCENE,), seed=1)
    objective = build_objective("second", VOXEL_GRID)
    optimizer = torch.optim.Adam(objective.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        out = objective(batch)  # a new mask every step, as in training
        optimizer.zero_grad()
        out["reconstruction"].backward()
        optimizer.step()
        losses.append(float(out["reconstruction"].detach()))
        assert abs(float(out["log"]["masked_share"]) - 0.7) < 0.02
    # CooPre's Chamfer is L1 (not squared): halving it is what quartering the squared loss was
    assert np.mean(losses[-10:]) < losses[0] / 2, losses


# ------------------------------------------------------------------------------ the figure
@pytest.fixture(scope="module")
def masked_toy():
    """A toy batch of two samples, a fixed plan over its two steps, and reconstructions of it."""
    batch = toy_batch(VOXEL_GRID, (SCENE, SCENE), seed=5)
    objective = build_objective("second", VOXEL_GRID)
    plan = objective.draw_plan(batch, torch.Generator().manual_seed(0))
    with torch.no_grad():
        predicted = objective.reconstruct(batch, plan)
    return batch, plan, predicted


def test_masking_view_puts_every_point_of_the_present_step_in_place(masked_toy):
    batch, plan, predicted = masked_toy
    view = masking_view(batch, plan, predicted, VOXEL_GRID, sample_index=1)

    present = (plan.cells[:, 0] == 1) & (plan.cells[:, 1] == HISTORY - 1)
    assert len(view.masked_cells) == int(present.sum()) > 0
    assert sum(len(r) for r in view.real) == int(plan.target_mask[present].sum())
    assert all(len(r) == predicted.shape[1] for r in view.reconstructed)
    # every real point lies in the masked cell it is listed under (ego frame, cell centre added back)
    cx, cy = VOXEL_GRID.bev_cell
    x0, y0 = VOXEL_GRID.point_cloud_range[:2]
    for (row, col), real in zip(view.masked_cells, view.real):
        assert np.all(np.floor((real[:, 0] - x0) / cx) == col) and np.all(np.floor((real[:, 1] - y0) / cy) == row)
    frame = batch.coords[:, 0].long()
    shown = ((batch.frame_sample[frame] == 1) & (batch.frame_step[frame] == HISTORY - 1) & ~plan.voxel_masked)
    assert len(view.visible) == int(batch.num_points[shown].sum())
    assert 0 < len(view.masked_cells) < view.nonempty_cells and np.isfinite(view.chamfer)


def test_plot_masking_writes_a_png(masked_toy, tmp_path):
    batch, plan, predicted = masked_toy
    out = plot_masking(batch, plan, predicted, tmp_path / "fig" / "masking.png", VOXEL_GRID, title="toy")
    image = matplotlib.image.imread(out)
    assert image.shape[0] > 500 and image.shape[1] > 800
    assert image[..., :3].std() > 0.05  # not a blank canvas
    assert not list((tmp_path / "fig").glob("*.partial"))


# ------------------------------------------------------------------------------ the pretrain stage
OVERRIDES = [
    "device=cpu",
    "cache.sample_stride=1",
    "pretrain.train.max_steps=1",
    "pretrain.variants.ego_only={type: ego_only}",
    "pretrain.variants.multi_agent={type: multi_agent}",
    # smoke tracks have 2 + 5 steps: two 3-step windows fit
    "pretrain.variants.trajectory={type: trajectory, trajectory: {window: 3, mask_steps: 1}}",
    "pretrain.variants.lidar_trajectory={type: lidar_trajectory, trajectory: {window: 3, mask_steps: 1}}",
]
MOTION_PARTS = ("prediction_head.motion_encoder", "prediction_head.interaction")
EXPORTED = {**{v: VARIANT_INPUT[v]["transfer"] for v in ("ego_only", "multi_agent", "spatiotemporal")},
            "trajectory": MOTION_PARTS, "lidar_trajectory": VARIANT_INPUT["spatiotemporal"]["transfer"] + MOTION_PARTS}
TASKS = {"trajectory": ["contrastive", "trajectory_reconstruction"],
         "lidar_trajectory": ["reconstruction", "contrastive", "trajectory_reconstruction"]}


@pytest.fixture(scope="module")
def smoke_cache(tmp_path_factory):
    """A one-scenario, eight-frame synthetic dataset fused with the smoke config: (config, cache root)."""
    root = tmp_path_factory.mktemp("pretrain_stage")
    config = load_config("config/smoke.yaml", OVERRIDES)
    generate_dataset(root / "raw", preset="smoke", seed=0, progress=False,
                     overrides={"splits": {"train": 1, "val": 0, "test": 0}, "frames": 8})
    summary = fuse(config, root / "raw", "train", root / "cache")
    assert summary["samples"] >= config["pretrain"]["train"]["batch_size"], summary
    return config, str(root / "cache")


def saved_state(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("variant", sorted(EXPORTED))
def test_each_variant_pretrains_exports_and_resumes(smoke_cache, tmp_path, variant):
    config, cache = smoke_cache
    out = tmp_path / variant
    meta = pretrain(config, variant, "attfuse", cache, str(out))

    payload = saved_state(out / "pretrained.pt")
    groups = EXPORTED[variant]
    assert tuple(payload["groups"]) == groups
    assert all(any(key.startswith(g + ".") for g in groups) for key in payload["state_dict"])
    # every exported group carries weights, but attfuse (OpenCOOD's AttFusion) has none to carry
    assert all(any(key.startswith(g + ".") for key in payload["state_dict"]) for g in groups if g != "fusion")
    card = json.loads((out / "pretrain_summary.json").read_text())
    assert card["transferred_groups"] == list(groups)
    manifest = json.loads((Path(cache) / "train" / "manifest.json").read_text())
    assert card["meta"]["dataset"] == "synthetic_smoke" and card["meta"]["samples"] == len(manifest["sample_ids"])
    assert [d["cache_config_hash"] for d in card["meta"]["pretrain_data"]] == [manifest["config_hash"]]
    assert card["meta"]["type"] == variant and card["meta"]["mask_ratio"] == 0.7
    assert len(card["meta"]["commit"]) == 40 or card["meta"]["commit"] == "unknown"
    assert card["training"]["steps"] == meta["steps"] == 1
    for task in TASKS.get(variant, ["reconstruction"]):
        assert np.isfinite(card["training"]["final_losses"][task])
    model_card = (out / "MODEL_CARD.md").read_text()
    assert variant in model_card and meta["commit"] in model_card and groups[0] in model_card

    final_written = (out / "objective.pt").stat().st_mtime_ns
    again = pretrain(config, variant, "attfuse", cache, str(out))
    card = json.loads((out / "pretrain_summary.json").read_text())
    assert again["steps"] == 1 and card["training"]["resumed_from_step"] == 1
    assert (out / "objective.pt").stat().st_mtime_ns == final_written  # no step was redone
    resumed = saved_state(out / "pretrained.pt")["state_dict"]
    assert all(torch.equal(resumed[k], v) for k, v in payload["state_dict"].items())


def test_same_seed_gives_the_same_pretrained_weights(smoke_cache, tmp_path):
    config, cache = smoke_cache
    first = pretrain(config, "spatiotemporal", "attfuse", cache, str(tmp_path / "a"))
    second = pretrain(config, "spatiotemporal", "attfuse", cache, str(tmp_path / "b"))
    a = saved_state(tmp_path / "a" / "pretrained.pt")["state_dict"]
    b = saved_state(tmp_path / "b" / "pretrained.pt")["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert first["steps"] == second["steps"] == 1


@pytest.mark.parametrize("variant,message", [("none", "nothing to pretrain"), ("mystery", "no variant named")])
def test_unusable_variants_are_refused_by_name(smoke_cache, tmp_path, variant, message):
    config, cache = smoke_cache
    with pytest.raises(ConfigError, match=message):
        pretrain(config, variant, "attfuse", cache, str(tmp_path / "out"))


def test_render_masking_example_from_a_pretraining_run(smoke_cache, tmp_path):
    config, cache = smoke_cache
    pretrain(config, "spatiotemporal", "attfuse", cache, str(tmp_path / "run"))
    trained = render_masking_example(config, cache, "spatiotemporal", tmp_path / "run" / "objective.pt",
                                     tmp_path / "trained.png")
    untrained = render_masking_example(config, cache, "ego_only", None, tmp_path / "untrained.png")
    for path in (trained, untrained):
        assert matplotlib.image.imread(path).shape[0] > 500


def test_a_variant_may_change_the_pretraining_budget(smoke_cache, tmp_path):
    config, cache = smoke_cache
    config = copy.deepcopy(config)
    config["pretrain"]["variants"]["trajectory"]["train"] = {"max_steps": 3, "checkpoint_every": 3}
    meta = pretrain(config, "trajectory", "attfuse", cache, str(tmp_path / "long"))
    assert meta["steps"] == 3 and meta["train"] == {"max_steps": 3, "checkpoint_every": 3}
    assert config["pretrain"]["train"]["max_steps"] == 1  # the other variants keep the shared budget


def test_pretraining_settings_of_one_variant_ignore_the_other_variants():
    from turbotrain.contract import pretrain_depends

    config = load_config("config/config.yaml")
    before = copy.deepcopy(pretrain_depends(config, "spatiotemporal"))
    config["pretrain"]["variants"]["trajectory"]["trajectory"]["window"] = 4
    config["pretrain"]["variants"]["brand_new"] = {"type": "trajectory"}
    assert pretrain_depends(config, "spatiotemporal") == before
    config["pretrain"]["variants"]["spatiotemporal"]["mask_ratio"] = 0.5
    assert pretrain_depends(config, "spatiotemporal") != before
    config["pretrain"]["points_per_cell"] = 10  # shared settings count for every variant
    assert pretrain_depends(config, "trajectory")["pretrain.shared"]["points_per_cell"] == 10


def ego_frames_only(samples):
    """Each sample keeping its ego's frames: one ego-frame cloud per (sample, step), as ego_only reads."""
    return [dataclasses.replace(s, frames=[f for f in s.frames if f.agent_id == s.frames[0].agent_id
                                           and np.allclose(f.pose_to_ego, np.eye(4))]) for s in samples]


def test_coopre_decodes_the_encoder_map_and_leaves_the_bev_backbone_without_gradient():
    from turbotrain.data.sample import collate
    from turbotrain.testing import toy_samples

    seed_everything(0)
    cfg = {"size": "tiny", "encoder": {"name": "second"}, "bev_backbone": {"name": "resnet_fpn"},
           "fusion": {"name": "attfuse"}, "temporal": {"name": "attention"},
           "detection_head": {"name": "center"}, "prediction_head": {"name": "multimodal"}}
    model = CooperativePnP(cfg, VOXEL_GRID, CLASSES, history=1, future=4)
    scene = dataclasses.replace(SCENE, history=1)
    batch = collate(ego_frames_only(toy_samples(VOXEL_GRID, (scene, scene), seed=1)))
    assert len(batch.frame_sample) == 2  # one frame per sample
    objective = MaskedReconstruction(model, VOXEL_GRID, {"mask_ratio": 0.7}, 1, model.encoder.vfe.out_channels,
                                     model.encoder.out_channels, transfer=("encoder",), decode_from="encoder")
    objective(batch)["reconstruction"].backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith("encoder."))
    assert all(g is None for n, g in grads.items() if n.startswith(("bev_backbone.", "fusion.", "temporal.")))
    # the decoded cells are the encoder map's: decoding it by hand gives the same points
    plan = objective.draw_plan(batch, torch.Generator().manual_seed(3))
    with torch.no_grad():
        pred = objective.reconstruct(batch, plan)
        by_hand = objective.decoder(model.encoder_bev(*objective._hide(batch, plan)))
    cells = plan.cells
    assert torch.allclose(pred, by_hand[cells[:, 0], cells[:, 2], cells[:, 3]])


def test_a_fused_model_cannot_decode_from_the_encoder():
    from turbotrain.pretrain.setup import decode_from

    assert decode_from("multi_agent", {"type": "multi_agent"}, "early") == "encoder"
    assert decode_from("spatiotemporal", {"type": "spatiotemporal"}, "intermediate") == "fused"
    with pytest.raises(ConfigError, match="spatiotemporal.decode_from: 'encoder'"):
        decode_from("spatiotemporal", {"type": "spatiotemporal", "decode_from": "encoder"}, "intermediate")
