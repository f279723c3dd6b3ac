"""Sparse conv layers: the spconv CPU shim, and the PyTorch backend against dense conv3d and spconv."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from turbotrain.models.encoders import sparse_torch
from turbotrain.models.encoders.base import scatter_to_dense
from turbotrain.models.encoders.spconv_compat import apply_cpu_stream_shim, spconv_available

SHAPE = (5, 6, 7)  # D, H, W
BATCH = 2
IN, OUT = 3, 4

# (kernel, stride, padding, subm) cases: SECOND's submanifold, strided and z-shrinking convs, plus a
# stride-1 regular conv (its output sites dilate the input's)
CASES = {
    "subm": ((3, 3, 3), 1, 1, True),
    "strided": ((3, 3, 3), 2, 1, False),
    "z_down": ((3, 1, 1), (2, 1, 1), 0, False),
    "regular_stride1": ((3, 3, 3), 1, 1, False),
}

needs_spconv = pytest.mark.skipif(not spconv_available(), reason="spconv not installed")


def random_sites(seed: int, density: float = 0.3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dense (B, C, D, H, W), features (N, C), contiguous int32 indices (N, 4)) of random active sites."""
    gen = torch.Generator().manual_seed(seed)
    active = torch.rand(BATCH, *SHAPE, generator=gen) < density
    indices = active.nonzero().int().contiguous()
    features = torch.randn(len(indices), IN, generator=gen)
    dense = scatter_to_dense(features, indices, SHAPE, BATCH)
    return dense, features, indices


def torch_layer(case: str, bias: bool = False) -> sparse_torch.TorchSparseConvolution:
    kernel, stride, padding, subm = CASES[case]
    cls = sparse_torch.TorchSubMConv3d if subm else sparse_torch.TorchSparseConv3d
    return cls(IN, OUT, kernel, stride=stride, padding=padding, bias=bias)


def run_torch(layer, features, indices):
    x = sparse_torch.TorchSparseTensor(features, indices, SHAPE, BATCH)
    return layer(x)


def dense_reference(dense: torch.Tensor, weight: torch.Tensor, case: str) -> torch.Tensor:
    kernel, stride, padding, subm = CASES[case]
    out = F.conv3d(dense, weight.permute(0, 4, 1, 2, 3), stride=stride, padding=padding)
    if subm:  # submanifold: outputs only at the input's active sites
        out = out * (dense.abs().sum(1, keepdim=True) > 0)
    return out


def sorted_by_site(features: torch.Tensor, indices: torch.Tensor, shape) -> tuple[torch.Tensor, torch.Tensor]:
    keys = sparse_torch.site_keys(indices, tuple(shape))
    order = torch.argsort(keys)
    return keys[order], features[order]


@pytest.mark.parametrize("case", list(CASES))
def test_torch_backend_matches_dense_conv3d_forward_and_backward(case):
    dense, features, indices = random_sites(seed=1)
    layer = torch_layer(case)
    features.requires_grad_(True)
    out = run_torch(layer, features, indices)
    got = scatter_to_dense(out.features, out.indices, out.spatial_shape, BATCH)
    dense_in = scatter_to_dense(features, indices, SHAPE, BATCH)
    weight = layer.weight.detach().clone().requires_grad_(True)
    want = dense_reference(dense_in, weight, case)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    upstream = torch.randn_like(want)
    got_grads = torch.autograd.grad((got * upstream).sum(), [features, layer.weight])
    want_grads = torch.autograd.grad((want * upstream).sum(), [features, weight])
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_strided_output_sites_are_exactly_the_reachable_cells():
    dense, features, indices = random_sites(seed=2, density=0.05)
    out = run_torch(torch_layer("strided"), features, indices)
    occupied = (dense.abs().sum(1, keepdim=True) > 0).float()
    reachable = F.conv3d(occupied, torch.ones(1, 1, 3, 3, 3), stride=2, padding=1)[:, 0] > 0
    got = torch.zeros_like(reachable)
    idx = out.indices.long()
    got[idx[:, 0], idx[:, 1], idx[:, 2], idx[:, 3]] = True
    assert torch.equal(got, reachable)


def test_subm_rulebook_is_shared_through_indice_key():
    _, features, indices = random_sites(seed=3)
    first = sparse_torch.TorchSubMConv3d(IN, IN, 3, bias=False, indice_key="k")
    second = sparse_torch.TorchSubMConv3d(IN, IN, 3, bias=False, indice_key="k")
    x = sparse_torch.TorchSparseTensor(features, indices, SHAPE, BATCH)
    y = first(x)
    assert "k" in y.rulebooks
    z = second(y)
    assert z.rulebooks["k"] is y.rulebooks["k"]
    assert torch.equal(z.indices, x.indices.long())


