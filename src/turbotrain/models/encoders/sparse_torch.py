"""Sparse 3D convolution in plain PyTorch, a drop-in for the spconv layers SECOND uses.

Why it exists: spconv 2.3.8's wheels cover CPU and CUDA 11.8-12.6 on Python 3.10-3.13 only, so
machines with CUDA 13, a newer Python or Apple MPS have no spconv at all. This backend runs wherever
torch runs, with the same parameters, so checkpoints move freely between the two.

How: sites are hashed to int64 keys (row-major over batch, z, y, x); neighbours are found per kernel
offset by ``torch.searchsorted`` on the sorted keys (a loop over the k^3 offsets, none over voxels);
each offset then does gather -> matmul -> ``index_add``.

Conventions copied from spconv 2.3.8 (checked against it in ``tests/test_spconv_compat.py``):

* weights are ``[out, kD, kH, kW, in]`` ("KRSC"); a kernel offset ``k = (kz, ky, kx)`` maps input
  site ``i`` to output site ``o`` when ``i = o * stride - padding + k * dilation`` (cross-correlation,
  like ``torch.nn.functional.conv3d``);
* a strided ("regular") sparse conv outputs every site of the output grid that has at least one
  active input in its receptive field; the output grid has ``(n + 2p - d(k-1) - 1) // s + 1`` cells;
* a submanifold conv outputs exactly its input sites, with the kernel centred on them.

One deliberate difference: spconv treats 1x1x1 submanifold / stride-1 kernels as a plain matmul that
reads the weight memory as ``[in, out]``; this backend always uses the KRSC layout. SECOND never uses
1x1x1 kernels, so state dicts transfer exactly between the two backends.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

Triple = tuple[int, int, int]


def _triple(value: int | tuple[int, ...] | list[int]) -> Triple:
    if isinstance(value, int):
        return (value, value, value)
    if len(value) != 3:
        raise ValueError(f"expected an int or 3 values, got {value!r}")
    return (int(value[0]), int(value[1]), int(value[2]))


@dataclass
class Rulebook:
    """Which input row feeds which output row through each kernel offset (spconv's "indice pairs")."""

    out_indices: Tensor  # (M, 4) int64: batch, z, y, x of the output sites
    spatial_shape: Triple  # output grid (D, H, W)
    pairs: list[tuple[Tensor, Tensor]]  # per kernel offset (kD, kH, kW row-major): (input rows, output rows)


@dataclass
class TorchSparseTensor:
    """Active sites of a batch of 3D grids; the attribute names match ``spconv.SparseConvTensor``."""

    features: Tensor  # (N, C)
    indices: Tensor  # (N, 4) int: batch, z, y, x
    spatial_shape: Triple  # (D, H, W)
    batch_size: int
    rulebooks: dict[str, Rulebook] = field(default_factory=dict)  # shared by layers with one indice_key

    def replace_feature(self, features: Tensor) -> "TorchSparseTensor":
        """Same sites and cached rule books, new features (spconv's method of the same name)."""
        return TorchSparseTensor(features, self.indices, self.spatial_shape, self.batch_size, self.rulebooks)


def site_keys(indices: Tensor, spatial_shape: Triple) -> Tensor:
    """One int64 per site, ordered like the row-major dense tensor (batch, z, y, x)."""
    D, H, W = spatial_shape
    idx = indices.long()
    return ((idx[:, 0] * D + idx[:, 1]) * H + idx[:, 2]) * W + idx[:, 3]


def keys_to_indices(keys: Tensor, spatial_shape: Triple) -> Tensor:
    """Inverse of :func:`site_keys`: (N,) keys -> (N, 4) int64 batch, z, y, x."""
    D, H, W = spatial_shape
    x = keys % W
    y = (keys // W) % H
    z = (keys // (W * H)) % D
    b = keys // (W * H * D)
    return torch.stack([b, z, y, x], dim=1)


def kernel_offsets(kernel_size: Triple) -> list[Triple]:
    """Offsets (kz, ky, kx) in the order of the weight's kD, kH, kW axes (row-major)."""
    kD, kH, kW = kernel_size
    return [(kz, ky, kx) for kz in range(kD) for ky in range(kH) for kx in range(kW)]


def _find_rows(sorted_keys: Tensor, order: Tensor, query: Tensor) -> tuple[Tensor, Tensor]:
    """Rows of ``query`` keys among the sites (``order`` sorts them); returns (found mask, rows)."""
    if sorted_keys.numel() == 0:
        return torch.zeros_like(query, dtype=torch.bool), torch.zeros_like(query)
    pos = torch.searchsorted(sorted_keys, query).clamp_(max=sorted_keys.numel() - 1)
    found = sorted_keys[pos] == query
    return found, order[pos]


def _shift_inside(idx: Tensor, shift: Triple, spatial_shape: Triple) -> Tensor:
    """(N,) True where site + shift (z, y, x) stays inside the grid."""
    inside = torch.ones(len(idx), dtype=torch.bool, device=idx.device)
    for axis, (delta, size) in enumerate(zip(shift, spatial_shape), start=1):
        if delta:
            moved = idx[:, axis] + delta
            inside &= (moved >= 0) & (moved < size)
    return inside


def submanifold_rulebook(indices: Tensor, spatial_shape: Triple, kernel_size: Triple, dilation: Triple) -> Rulebook:
    """Pairs of a submanifold conv: outputs are the input sites, kernel centred on each.

    A centred kernel is point-symmetric: if site ``a`` sees ``b`` through offset ``k``, then ``b``
    sees ``a`` through the mirrored offset ``K-1-k``. So only the first half of the offsets is looked
    up (the searchsorted calls dominate this function) and the rest are the swapped pairs.
    """
    if any(k % 2 == 0 for k in kernel_size):
        raise ValueError(f"submanifold conv needs an odd kernel, got {kernel_size}")
    idx = indices.long()
    keys = site_keys(idx, spatial_shape)
    sorted_keys, order = torch.sort(keys)
    rows = torch.arange(len(idx), device=idx.device)
    _, H, W = spatial_shape
    offsets = kernel_offsets(kernel_size)
    half = len(offsets) // 2
    pairs: list[tuple[Tensor, Tensor]] = [(rows, rows)] * len(offsets)  # centre entry stays the identity
    for k in range(half):
        shift = tuple((o - size // 2) * d for o, size, d in zip(offsets[k], kernel_size, dilation))
        inside = _shift_inside(idx, shift, spatial_shape)
        # a shift inside the grid moves the row-major key by a constant
        query = keys + (shift[0] * H + shift[1]) * W + shift[2]
        found, neighbour = _find_rows(sorted_keys, order, query)
        hit = inside & found
        pairs[k] = (neighbour[hit], rows[hit])
        pairs[len(offsets) - 1 - k] = (rows[hit], neighbour[hit])
    return Rulebook(idx, spatial_shape, pairs)


def conv_output_shape(spatial_shape: Triple, kernel_size: Triple, stride: Triple, padding: Triple, dilation: Triple) -> Triple:
    """Output grid of a regular conv (the same formula as ``torch.nn.Conv3d`` and spconv)."""
    out = tuple(
        (n + 2 * p - d * (k - 1) - 1) // s + 1
        for n, k, s, p, d in zip(spatial_shape, kernel_size, stride, padding, dilation)
    )
    if any(n <= 0 for n in out):
        raise ValueError(f"conv with kernel {kernel_size}, stride {stride}, padding {padding} empties grid {spatial_shape}")
    return out  # type: ignore[return-value]


def _axis_targets(
    coord: Tensor, kernel: int, stride: int, padding: int, dilation: int, out_size: int
) -> list[tuple[Tensor, Tensor]]:
    """Per kernel tap along one axis: (output coordinate, valid mask) of every input coordinate.

    Input ``i`` reaches output ``o`` through tap ``k`` when ``i = o * s - p + k * d``, i.e. when
    ``i + p - k * d`` is a non-negative multiple of ``s`` that lands inside the output grid.
    """
    targets = []
    for k in range(kernel):
        numerator = coord + padding - k * dilation
        out = torch.div(numerator, stride, rounding_mode="floor")
        valid = (numerator - out * stride == 0) & (out >= 0) & (out < out_size)
        targets.append((out, valid))
    return targets


def strided_rulebook(
    indices: Tensor, spatial_shape: Triple, kernel_size: Triple, stride: Triple, padding: Triple, dilation: Triple
) -> Rulebook:
    """Pairs of a regular sparse conv: an output site exists where any input reaches it."""
    idx = indices.long()
    out_shape = conv_output_shape(spatial_shape, kernel_size, stride, padding, dilation)
    # validity factorises over axes: 3 x k checks instead of k^3
    per_axis = [
        _axis_targets(idx[:, axis + 1], kernel_size[axis], stride[axis], padding[axis], dilation[axis], out_shape[axis])
        for axis in range(3)
    ]
    rows = torch.arange(len(idx), device=idx.device)
    _, H, W = out_shape
    frame_base = idx[:, 0] * out_shape[0]
    candidate_keys, candidate_rows = [], []
    for kz, ky, kx in kernel_offsets(kernel_size):
        (z, vz), (y, vy), (x, vx) = per_axis[0][kz], per_axis[1][ky], per_axis[2][kx]
        valid = vz & vy & vx
        candidate_keys.append((((frame_base + z) * H + y) * W + x)[valid])
        candidate_rows.append(rows[valid])
    out_keys, out_rows = torch.unique(torch.cat(candidate_keys), sorted=True, return_inverse=True)
    per_offset_out_rows = torch.split(out_rows, [len(r) for r in candidate_rows])
    pairs = list(zip(candidate_rows, per_offset_out_rows))
    return Rulebook(keys_to_indices(out_keys, out_shape), out_shape, pairs)


class _RulebookConv(torch.autograd.Function):
    """Gather -> matmul -> scatter-add over the kernel offsets, with a hand-written backward.

    Plain autograd would keep every offset's gathered input block alive for the weight gradient
    (up to k^3 copies of the features); recomputing the gathers in backward keeps memory at about
    one copy, like spconv. Everything runs in the features' dtype (the weight is cast), so the
    explicit ``.to(...)`` calls keep ``index_add_`` valid when autocast changes the matmul dtype.
    """

    @staticmethod
    def forward(ctx, features: Tensor, weight: Tensor, pairs: list[tuple[Tensor, Tensor]], num_out: int) -> Tensor:
        per_offset = weight.reshape(weight.shape[0], -1, weight.shape[-1]).to(features.dtype)  # (out, K, in)
        out = features.new_zeros(num_out, weight.shape[0])
        for k, (in_rows, out_rows) in enumerate(pairs):
            if in_rows.numel():
                block = features.index_select(0, in_rows) @ per_offset[:, k].t()
                out.index_add_(0, out_rows, block.to(out.dtype))
        ctx.save_for_backward(features, weight)
        ctx.pairs = pairs
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        features, weight = ctx.saved_tensors
        grad_out = grad_out.to(features.dtype)
        per_offset = weight.reshape(weight.shape[0], -1, weight.shape[-1]).to(features.dtype)
        grad_features = torch.zeros_like(features) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(per_offset) if ctx.needs_input_grad[1] else None
        for k, (in_rows, out_rows) in enumerate(ctx.pairs):
            if not in_rows.numel():
                continue
            grad_block = grad_out.index_select(0, out_rows)  # (n_k, out)
            if grad_features is not None:
                grad_features.index_add_(0, in_rows, (grad_block @ per_offset[:, k]).to(features.dtype))
            if grad_weight is not None:
                grad_weight[:, k] = grad_block.t() @ features.index_select(0, in_rows)
        if grad_weight is not None:
            grad_weight = grad_weight.reshape(weight.shape).to(weight.dtype)
        return grad_features, grad_weight, None, None


def apply_rulebook(features: Tensor, weight: Tensor, rulebook: Rulebook, bias: Tensor | None = None) -> Tensor:
    """Sparse conv of (N, C_in) features with a ``[out, kD, kH, kW, in]`` weight -> (M, C_out)."""
    out = _RulebookConv.apply(features, weight, rulebook.pairs, len(rulebook.out_indices))
    return out + bias if bias is not None else out


class TorchSparseConvolution(nn.Module):
    """Sparse 3D conv with spconv's parameters (``weight`` [out, kD, kH, kW, in], optional ``bias``)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int, int] = 3,
        stride: int | tuple[int, int, int] = 1,
        padding: int | tuple[int, int, int] = 0,
        dilation: int | tuple[int, int, int] = 1,
        bias: bool = True,
        indice_key: str | None = None,
        subm: bool = False,
    ):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = _triple(kernel_size), _triple(stride)
        self.padding, self.dilation = _triple(padding), _triple(dilation)
        self.indice_key, self.subm = indice_key, subm
        self.weight = nn.Parameter(torch.empty(out_channels, *self.kernel_size, in_channels))
        self.register_parameter("bias", nn.Parameter(torch.empty(out_channels)) if bias else None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """spconv's init (kaiming-uniform with a=sqrt(5) on fan_in): one seed gives both backends equal weights."""
        fan_in = self.in_channels * math.prod(self.kernel_size)
        bound = 1.0 / math.sqrt(fan_in)
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)
            if self.bias is not None:
                self.bias.uniform_(-bound, bound)

    def rulebook(self, x: TorchSparseTensor) -> Rulebook:
        if not self.subm:
            return strided_rulebook(x.indices, x.spatial_shape, self.kernel_size, self.stride, self.padding, self.dilation)
        cached = x.rulebooks.get(self.indice_key) if self.indice_key else None
        if cached is not None:
            return cached
        book = submanifold_rulebook(x.indices, x.spatial_shape, self.kernel_size, self.dilation)
        if self.indice_key:
            x.rulebooks[self.indice_key] = book
        return book

    def forward(self, x: TorchSparseTensor) -> TorchSparseTensor:
        book = self.rulebook(x)
        features = apply_rulebook(x.features, self.weight, book, self.bias)
        return TorchSparseTensor(features, book.out_indices, book.spatial_shape, x.batch_size, x.rulebooks)

    def extra_repr(self) -> str:
        kind = "subm" if self.subm else f"stride={self.stride}, padding={self.padding}"
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, {kind}"


class TorchSubMConv3d(TorchSparseConvolution):
    """Submanifold conv (``spconv.SubMConv3d``): outputs exactly at the input sites."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size=3, stride=1, padding=0, dilation=1,
                 bias: bool = True, indice_key: str | None = None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, bias, indice_key, subm=True)


class TorchSparseConv3d(TorchSparseConvolution):
    """Regular sparse conv (``spconv.SparseConv3d``): outputs where any input reaches."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size=3, stride=1, padding=0, dilation=1,
                 bias: bool = True, indice_key: str | None = None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, bias, indice_key, subm=False)


class TorchSparseSequential(nn.Sequential):
    """``spconv.SparseSequential``: sparse layers see the tensor, the others (BN, ReLU) its features."""

    def forward(self, x: TorchSparseTensor) -> TorchSparseTensor:  # type: ignore[override]
        for module in self:
            if isinstance(module, (TorchSparseConvolution, TorchSparseSequential)):
                x = module(x)
            else:
                x = x.replace_feature(module(x.features))
        return x
