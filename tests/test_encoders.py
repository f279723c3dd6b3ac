"""SECOND and PointPillars encoders: shapes, gradients, backend equality, empty frames, masking."""
from __future__ import annotations

import pytest
import torch

from turbotrain.grid import Grid
from turbotrain.models.encoders import PointPillarsEncoder, SecondEncoder, VoxelEncoder
from turbotrain.models.encoders.spconv_compat import spconv_available
from turbotrain.models.encoders.vfe import MeanVFE, PillarVFE
from turbotrain.models.registry import ENCODERS

# 3.2 m x 3.2 m x 2 m at 0.1 x 0.1 x 0.2 m: a CPU-sized crop of a SECOND grid
SECOND_GRID = Grid((0.0, -1.6, -1.0, 3.2, 1.6, 1.0), (0.1, 0.1, 0.2), bev_stride=8)
# OpenCOOD's SECOND voxels (0.1 m, z in [-3, 1)), on a 4.8 m x 4.8 m crop
PAPER_GRID = Grid((0.0, 0.0, -3.0, 4.8, 4.8, 1.0), (0.1, 0.1, 0.1), bev_stride=8)
PILLAR_GRID = Grid((0.0, -3.2, -3.0, 6.4, 3.2, 1.0), (0.4, 0.4, 4.0), bev_stride=1)
MAX_POINTS = 5
needs_spconv = pytest.mark.skipif(not spconv_available(), reason="spconv not installed")


