"""Data-parallel training inside one job, launched with ``torchrun``.

``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; without them the run is a single
process and nothing here touches ``torch.distributed``.

Gradients are averaged by :func:`all_reduce_gradients`, not by DistributedDataParallel's reducer:
the multi-task balancers compute per-task gradients with ``torch.autograd.grad``, which never fires
the reducer's hooks (they sit on ``.grad`` accumulation), so DDP would silently skip the averaging or
complain that the previous reduction did not finish. The model is still wrapped in DDP, always run
under ``no_sync()``, for what DDP does beyond gradients: it broadcasts rank 0's parameters and
buffers at construction and the buffers again before each forward.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from turbotrain.utils.errors import ConfigError


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job: its rank, the world size and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes checkpoints and logs."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def launch_env() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the torchrun environment, ``(0, 1, 0)`` without it."""
    try:
        rank = int(os.environ.get("RANK", "0"))
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as err:
        raise ConfigError(f"torchrun environment variables must be integers: {err}") from err
    if not 0 <= rank < world_size:
        raise ConfigError(f"RANK={rank} must lie in [0, WORLD_SIZE={world_size})")
    return rank, world_size, local_rank


def resolve_device(preference: str, local_rank: int = 0) -> torch.device:
    """``"auto"`` picks CUDA when present; a CUDA process uses the GPU of its local rank."""
    if preference not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda', got {preference!r}")
    use_cuda = preference == "cuda" or (preference == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but torch.cuda.is_available() is False")
    return torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")


@contextlib.contextmanager
def distributed_context(device_preference: str) -> Iterator[DistContext]:
    """Join the torchrun process group for the duration of the block (gloo on CPU, nccl on CUDA).

    A group that already exists (created by the caller) is reused and left open.
    """
    rank, world_size, local_rank = launch_env()
    device = resolve_device(device_preference, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    created = False
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        created = True
    try:
        yield DistContext(rank, world_size, local_rank, device)
    finally:
        if created:
            dist.destroy_process_group()


def wrap_model(model: nn.Module, ctx: DistContext) -> nn.Module:
    """DDP wrapper for multi-process runs (see module docstring), the model itself otherwise."""
    if not ctx.is_distributed:
        return model
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module behind a DDP wrapper."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def no_gradient_sync(model: nn.Module) -> contextlib.AbstractContextManager:
    """Keep DDP's reducer disarmed; gradients are averaged by :func:`all_reduce_gradients`."""
    return model.no_sync() if isinstance(model, DistributedDataParallel) else contextlib.nullcontext()


def all_reduce_gradients(params: Sequence[torch.Tensor], ctx: DistContext, divisor: float) -> None:
    """Sum every ``.grad`` over ranks (one flattened collective) and divide by ``divisor``.

    A parameter keeps ``grad=None`` (so the optimizer skips it) only if no rank produced a gradient
    for it; where some ranks did, the others contribute zeros so every rank sends the same layout.
    """
    if ctx.is_distributed:
        params = _parameters_with_grad_on_any_rank(params)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        if grads:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            for p, g in zip(params, torch.split(flat, [g.numel() for g in grads])):
                p.grad = g.view_as(p).clone()
    for p in params:
        if p.grad is not None:
            p.grad.div_(divisor)


def _parameters_with_grad_on_any_rank(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    if not params:
        return []
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=params[0].device)
    dist.all_reduce(has_grad, op=dist.ReduceOp.MAX)
    return [p for p, flag in zip(params, has_grad.tolist()) if flag]


def all_reduce_mean(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Mean of ``values`` over ranks (a copy; the input is left alone)."""
    out = values.detach().clone()
    if ctx.is_distributed:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        out /= ctx.world_size
    return out


def average_floating_buffers(module: nn.Module, ctx: DistContext) -> None:
    """Average a module's floating-point buffers over ranks, in place (no-op in one process)."""
    if not ctx.is_distributed:
        return
    for buffer in module.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
            buffer /= ctx.world_size


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (no-op in a single process)."""
    if ctx.is_distributed:
        dist.barrier()


def is_main_process() -> bool:
    """Rank 0 under torchrun (or the only process): the one that writes run outputs."""
    return launch_env()[0] == 0
