"""Pick the sparse-convolution implementation SECOND is built from: spconv or plain PyTorch.

Both backends expose the same four constructors, so one model definition yields the same parameter
names and shapes under either, and a state dict saved with one loads into the other.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from turbotrain.models.encoders import sparse_torch

from turbotrain.models.encoders.spconv_compat import import_spconv, spconv_available

BACKEND_NAMES = ("auto", "torch", "spconv")


@dataclass(frozen=True)
class SparseBackend:
    """Constructors of one sparse-conv implementation (argument order as ``spconv.pytorch``)."""

    name: str
    subm_conv: Callable[..., Any]  # (in, out, kernel_size, bias=..., indice_key=...)
    sparse_conv: Callable[..., Any]  # (in, out, kernel_size, stride=, padding=, bias=, indice_key=)
    sequential: Callable[..., Any]  # (*modules)
    make_tensor: Callable[[Tensor, Tensor, tuple[int, int, int], int], Any]  # (features, indices, shape, batch)


def _make_torch_tensor(features: Tensor, indices: Tensor, shape: tuple[int, int, int], batch: int) -> Any:
    return sparse_torch.TorchSparseTensor(features, indices, tuple(shape), batch)


def _make_spconv_tensor(features: Tensor, indices: Tensor, shape: tuple[int, int, int], batch: int) -> Any:
    # spconv reads the raw buffer of ``indices`` and silently misreads non-contiguous ones
    # (e.g. the column-major result of ``Tensor.nonzero()``), so force int32 + contiguous.
    return import_spconv().SparseConvTensor(features.contiguous(), indices.int().contiguous(), list(shape), batch)


def _torch_backend() -> SparseBackend:
    return SparseBackend(
        name="torch",
        subm_conv=sparse_torch.TorchSubMConv3d,
        sparse_conv=sparse_torch.TorchSparseConv3d,
        sequential=sparse_torch.TorchSparseSequential,
        make_tensor=_make_torch_tensor,
    )


def _spconv_backend() -> SparseBackend:
    spconv = import_spconv()
    return SparseBackend(
        name="spconv",
        subm_conv=spconv.SubMConv3d,
        sparse_conv=spconv.SparseConv3d,
        sequential=spconv.SparseSequential,
        make_tensor=_make_spconv_tensor,
    )


def get_backend(name: str = "auto") -> SparseBackend:
    """``"auto"`` = spconv on a CUDA machine where it imports, else the PyTorch implementation.

    On CPU the PyTorch backend is as fast as spconv's CPU wheel (bench_encoder.py) and, unlike it,
    correct with several threads (see spconv_compat.apply_cpu_stream_shim).
    """
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown sparse backend {name!r}; expected one of {BACKEND_NAMES}")
    if name == "auto":
        name = "spconv" if torch.cuda.is_available() and spconv_available() else "torch"
    return _spconv_backend() if name == "spconv" else _torch_backend()