def random_voxels(grid: Grid, frames_with_voxels: list[int], per_frame: int, seed: int):
    """(voxels (V, P, 4), num_points (V,), coords (V, 4)) with points inside their voxel's cell."""
    gen = torch.Generator().manual_seed(seed)
    nx, ny, nz = grid.grid_size
    cells = nx * ny * nz
    coords, num_points, voxels = [], [], []
    for frame in frames_with_voxels:
        linear = torch.randperm(cells, generator=gen)[: min(per_frame, cells)]
        zyx = torch.stack([linear // (ny * nx), (linear // nx) % ny, linear % nx], dim=1)
        coords.append(torch.cat([torch.full((len(zyx), 1), frame), zyx], dim=1))
        count = torch.randint(1, MAX_POINTS + 1, (len(zyx),), generator=gen)
        num_points.append(count)
        low = torch.tensor(grid.point_cloud_range[:3]) + zyx.flip(1) * torch.tensor(grid.voxel_size)
        offsets = torch.rand(len(zyx), MAX_POINTS, 3, generator=gen) * torch.tensor(grid.voxel_size)
        points = torch.cat([low[:, None, :] + offsets, torch.rand(len(zyx), MAX_POINTS, 1, generator=gen)], dim=2)
        padding = torch.arange(MAX_POINTS)[None, :] >= count[:, None]
        voxels.append(points.masked_fill(padding[..., None], 0.0))
    return torch.cat(voxels).float(), torch.cat(num_points).int(), torch.cat(coords).int()


def second(grid=SECOND_GRID, size="tiny", backend="torch", seed=0) -> SecondEncoder:
    torch.manual_seed(seed)
    return SecondEncoder(grid, size=size, backend=backend)


def pillars(grid=PILLAR_GRID, size="tiny", seed=0) -> PointPillarsEncoder:
    torch.manual_seed(seed)
    return PointPillarsEncoder(grid, size=size)


@pytest.mark.parametrize(
    "make, grid, out_channels",
    [
        (lambda: second(size="tiny"), SECOND_GRID, 32),  # depth left after the z conv: 1
        (lambda: second(PAPER_GRID, size="paper"), PAPER_GRID, 128 * 2),  # OpenCOOD's 256 BEV channels
        (lambda: pillars(size="tiny"), PILLAR_GRID, 32),
        (lambda: pillars(size="paper"), PILLAR_GRID, 64),
    ],
)
def test_output_shape_is_frames_channels_bev_shape(make, grid, out_channels):
    encoder = make()
    voxels, num_points, coords = random_voxels(grid, [0, 2], per_frame=60, seed=1)
    out = encoder(voxels, num_points, coords, num_frames=3)
    assert isinstance(encoder, VoxelEncoder)
    assert encoder.out_channels == out_channels
    assert out.shape == (3, out_channels, *grid.bev_shape)
    assert torch.isfinite(out).all()


def test_second_depth_follows_strided_stages_then_z_shrink():
    # nz = 10 -> 5 -> 3 -> 2 through three stride-2 stages, then the z conv (kernel clipped to the
    # 2 cells left) -> 1; with bev_stride 2: 10 -> 5 -> kernel-3 stride-2 z conv -> 2
    assert second(SECOND_GRID).out_shape == (1, *SECOND_GRID.bev_shape)
    shallow = Grid(SECOND_GRID.point_cloud_range, SECOND_GRID.voxel_size, bev_stride=2)
    encoder = second(shallow)
    assert encoder.out_shape == (2, *shallow.bev_shape)
    flat = Grid((0.0, 0.0, -1.0, 1.6, 1.6, 1.0), (0.1, 0.1, 2.0), bev_stride=1)
    assert second(flat).out_shape == (1, 16, 16)


def test_every_parameter_gets_a_gradient():
    voxels, num_points, coords = random_voxels(SECOND_GRID, [0, 1], per_frame=80, seed=2)
    for encoder, (v, n, c) in [
        (second(), (voxels, num_points, coords)),
        (pillars(), random_voxels(PILLAR_GRID, [0, 1], per_frame=40, seed=2)),
    ]:
        out = encoder(v, n, c, num_frames=2)
        (out * torch.randn_like(out)).sum().backward()
        for name, param in encoder.named_parameters():
            assert param.grad is not None, name
            assert torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name


@needs_spconv
@pytest.mark.parametrize("train", [True, False])
def test_second_backends_agree_forward_and_backward(train):
    torch_encoder = second(backend="torch", seed=3)
    spconv_encoder = second(backend="spconv", seed=4)
    spconv_encoder.load_state_dict(torch_encoder.state_dict())
    voxels, num_points, coords = random_voxels(SECOND_GRID, [0, 1, 2], per_frame=120, seed=3)
    results = []
    for encoder in (torch_encoder, spconv_encoder):
        encoder.train(train)
        features = encoder.voxel_features(voxels, num_points).detach().requires_grad_(True)
        out = encoder.forward_features(features, coords, num_frames=3)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        grads = {name: p.grad for name, p in encoder.named_parameters()}
        results.append((out, features.grad, grads))
    (out_t, feat_grad_t, grads_t), (out_s, feat_grad_s, grads_s) = results
    torch.testing.assert_close(out_t, out_s, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(feat_grad_t, feat_grad_s, atol=1e-5, rtol=1e-5)
    assert grads_t.keys() == grads_s.keys()
    for name in grads_t:
        # float32 sums over thousands of sites in a different order: compare relative to the
        # gradient's own scale (observed ~1e-6 of it)
        scale = grads_t[name].abs().max().item()
        torch.testing.assert_close(grads_t[name], grads_s[name], atol=1e-5 * scale, rtol=0, msg=name)


@needs_spconv
def test_same_seed_gives_the_same_weights_under_both_backends():
    a, b = second(backend="torch", seed=5).state_dict(), second(backend="spconv", seed=5).state_dict()
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_auto_backend_prefers_spconv_on_cuda_and_the_thread_safe_torch_backend_on_cpu():
    expected = "spconv" if torch.cuda.is_available() and spconv_available() else "torch"
    assert second(backend="auto").backend_name == expected


@pytest.mark.parametrize("make, grid", [(second, SECOND_GRID), (pillars, PILLAR_GRID)])
def test_frame_without_voxels_gives_zeros(make, grid):
    encoder = make()
    voxels, num_points, coords = random_voxels(grid, [0, 2], per_frame=50, seed=6)
    out = encoder(voxels, num_points, coords, num_frames=3)  # training mode: BN uses batch stats
    assert torch.count_nonzero(out[1]) == 0
    assert torch.count_nonzero(out[0]) > 0 and torch.count_nonzero(out[2]) > 0
    empty = encoder(voxels[:0], num_points[:0], coords[:0], num_frames=2)
    assert empty.shape == (2, encoder.out_channels, *grid.bev_shape) and torch.count_nonzero(empty) == 0


@pytest.mark.parametrize("make, grid", [(second, SECOND_GRID), (pillars, PILLAR_GRID)])
def test_output_is_deterministic_given_the_seed(make, grid):
    voxels, num_points, coords = random_voxels(grid, [0, 1], per_frame=70, seed=7)
    first = make(seed=11)(voxels, num_points, coords, num_frames=2)
    again = make(seed=11)(voxels, num_points, coords, num_frames=2)
    other_seed = make(seed=12)(voxels, num_points, coords, num_frames=2)
    assert torch.equal(first, again)
    assert not torch.equal(first, other_seed)


def test_second_mask_token_changes_only_the_masked_frame():
    encoder = second().eval()  # eval: BN statistics would otherwise couple the frames
    voxels, num_points, coords = random_voxels(SECOND_GRID, [0, 1], per_frame=80, seed=8)
    features = encoder.voxel_features(voxels, num_points)
    masked_rows = (coords[:, 0] == 1).nonzero()[:, 0][::2]
    masked = features.clone()
    masked[masked_rows] = torch.tensor([0.5, -0.5, 0.2, 1.0])
    plain = encoder.forward_features(features, coords, num_frames=2)
    with_token = encoder.forward_features(masked, coords, num_frames=2)
    assert torch.equal(plain[0], with_token[0])
    assert not torch.allclose(plain[1], with_token[1])


def test_pillar_mask_token_changes_exactly_the_masked_cells():
    encoder = pillars().eval()
    voxels, num_points, coords = random_voxels(PILLAR_GRID, [0, 1], per_frame=60, seed=9)
    features = encoder.voxel_features(voxels, num_points)
    masked_rows = torch.arange(0, len(coords), 3)
    masked = features.clone()
    masked[masked_rows] = torch.full((features.shape[1],), 7.0)
    changed = (encoder.forward_features(features, coords, 2) != encoder.forward_features(masked, coords, 2)).any(dim=1)
    expected = torch.zeros_like(changed)
    c = coords[masked_rows].long()
    expected[c[:, 0], c[:, 2], c[:, 3]] = True
    assert torch.equal(changed, expected)


def test_mean_vfe_ignores_padding_content():
    voxels, num_points, _ = random_voxels(SECOND_GRID, [0], per_frame=30, seed=10)
    padding = torch.arange(MAX_POINTS)[None, :] >= num_points[:, None]
    noisy = voxels.masked_fill(padding[..., None], 99.0)
    vfe = MeanVFE()
    torch.testing.assert_close(vfe(noisy, num_points), vfe(voxels, num_points))
    first = voxels[0, : num_points[0]].mean(dim=0)
    torch.testing.assert_close(vfe(voxels, num_points)[0], first)


def test_pillar_vfe_independent_of_padding_width_and_recovers_centres():
    voxels, num_points, coords = random_voxels(PILLAR_GRID, [0], per_frame=40, seed=11)
    torch.manual_seed(0)
    vfe = PillarVFE(PILLAR_GRID, 16).eval()
    wider = torch.cat([voxels, torch.zeros(len(voxels), 3, 4)], dim=1)
    torch.testing.assert_close(vfe(wider, num_points), vfe(voxels, num_points))
    mean_xy = (voxels[..., :2].sum(1) / num_points[:, None])
    x0, y0 = PILLAR_GRID.point_cloud_range[:2]
    size = PILLAR_GRID.voxel_size[0]
    expected = torch.stack([x0 + (coords[:, 3] + 0.5) * size, y0 + (coords[:, 2] + 0.5) * size], dim=1)
    torch.testing.assert_close(vfe.pillar_centres(mean_xy)[:, :2], expected)


def test_pillars_with_bev_stride_max_pool_to_the_bev_grid():
    grid = Grid(PILLAR_GRID.point_cloud_range, PILLAR_GRID.voxel_size, bev_stride=2)
    encoder = pillars(grid).eval()
    voxels, num_points, coords = random_voxels(grid, [0], per_frame=40, seed=12)
    features = encoder.voxel_features(voxels, num_points)
    out = encoder.forward_features(features, coords, num_frames=1)
    fine = pillars(PILLAR_GRID).eval().forward_features(features, coords, num_frames=1)
    assert out.shape == (1, encoder.out_channels, *grid.bev_shape)
    torch.testing.assert_close(out, torch.nn.functional.max_pool2d(fine, 2))


def test_constructor_errors_are_explicit():
    with pytest.raises(ValueError, match="one voxel in z"):
        PointPillarsEncoder(SECOND_GRID)
    with pytest.raises(ValueError, match="power of 2"):
        SecondEncoder(Grid((0.0, 0.0, -1.0, 2.4, 2.4, 1.0), (0.1, 0.1, 0.2), bev_stride=3), backend="torch")
    with pytest.raises(ValueError, match="unknown SECOND size"):
        SecondEncoder(SECOND_GRID, size="huge", backend="torch")
    with pytest.raises(ValueError, match="unknown sparse backend"):
        SecondEncoder(SECOND_GRID, backend="cuda")


def test_out_of_grid_coords_are_rejected():
    encoder = second()
    voxels, num_points, coords = random_voxels(SECOND_GRID, [0], per_frame=10, seed=13)
    coords[0, 3] = SECOND_GRID.grid_size[0]
    with pytest.raises(ValueError, match="coords outside"):
        encoder(voxels, num_points, coords, num_frames=1)
    with pytest.raises(ValueError, match="coords outside"):
        encoder(voxels, num_points, coords.clamp(max=0), num_frames=0)


def test_encoders_are_registered_by_name():
    built = ENCODERS.build("second", grid=SECOND_GRID, size="tiny", backend="torch")
    assert isinstance(built, SecondEncoder)
    assert isinstance(ENCODERS.build("pointpillars", grid=PILLAR_GRID, size="tiny"), PointPillarsEncoder)


def test_auto_backend_falls_back_to_torch_without_spconv(monkeypatch):
    from turbotrain.models.encoders import backends

    monkeypatch.setattr(backends, "spconv_available", lambda: False)
    assert second(backend="auto").backend_name == "torch"
