"""FAMO (Liu et al., NeurIPS 2023): balance by making all log-losses decrease at the same rate.

Per step: one backward of ``sum_i (z_i / c) log(L_i - b_i + eps)`` with ``z = softmax(w)`` and
``c = sum_i z_i / (L_i - b_i + eps)`` held constant — equivalently task weights
``z_i / (c (L_i - b_i + eps))`` — then, after the optimiser step, :meth:`FAMOBalancer.update` with
the losses recomputed on the same batch moves the logits ``w`` by one Adam step (lr 0.025, weight
decay 1e-3, as in the paper's Algorithm 2) along ``-J_softmax(w)^T delta``, ``delta_i`` being the
decrease of ``log L_i``. Tasks whose loss fell less gain weight. Matches torchjd's ``FAMO``
scalarizer (tested), but keeps all of its state in buffers — see :class:`FAMOBalancer`.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from turbotrain.utils.errors import ConfigError

from .base import LossWeightingBalancer

_LOG_EPS = 1e-8


class BufferAdam(torch.nn.Module):
    """Adam (L2 weight decay, as ``torch.optim.Adam``) on one vector that lives in buffers.

    Hand-written because FAMO's logits must not be ``Parameters`` (the engine puts
    ``balancer.parameters()`` into its own optimiser, which would then also step them), and
    ``torch.optim.Adam`` keeps references to tensors that ``Module.to()`` replaces and keeps its
    moments outside ``state_dict``. Here value, moments and step count are buffers, so they move
    with the module and are checkpointed.
    """

    def __init__(
        self, size: int, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8
    ):
        super().__init__()
        self.lr, self.weight_decay, self.betas, self.eps = lr, weight_decay, betas, eps
        self.register_buffer("value", torch.zeros(size))
        self.register_buffer("first_moment", torch.zeros(size))
        self.register_buffer("second_moment", torch.zeros(size))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def step(self, grad: Tensor) -> None:
        beta1, beta2 = self.betas
        grad = grad + self.weight_decay * self.value
        self.steps += 1
        t = int(self.steps)
        self.first_moment.mul_(beta1).add_(grad, alpha=1 - beta1)
        self.second_moment.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (self.second_moment.sqrt() / (1 - beta2**t) ** 0.5).add_(self.eps)
        self.value.addcdiv_(self.first_moment, denom, value=-self.lr / (1 - beta1**t))


class FAMOBalancer(LossWeightingBalancer):
    """Fast Adaptive Multitask Optimisation: O(1) in the number of tasks (one backward per step).

    ``min_losses`` are the per-task lower bounds ``b`` (0 for non-negative losses). Call
    :meth:`update` once per optimiser step with the post-step losses of the same batch.
    """

    def __init__(
        self,
        task_names: Sequence[str],
        lr: float = 0.025,
        weight_decay: float = 1e-3,
        min_losses: Sequence[float] | None = None,
        diagnostics: bool = False,
    ):
        super().__init__(task_names, diagnostics)
        if lr < 0 or weight_decay < 0:
            raise ConfigError(f"famo lr and weight_decay must be >= 0, got {lr}, {weight_decay}")
        bounds = [0.0] * self.num_tasks if min_losses is None else [float(b) for b in min_losses]
        if len(bounds) != self.num_tasks:
            raise ConfigError(f"famo min_losses needs {self.num_tasks} values, got {len(bounds)}")
        self.logits = BufferAdam(self.num_tasks, lr=lr, weight_decay=weight_decay)
        self.register_buffer("min_losses", torch.tensor(bounds))
        self.register_buffer("losses_before", torch.full((self.num_tasks,), float("nan")))

    def task_weights(self) -> Tensor:
        """``softmax(w)``: the share of the loss-rate budget each task gets."""
        return torch.softmax(self.logits.value, dim=0)

    def shifted(self, loss_vector: Tensor) -> Tensor:
        return loss_vector.detach() - self.min_losses.to(loss_vector) + _LOG_EPS

    def loss_weights(self, loss_vector: Tensor) -> Tensor:
        shifted = self.shifted(loss_vector)
        self.losses_before.copy_(shifted.to(self.losses_before))
        z = self.task_weights().to(shifted)
        # d/dtheta of (z_i / c) log(shifted_i) with c constant is z_i / (c shifted_i) grad L_i.
        return z / shifted / (z / shifted).sum()

    def backward(
        self,
        losses: dict[str, Tensor],
        shared_params: list[Tensor],
        task_params: dict[str, list[Tensor]] | None = None,
        step: int = 0,
        features: list[Tensor] | None = None,
    ) -> dict[str, float]:
        diagnostics = super().backward(losses, shared_params, task_params, step, features)
        z = self.task_weights().tolist()
        diagnostics.update({f"famo_z/{n}": v for n, v in zip(self.task_names, z)})
        return diagnostics

    def update(self, losses_after: dict[str, Tensor]) -> None:
        if torch.isnan(self.losses_before).any():
            raise RuntimeError("FAMOBalancer.update called before backward on this batch")
        after = self.shifted(self.stack_losses(losses_after)).to(self.losses_before)
        delta = torch.log(self.losses_before) - torch.log(after)
        z = self.task_weights()
        # Vector-Jacobian product of softmax: J^T delta = z * (delta - z . delta).
        self.logits.step(z * (delta - (z * delta).sum()))
