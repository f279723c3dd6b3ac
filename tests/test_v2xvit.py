"""V2X-ViT fusion (models/v2xvit.py): masking, cooperator-order invariance, type dependence, the
reference's parameter count, window bias tables and gradient flow."""
from __future__ import annotations

import pytest
import torch

from turbotrain.models.presets import part_config
from turbotrain.models.registry import FUSERS
from turbotrain.models.v2xvit import V2XViT, WindowAttention, relative_offset_index

C = 16


def tiny(layers: int = 2, **overrides) -> V2XViT:
    """The tiny preset; two layers by default so the all-agent-rows path (not only the last,
    ego-only layer) is exercised."""
    torch.manual_seed(0)
    cfg = part_config("tiny", "fusion", {"name": "v2xvit", "layers": layers, **overrides})
    return FUSERS.build("v2xvit", channels=C, **cfg).eval()


def inputs(G=2, A=4, H=10, W=13, seed=0):
    """H, W not multiples of the windows 2/4/8 (padding is exercised); slot 3 empty; in group 1 the
    ego is infrastructure, so all four (query type, key type) relations occur."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(G, A, C, H, W, generator=g)
    valid = torch.rand(G, A, 1, H, W, generator=g) > 0.3
    valid[:, -1] = False
    valid[0, :, :, :2, :3] = False  # a corner no agent sees
    types = torch.tensor([[0, 1, 0, 0], [1, 0, 1, 1]])
    return features, valid, types


def test_output_shape_and_zero_where_no_agent_is_valid():
    fuser = tiny()
    features, valid, types = inputs()
    with torch.no_grad():
        out = fuser(features, valid, types)
    assert fuser.out_channels == C
    assert out.shape == (2, C, 10, 13)
    nobody = ~valid.any(dim=1).expand_as(out)
    assert nobody.any() and (out[nobody] == 0).all()
    assert (out[~nobody] != 0).all()


def test_invalid_agents_and_cells_do_not_change_the_output():
    fuser = tiny()
    features, valid, types = inputs()
    noisy = features.clone()
    noisy[~valid.expand_as(features)] = 1e3  # garbage in every invalid (slot, cell), the empty slot included
    noisy[:, -1] = -7.0
    with torch.no_grad():
        out = fuser(features, valid, types)
        assert torch.allclose(fuser(noisy, valid, types), out, atol=1e-5)
        # not vacuous: a valid cooperator entry does change the ego's output
        changed = features.clone()
        changed[:, 1] = torch.where(valid[:, 1], torch.randn_like(changed[:, 1]), changed[:, 1])
        assert not torch.allclose(fuser(changed, valid, types), out, atol=1e-3)


def test_invariant_to_the_order_of_cooperators():
    fuser = tiny()
    features, valid, types = inputs()
    with torch.no_grad():
        out = fuser(features, valid, types)
        for perm in ([0, 3, 1, 2], [0, 2, 3, 1]):  # the ego stays in slot 0
            perm = torch.tensor(perm)
            assert torch.allclose(fuser(features[:, perm], valid[:, perm], types[:, perm]), out, atol=1e-5)


def test_output_depends_on_agent_types():
    fuser = tiny()
    features, valid, types = inputs()
    coop_flipped = types.clone()
    coop_flipped[:, 1] = 1 - coop_flipped[:, 1]  # one cooperator infrastructure <-> vehicle
    with torch.no_grad():
        out = fuser(features, valid, types)
        assert not torch.allclose(fuser(features, valid, 1 - types), out, atol=1e-4)
        assert not torch.allclose(fuser(features, valid, coop_flipped), out, atol=1e-4)
        # the type of an empty slot is irrelevant
        empty_flipped = types.clone()
        empty_flipped[:, 3] = 1 - empty_flipped[:, 3]
        assert torch.allclose(fuser(features, valid, empty_flipped), out, atol=1e-6)


def test_paper_preset_has_the_reference_parameter_count():
    # DerrickXuNu/OpenCOOD @ 31ba16025da27ffe4e336f011290dfbc66f9a1f1, opencood/hypes_yaml/point_pillar_v2xvit.yaml
    # (transformer.encoder): depth 3, num_blocks 1; cav_att_config dim 256, heads 8, dim_head 32;
    # pwindow_att_config heads [16, 8, 4], dim_head [16, 32, 64], window_size [4, 8, 16],
    # relative_pos_embedding true, fusion_method split_attn; feed_forward mlp_dim 256.
    # Modules: fuse_modules/hmsa.py HGTCavAttention, fuse_modules/mswin.py, sub_modules/split_attn.py,
    # sub_modules/base_transformer.py PreNorm (LayerNorm) and FeedForward.
    dim, types, relations = 256, 2, 4
    layer_norm = 2 * dim
    linear = dim * dim + dim  # 256 -> 256 with bias (every inner width here is 8*32 = 16*16 = 8*32 = 4*64 = 256)
    hmsa = (
        layer_norm  # PreNorm
        + types * 3 * linear  # k/q/v_linears, one per type
        + types * linear  # a_linears, one per type
        + 2 * relations * 8 * 32 * 32  # relation_att and relation_msg (4 relations, 8 heads, 32 x 32)
    )
    windows = (
        layer_norm  # PreNorm
        + 3 * (dim * 3 * 256)  # to_qkv of each branch, no bias, inner 16*16 = 8*32 = 4*64 = 256
        + 3 * linear  # to_out of each branch
        + (2 * 4 - 1) ** 2 + (2 * 8 - 1) ** 2 + (2 * 16 - 1) ** 2  # pos_embedding (2w-1) x (2w-1) per branch
        + dim * dim + layer_norm + dim * 3 * dim  # SplitAttn: fc1 (no bias), bn1 (LayerNorm), fc2 (no bias)
    )
    ffn = layer_norm + (dim * 256 + 256) + (256 * dim + dim)  # PreNorm, Linear(256, mlp 256), Linear(256, 256)
    expected = 3 * (hmsa + windows + ffn)
    # OpenCOOD's V2XTEncoder also holds prior_feed (Linear(259, 256), unused in forward) and RTE
    # (Linear(256, 256) + a 100 x 256 embedding), both left out here (no latencies).
    assert expected == 5_328_249
    fuser = FUSERS.build("v2xvit", channels=dim, **part_config("paper", "fusion", {"name": "v2xvit"}))
    assert sum(p.numel() for p in fuser.parameters()) == expected


@pytest.mark.parametrize("window", [2, 4, 8, 16])
def test_window_relative_position_bias_table_has_one_row_per_offset(window):
    branch = WindowAttention(C, heads=2, dim_head=4, window=window, dropout=0.0)
    assert branch.bias_table.shape[0] == (2 * window - 1) ** 2
    index = relative_offset_index(window)
    assert index.shape == (window**2, window**2)
    assert set(index.flatten().tolist()) == set(range((2 * window - 1) ** 2))  # every offset is used
    assert (index.diagonal() == (2 * window - 1) * (window - 1) + window - 1).all()  # offset (0, 0) on the diagonal
    assert torch.equal(index.T, (2 * window - 1) ** 2 - 1 - index)  # offset(j, i) = -offset(i, j)
    fuser = tiny()
    for layer in fuser.layers:
        rows = [b.bias_table.shape[0] for b in layer.window_attention.branches]
        assert rows == [(2 * w - 1) ** 2 for w in (2, 4, 8)]


def test_a_gradient_reaches_every_parameter():
    fuser = tiny(layers=1).train()
    features, valid, types = inputs()
    features.requires_grad_(True)
    fuser(features, valid, types).square().mean().backward()
    silent = [n for n, p in fuser.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert silent == []
    hmsa = fuser.layers[0].agent_attention
    for relations in (hmsa.relation_att, hmsa.relation_msg):  # each of the 4 (ego type, agent type) relations
        assert (relations.grad.flatten(1).abs().sum(dim=1) > 0).all()


def test_the_last_layer_computing_only_the_ego_row_gives_the_full_layers_ego_row():
    fuser = tiny(layers=1)
    features, valid, types = inputs()
    x = (features * valid).permute(0, 1, 3, 4, 2)
    keep = (valid[:, :, 0].flatten(2).any(2)[:, :, None, None] & valid.any(dim=1)).unsqueeze(-1).float()
    layer = fuser.layers[0]
    with torch.no_grad():
        full = layer(x, valid[:, :, 0], keep, types, queries=4)
        ego = layer(x, valid[:, :, 0], keep[:, :1], types, queries=1)
    assert torch.allclose(full[:, :1], ego, atol=1e-6)


OPTIONS = [
    {"window_fusion": "mean"},
    {"relative_position_bias": False},
    {"window_sizes": [3], "window_heads": [2], "window_dim_heads": [8]},  # one branch: split attention's sigmoid
]


@pytest.mark.parametrize("options", OPTIONS)
def test_options_build_and_keep_the_masking(options):
    fuser = tiny(**options)
    features, valid, types = inputs()
    noisy = features.clone()
    noisy[~valid.expand_as(features)] = 1e3
    with torch.no_grad():
        out = fuser(features, valid, types)
        assert out.shape == (2, C, 10, 13)
        assert torch.allclose(fuser(noisy, valid, types), out, atol=1e-5)


def test_mismatched_window_lists_are_rejected():
    with pytest.raises(ValueError, match="one entry per branch"):
        V2XViT(C, window_sizes=[2, 4], window_heads=[2], window_dim_heads=[8])