def test_subm_rejects_even_kernels():
    _, features, indices = random_sites(seed=4)
    with pytest.raises(ValueError, match="odd kernel"):
        run_torch(sparse_torch.TorchSubMConv3d(IN, OUT, 2), features, indices)


def test_weight_layout_and_init_match_spconv_convention():
    layer = sparse_torch.TorchSparseConv3d(IN, OUT, (3, 1, 1), stride=(2, 1, 1))
    assert layer.weight.shape == (OUT, 3, 1, 1, IN)
    bound = 1 / (IN * 3) ** 0.5
    assert layer.weight.abs().max() <= bound and layer.bias.abs().max() <= bound


@pytest.mark.skipif(torch.cuda.is_available(), reason="the shim only applies without CUDA")
@needs_spconv
def test_cpu_stream_shim_is_idempotent_and_patches_both_modules():
    import spconv.pytorch.cppcore as cppcore
    import spconv.pytorch.ops as ops

    assert apply_cpu_stream_shim() is True
    patched = ops.get_current_stream
    assert apply_cpu_stream_shim() is True
    assert ops.get_current_stream is patched and cppcore.get_current_stream is patched
    assert patched() == 0


@needs_spconv
@pytest.mark.parametrize("case", list(CASES))
def test_spconv_backward_runs_on_cpu_and_matches_dense_conv3d(case):
    from turbotrain.models.encoders.spconv_compat import import_spconv

    spconv = import_spconv()
    kernel, stride, padding, subm = CASES[case]
    cls = spconv.SubMConv3d if subm else spconv.SparseConv3d
    layer = cls(IN, OUT, kernel, stride=stride, padding=padding, bias=False)
    dense, features, indices = random_sites(seed=5)
    features.requires_grad_(True)
    out = layer(spconv.SparseConvTensor(features, indices, list(SHAPE), BATCH))
    got = scatter_to_dense(out.features, out.indices, out.spatial_shape, BATCH)
    want = dense_reference(scatter_to_dense(features, indices, SHAPE, BATCH), layer.weight, case)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    upstream = torch.randn_like(want)
    got_grads = torch.autograd.grad((got * upstream).sum(), [features, layer.weight])
    want_grads = torch.autograd.grad((want * upstream).sum(), [features, layer.weight])
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@needs_spconv
@pytest.mark.parametrize("case", list(CASES))
def test_torch_and_spconv_layers_agree_on_sites_values_and_gradients(case):
    from turbotrain.models.encoders.spconv_compat import import_spconv

    spconv = import_spconv()
    kernel, stride, padding, subm = CASES[case]
    cls = spconv.SubMConv3d if subm else spconv.SparseConv3d
    reference = cls(IN, OUT, kernel, stride=stride, padding=padding, bias=True)
    ours = torch_layer(case, bias=True)
    ours.load_state_dict(reference.state_dict())

    _, features, indices = random_sites(seed=6)
    feats_a = features.clone().requires_grad_(True)
    feats_b = features.clone().requires_grad_(True)
    out_a = reference(spconv.SparseConvTensor(feats_a, indices, list(SHAPE), BATCH))
    out_b = run_torch(ours, feats_b, indices)
    keys_a, values_a = sorted_by_site(out_a.features, out_a.indices, out_a.spatial_shape)
    keys_b, values_b = sorted_by_site(out_b.features, out_b.indices, out_b.spatial_shape)
    assert list(out_a.spatial_shape) == list(out_b.spatial_shape)
    assert torch.equal(keys_a, keys_b)
    torch.testing.assert_close(values_b, values_a, atol=1e-5, rtol=1e-5)

    upstream = torch.randn_like(values_a)
    grads_a = torch.autograd.grad((values_a * upstream).sum(), [feats_a, reference.weight, reference.bias])
    grads_b = torch.autograd.grad((values_b * upstream).sum(), [feats_b, ours.weight, ours.bias])
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["subm", "strided"])
def test_handwritten_backward_passes_gradcheck(case):
    _, features, indices = random_sites(seed=7, density=0.1)
    layer = torch_layer(case).double()
    book = layer.rulebook(sparse_torch.TorchSparseTensor(features, indices, SHAPE, BATCH))
    inputs = (features.double().requires_grad_(True), layer.weight.detach().clone().requires_grad_(True))
    assert torch.autograd.gradcheck(lambda f, w: sparse_torch.apply_rulebook(f, w, book), inputs)
