"""Unit tests of the model parts: backbone, warp, fusion, temporal fusion, detection and prediction heads."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from turbotrain.geometry import pose_to_matrix, transform_points
from turbotrain.grid import Grid
from turbotrain.models.bev_backbone import ResNetFPNBackbone
from turbotrain.models.detection_head import (
    CenterHead,
    CenterTargetBuilder,
    decode_yaw,
    direction_bin,
    gaussian_focal_loss,
)
from turbotrain.models.fusion import AttFusion, EgoOnly, FCooperMax, HMSALite, MultiHeadAttFuse
from turbotrain.models.prediction_head import MultiModalTrajectoryHead, backcast_loss, sample_bev
from turbotrain.models.presets import part_config
from turbotrain.models.registry import BEV_BACKBONES, DETECTION_HEADS, FUSERS, PREDICTION_HEADS, TEMPORAL
from turbotrain.models.temporal import ConvGRUTemporal, CurrentStepOnly, TemporalAttention
from turbotrain.models.warp import warp_to_ego
from turbotrain.ops.rotated_iou import rotated_iou_bev

GRID = Grid((-12.8, -12.8, -3.0, 12.8, 12.8, 1.0), (0.4, 0.4, 4.0), 2)  # 32 x 32 BEV, 0.8 m cells


def test_parts_are_registered_by_name():
    assert "resnet_fpn" in BEV_BACKBONES.names()
    assert {"ego", "fcooper", "attfuse", "attfuse_mha", "hmsa_lite", "v2xvit"} <= set(FUSERS.names())
    assert {"attention", "conv_gru", "none"} <= set(TEMPORAL.names())
    assert "center" in DETECTION_HEADS.names()
    assert "multimodal" in PREDICTION_HEADS.names()


def test_preset_overrides_and_unknown_size():
    cfg = part_config("paper", "prediction_head", {"name": "multimodal", "modes": 4})
    assert cfg["modes"] == 4 and cfg["hidden"] == 128 and "name" not in cfg
    with pytest.raises(KeyError, match="unknown model size"):
        part_config("huge", "fusion")


@pytest.mark.parametrize("size", ["tiny", "paper"])
def test_backbone_keeps_resolution_for_odd_shapes(size):
    backbone = ResNetFPNBackbone(in_channels=5, **part_config(size, "bev_backbone")).eval()
    with torch.no_grad():
        out = backbone(torch.randn(2, 5, 13, 22))
    assert out.shape == (2, backbone.out_channels, 13, 22)
    expected = sum(part_config(size, "bev_backbone")["num_upsample_filters"])
    assert backbone.out_channels == expected


def test_backbone_rejects_upsampling_that_misses_the_input_resolution():
    with pytest.raises(ValueError, match="cumulative strides"):
        ResNetFPNBackbone(4, [1, 1], [1, 2], [8, 8], [1, 4], [8, 8])


# ----------------------------------------------------------------------------------------- warp
def _one_hot_map(grid: Grid, xy: tuple[float, float]) -> torch.Tensor:
    rows, cols = grid.bev_shape
    m = torch.zeros(1, 1, rows, cols)
    r, c = grid.bev_cell_of(np.array([xy]))[0]
    m[0, 0, r, c] = 1.0
    return m


def test_warp_identity_is_exact():
    features = torch.randn(2, 3, *GRID.bev_shape)
    warped, valid = warp_to_ego(features, torch.eye(4).repeat(2, 1, 1), GRID)
    assert torch.allclose(warped, features, atol=1e-5)
    assert valid.all()


@pytest.mark.parametrize("yaw_deg", [0.0, 90.0, -90.0, 180.0])
def test_warp_puts_agent_object_where_the_ego_sees_it(yaw_deg):
    # The agent sits at (3.2, -1.6) in the ego frame, turned by yaw; it sees an object at (2.0, 4.4).
    pose = pose_to_matrix([3.2, -1.6, 0.0, 0.0, yaw_deg, 0.0])
    object_agent = np.array([[2.0, 4.4, 0.0]])
    object_ego = transform_points(object_agent, pose)[0, :2]
    agent_map = _one_hot_map(GRID, tuple(object_agent[0, :2]))
    warped, valid = warp_to_ego(agent_map, torch.tensor(pose, dtype=torch.float32)[None], GRID)
    rows, cols = GRID.bev_shape
    peak = int(warped.flatten().argmax())
    expected_row, expected_col = GRID.bev_cell_of(object_ego[None])[0]
    assert (peak // cols, peak % cols) == (expected_row, expected_col)
    assert warped.max() > 0.99  # cell-aligned pose: no bilinear smearing


def test_warp_of_a_linear_field_matches_the_inverse_pose_at_any_angle():
    # Bilinear sampling reproduces a linear field exactly, so each warped ego cell must hold the
    # agent-frame x and y of that cell's centre: T^-1 applied to the ego-frame centre.
    pose = pose_to_matrix([2.3, -1.1, 0.4, 0.0, 37.0, 0.0])
    xs, ys = GRID.bev_cell_centers()
    field = torch.tensor(np.stack(np.broadcast_arrays(xs[None, :], ys[:, None])), dtype=torch.float32)[None]
    warped, valid = warp_to_ego(field, torch.tensor(pose, dtype=torch.float32)[None], GRID)
    gx, gy = np.meshgrid(xs, ys)
    in_agent = transform_points(np.column_stack([gx.ravel(), gy.ravel(), np.zeros(gx.size)]), np.linalg.inv(pose))
    expected = in_agent[:, :2].T.reshape(2, *GRID.bev_shape)
    # Away from the map border, where the bilinear stencil has all four neighbours.
    r = GRID.point_cloud_range
    interior = (np.abs(expected[0]) < r[3] - 0.8) & (np.abs(expected[1]) < r[4] - 0.8)
    assert interior.sum() > 300
    np.testing.assert_allclose(warped[0].numpy()[:, interior], expected[:, interior], atol=1e-3)
    assert valid[0, 0].numpy()[interior].all()


def test_warp_marks_cells_outside_the_agent_map_invalid_and_zero():
    pose = torch.tensor(pose_to_matrix([10.0, 0.0, 0.0, 0.0, 0.0, 0.0]), dtype=torch.float32)[None]
    warped, valid = warp_to_ego(torch.ones(1, 2, *GRID.bev_shape), pose, GRID)
    xs, _ = GRID.bev_cell_centers()
    seen = torch.from_numpy(xs >= GRID.point_cloud_range[0] + 10.0)  # columns the shifted agent covers
    assert valid[0, 0].all(dim=0).eq(seen).all()
    assert (warped[0][:, :, ~seen] == 0).all()


# ----------------------------------------------------------------------------------------- fusion
FUSER_CLASSES = [EgoOnly, FCooperMax, AttFusion, MultiHeadAttFuse, HMSALite]


def _fuser(fuser_cls, channels=8):
    return fuser_cls(channels) if fuser_cls in (EgoOnly, FCooperMax, AttFusion) else fuser_cls(channels, heads=2)


def _agent_inputs(G=2, A=4, C=8, H=5, W=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(G, A, C, H, W, generator=g)
    valid = torch.rand(G, A, 1, H, W, generator=g) > 0.3
    valid[:, -1] = False  # a padding slot
    types = torch.tensor([[0, 1, 0, 1], [1, 0, 1, 0]])
    return features, valid, types


@pytest.mark.parametrize("fuser_cls", FUSER_CLASSES)
def test_fusion_is_permutation_invariant_over_cooperators(fuser_cls):
    torch.manual_seed(0)
    fuser = _fuser(fuser_cls).eval()
    features, valid, types = _agent_inputs()
    perm = torch.tensor([0, 3, 1, 2])  # ego stays in slot 0
    with torch.no_grad():
        out = fuser(features, valid, types)
        permuted = fuser(features[:, perm], valid[:, perm], types[:, perm])
    assert out.shape == (2, 8, 5, 6)
    assert torch.allclose(out, permuted, atol=1e-5)


@pytest.mark.parametrize("fuser_cls", FUSER_CLASSES)
def test_fusion_ignores_invalid_entries(fuser_cls):
    torch.manual_seed(0)
    fuser = _fuser(fuser_cls).eval()
    features, valid, types = _agent_inputs()
    noisy = features.clone()
    noisy[~valid.expand_as(features)] = 1e3  # garbage where nothing is valid must not leak through
    with torch.no_grad():
        out = fuser(features, valid, types)
        out_noisy = fuser(noisy, valid, types)
    assert torch.allclose(out, out_noisy, atol=1e-4)
    nobody = ~valid.any(dim=1).expand_as(out)
    assert (out[nobody] == 0).all()


def test_fcooper_is_the_max_over_valid_agents():
    features, valid, types = _agent_inputs()
    valid[:] = True
    valid[:, -1] = False
    out = FCooperMax(8)(features, valid, types)
    assert torch.equal(out, features[:, :3].amax(dim=1))


def test_hmsa_lite_depends_on_agent_types_and_attfuse_does_not():
    torch.manual_seed(0)
    features, valid, types = _agent_inputs()
    flipped = 1 - types
    hmsa = HMSALite(8, heads=2).eval()
    with torch.no_grad():
        assert not torch.allclose(hmsa(features, valid, types), hmsa(features, valid, flipped))
        for att in (AttFusion(8), MultiHeadAttFuse(8, heads=2).eval()):
            assert torch.allclose(att(features, valid, types), att(features, valid, flipped))


def test_attfusion_is_opencoods_parameter_free_ego_row_attention():
    # One cell, C = 2: ego [1, 0], cooperator [0, 2], an empty third slot.
    # scores q.k / sqrt(C): ego.ego = 1/sqrt(2) = 0.70711, ego.coop = 0 -> softmax [0.66976, 0.33024];
    # output = 0.66976 * [1, 0] + 0.33024 * [0, 2] = [0.66976, 0.66048].
    features = torch.tensor([[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]]).view(1, 3, 2, 1, 1)
    valid = torch.tensor([True, True, False]).view(1, 3, 1, 1, 1)
    out = AttFusion(2)(features, valid, torch.zeros(1, 3, dtype=torch.long))
    assert torch.allclose(out.flatten(), torch.tensor([0.66976, 0.66048]), atol=1e-5)
    assert sum(p.numel() for p in AttFusion(256).parameters()) == 0 and AttFusion.per_scale


# ----------------------------------------------------------------------------------------- temporal
@pytest.mark.parametrize("temporal_cls", [TemporalAttention, ConvGRUTemporal, CurrentStepOnly])
def test_temporal_shapes_and_missing_steps_do_not_leak(temporal_cls):
    torch.manual_seed(0)
    module = temporal_cls(channels=8, history=3, heads=2).eval()
    steps = torch.randn(2, 3, 8, 4, 5)
    step_valid = torch.tensor([[True, True, True], [False, True, True]])
    noisy = steps.clone()
    noisy[1, 0] = 1e3
    with torch.no_grad():
        out = module(steps, step_valid)
        out_noisy = module(noisy, step_valid)
    assert out.shape == (2, 8, 4, 5)
    assert torch.allclose(out[1], out_noisy[1], atol=1e-4)


def test_temporal_none_is_the_current_step():
    steps = torch.randn(1, 3, 4, 2, 2)
    assert torch.equal(CurrentStepOnly(4, 3)(steps, torch.ones(1, 3, dtype=torch.bool)), steps[:, -1])


# ----------------------------------------------------------------------------------------- detection
def test_direction_bin_and_axis_recover_every_heading():
    yaw = torch.linspace(-math.pi, math.pi - 1e-3, 181)
    decoded = decode_yaw(torch.sin(yaw), torch.cos(yaw), direction_bin(yaw))
    assert _angle_error(decoded, yaw).max() < 1e-5
    assert ((decoded >= -math.pi) & (decoded < math.pi)).all()
    # A regressed axis flipped by pi (sign lost) is repaired by the bin.
    flipped = decode_yaw(-torch.sin(yaw), -torch.cos(yaw), direction_bin(yaw))
    assert _angle_error(flipped, yaw).max() < 1e-5


def _angle_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (torch.remainder(a - b + math.pi, 2 * math.pi) - math.pi).abs()


def _gt(boxes: list[list[float]], classes: list[int]):
    return (
        torch.tensor([boxes], dtype=torch.float32),
        torch.tensor([classes]),
        torch.ones(1, len(boxes), dtype=torch.bool),
    )


def test_target_gives_a_pedestrian_smaller_than_a_cell_a_peak_area():
    builder = CenterTargetBuilder(GRID, num_classes=3, min_radius=2)
    boxes, classes, mask = _gt([[1.0, 2.0, -1.0, 0.5, 0.5, 1.7, 0.0]], [1])
    t = builder(boxes, classes, mask)
    row, col = GRID.bev_cell_of(np.array([[1.0, 2.0]]))[0]
    assert t.positive[0, 1, row, col] and t.positive.sum() == 1
    assert t.heatmap[0, 1, row, col] == 1.0
    assert (t.heatmap[0, 1] > 0).sum() >= 9  # radius 2 -> at least the 3x3 neighbourhood is lit
    assert t.heatmap[0, [0, 2]].sum() == 0


def test_target_skips_boxes_off_the_map_and_padding():
    builder = CenterTargetBuilder(GRID, num_classes=3, min_radius=1)
    boxes, classes, mask = _gt([[50.0, 0.0, 0.0, 4.0, 2.0, 1.5, 0.0], [0.0, 0.0, 0.0, 4.0, 2.0, 1.5, 0.0]], [0, 0])
    mask[0, 1] = False
    t = builder(boxes, classes, mask)
    assert not t.mask.any() and t.heatmap.sum() == 0


def _perfect_outputs(head: CenterHead, boxes, classes, mask) -> dict[str, torch.Tensor]:
    """Head outputs that encode the targets exactly, to test decoding on its own."""
    t = head.targets(boxes, classes, mask)
    rows, cols = GRID.bev_shape
    heat = torch.where(t.positive, 6.0, -6.0)
    regression = torch.zeros(1, 8, rows * cols)
    regression[0, :, t.cell_index[0]] = t.regression[0].T
    direction = torch.zeros(1, 2, rows * cols)
    direction[0, :, t.cell_index[0]] = torch.nn.functional.one_hot(t.direction[0], 2).T.float() * 5
    return {"heatmap": heat, "regression": regression.view(1, 8, rows, cols), "direction": direction.view(1, 2, rows, cols)}


def test_decode_recovers_boxes_from_perfect_maps():
    head = CenterHead(8, GRID, num_classes=3, head_channels=8, min_radius=1)
    gt = [[3.3, -4.1, -1.0, 4.5, 2.0, 1.6, 2.9], [-6.2, 5.5, -0.9, 0.7, 0.7, 1.7, -1.2], [7.0, 7.0, -0.3, 8.0, 2.6, 3.0, -2.8]]
    boxes, classes, mask = _gt(gt, [0, 1, 2])
    (det,) = head.decode(_perfect_outputs(head, boxes, classes, mask), score_threshold=0.5)
    assert sorted(det["classes"].tolist()) == [0, 1, 2]
    iou = rotated_iou_bev(np.array(gt), det["boxes"])
    assert (iou.max(axis=1) > 0.99).all()
    assert det["boxes"].dtype == np.float32 and det["scores"].shape == (3,)


def test_decode_drops_scores_below_threshold_and_suppresses_overlaps():
    head = CenterHead(8, GRID, num_classes=3, head_channels=8, min_radius=1)
    outputs = {
        "heatmap": torch.full((1, 3, *GRID.bev_shape), -10.0),
        "regression": torch.zeros(1, 8, *GRID.bev_shape),
        "direction": torch.zeros(1, 2, *GRID.bev_shape),
    }
    outputs["regression"][:, 3:6] = math.log(4.0)  # 4 m boxes span several 0.8 m cells
    outputs["heatmap"][0, 0, 10, 10] = 3.0
    outputs["heatmap"][0, 0, 10, 12] = 2.0  # 1.6 m away: overlaps the first box
    outputs["heatmap"][0, 0, 20, 20] = -3.0  # below threshold
    (det,) = head.decode(outputs, score_threshold=0.2, nms_iou=0.15)
    assert len(det["boxes"]) == 1
    assert det["scores"][0] == pytest.approx(torch.sigmoid(torch.tensor(3.0)).item())


def test_focal_loss_is_lower_for_the_right_heatmap():
    target = torch.zeros(1, 1, 4, 4)
    target[0, 0, 1, 1] = 1.0
    positive = target > 0.99
    good = torch.where(positive, 5.0, -5.0)
    assert gaussian_focal_loss(good, target, positive) < gaussian_focal_loss(-good, target, positive)


# ----------------------------------------------------------------------------------------- prediction
def test_sample_bev_reads_the_cell_at_its_centre():
    maps = torch.randn(1, 3, *GRID.bev_shape)
    xs, ys = GRID.bev_cell_centers()
    xy = torch.tensor([[[xs[5], ys[7]], [xs[0], ys[31]]]], dtype=torch.float32)
    sampled = sample_bev(maps, xy, GRID)
    assert torch.allclose(sampled[0, 0], maps[0, :, 7, 5], atol=1e-5)
    assert torch.allclose(sampled[0, 1], maps[0, :, 31, 0], atol=1e-5)


def _prediction_inputs():
    boxes = torch.tensor([[[1.0, 2.0, -1.0, 4.5, 2.0, 1.6, 0.3], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]]])
    classes = torch.tensor([[0, -1]])
    return torch.randn(1, 3, 8, *GRID.bev_shape), torch.randn(1, 8, *GRID.bev_shape), boxes, classes


def test_prediction_head_shapes_and_rotation_with_heading():
    torch.manual_seed(0)
    head = MultiModalTrajectoryHead(8, GRID, num_classes=3, future=5, modes=4, hidden=16, history=3).eval()
    step_bev, bev, boxes, classes = _prediction_inputs()
    out = head(step_bev, bev, boxes, classes)
    assert out["trajectories"].shape == (1, 2, 4, 5, 2) and out["logits"].shape == (1, 2, 4)
    # Same local offsets, rotated heading: the trajectory rotates by the heading change.
    turned = boxes.clone()
    turned[..., 6] += math.pi / 2
    head.box_encoder.requires_grad_(False)
    with torch.no_grad():
        head.box_encoder[0].weight.zero_()  # make the embedding independent of the heading
        head.interaction.pose_embedding.weight[:, 2:].zero_()  # (sin, cos) of the queries' headings
        a = head(step_bev, bev, boxes, classes)["trajectories"][0, 0]
        b = head(step_bev, bev, turned, classes)["trajectories"][0, 0]
    assert torch.allclose(b[..., 0], -a[..., 1], atol=1e-5) and torch.allclose(b[..., 1], a[..., 0], atol=1e-5)


def test_winner_take_all_loss_trains_only_the_closest_mode():
    head = MultiModalTrajectoryHead(8, GRID, num_classes=3, future=3, modes=3, hidden=16)
    boxes = torch.tensor([[[1.0, 2.0, -1.0, 4.5, 2.0, 1.6, 0.0]]])
    future = torch.tensor([[[[2.0, 2.0, 0.0], [3.0, 2.0, 0.0], [99.0, 99.0, 0.0]]]])
    future_valid = torch.tensor([[[True, True, False]]])  # the wild last step is invalid
    offsets = torch.tensor([[1.0, 0.0], [2.0, 0.0], [50.0, 50.0]])
    trajectories = torch.stack([offsets + 5.0, offsets, offsets - 5.0])[None, None].requires_grad_(True)
    logits = torch.tensor([[[0.0, 10.0, 0.0]]])
    loss = head.loss({"trajectories": trajectories, "logits": logits}, boxes, torch.tensor([[True]]), future, future_valid)
    assert loss["regression"].item() == pytest.approx(0.0, abs=1e-6)
    assert loss["classification"].item() < 1e-3
    loss["total"].backward()
    assert trajectories.grad[0, 0, [0, 2]].abs().sum() == 0


def test_backcast_loss_compares_past_positions_in_the_heading_frame():
    # A box facing +y at (10, 0) that came from (10, -2) and (10, -1): in its heading frame the past
    # positions are 2 m and 1 m behind it (x = -2, -1).
    boxes = torch.tensor([[[10.0, 0.0, 0.0, 4.5, 2.0, 1.6, math.pi / 2]]])
    history = torch.tensor([[[[10.0, -2.0, math.pi / 2], [10.0, -1.0, math.pi / 2], [10.0, 0.0, math.pi / 2]]]])
    valid = torch.ones(1, 1, 3, dtype=torch.bool)
    exact = torch.tensor([[[[-2.0, 0.0], [-1.0, 0.0]]]])
    assert backcast_loss(exact, boxes, torch.tensor([[True]]), history, valid).item() == pytest.approx(0.0, abs=1e-6)
    assert backcast_loss(exact + 1.0, boxes, torch.tensor([[True]]), history, valid).item() > 0.5
    assert backcast_loss(exact + 1.0, boxes, torch.tensor([[False]]), history, valid).item() == 0.0


def test_padding_queries_do_not_change_the_real_queries_predictions():
    torch.manual_seed(0)
    head = MultiModalTrajectoryHead(8, GRID, num_classes=3, future=5, modes=4, hidden=16, history=3).eval()
    step_bev, bev, boxes, classes = _prediction_inputs()
    real = torch.tensor([[True, False]])
    with torch.no_grad():
        a = head(step_bev, bev, boxes, classes, real)["trajectories"][0, 0]
        moved = boxes.clone()
        moved[0, 1, :2] = torch.tensor([-20.0, 7.0])  # the padding query somewhere else
        b = head(step_bev, bev, moved, classes, real)["trajectories"][0, 0]
        c = head(step_bev, bev, moved, classes)["trajectories"][0, 0]  # now it is a real neighbour
    assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(a, c, atol=1e-4)


def test_motion_branch_can_be_turned_off_and_checks_the_history_length():
    plain = MultiModalTrajectoryHead(8, GRID, num_classes=3, future=5, modes=4, hidden=16, motion=False)
    step_bev, bev, boxes, classes = _prediction_inputs()
    assert "backcast" not in plain(step_bev, bev, boxes, classes)
    assert not any(name.startswith(("motion_encoder", "interaction")) for name, _ in plain.named_parameters())
    with pytest.raises(ValueError, match="history steps"):
        MultiModalTrajectoryHead(8, GRID, num_classes=3, future=5, history=2)(step_bev, bev, boxes, classes)


def test_paper_encoder_and_bev_backbone_have_the_published_sizes():
    """config/paper.yaml's encoder + BEV backbone against counts worked out from the reference configs.

    OpenCOOD / CooPre BaseBEVBackbone (second_*.yaml: layer_nums [5, 5], strides [1, 2], filters
    [128, 256], upsample strides [1, 2] to [256, 256]) on 256 input channels, bias-free convs + BN:
      block 1: 256*128*9 + 2*128 + 5 * (128*128*9 + 2*128)        = 1,033,728
      block 2: 128*256*9 + 2*256 + 5 * (256*256*9 + 2*256)        = 3,247,104
      deblock 1: 128*256*1*1 + 2*256 = 33,280; deblock 2: 256*256*2*2 + 2*256 = 262,656
      total 4,576,768.
    CooPre's VoxelResBackBone8x (OpenPCDet's layout: SubM input conv bias-free + BN; residual blocks
    of two SubM convs with bias + BN; strided convs bias-free + BN; a (3, 1, 1) output conv):
      input 4*16*27 + 32 = 1,760; stage 1: 2 blocks * 2 * (16*16*27 + 16 + 32) = 27,840
      stage 2: 16*32*27 + 64 + 4 * (32*32*27 + 32 + 64) = 124,864
      stage 3: 32*64*27 + 128 + 4 * (64*64*27 + 64 + 128) = 498,560
      stage 4: 64*128*27 + 256 + 4 * (128*128*27 + 128 + 256) = 1,992,448
      output 128*128*3 + 256 = 49,408; total 2,694,880 (the mean VFE has no weights).
    """
    from pathlib import Path

    from turbotrain.build import build_model
    from turbotrain.config import load_config

    root = Path(__file__).parents[1] / "config"
    config = load_config([root / "config.yaml", root / "paper.yaml"])
    model = build_model(config, "attfuse")
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert model.encoder.out_channels == 256  # z -5..3 m at 0.2 m: 40 cells -> 2 after the encoder, x 128
    assert count(model.bev_backbone) == 4_576_768
    assert count(model.encoder) == 2_694_880
