"""Gradient-norm loss scaling (``gradnorm_scaling``): each task loss divided by its gradient norm.

The cheap baseline of "loss scaling by gradient magnitude": the update is
``sum_i L_i / |grad_shared L_i|`` with the norms detached, i.e. every task's shared gradient has unit
norm and the heads get their task gradient times the same weight. Not Chen et al.'s GradNorm (no
learned weights, no target rates), which is why the name says ``scaling``. torchjd has no such
weighting, so it is written here; the norms come from the per-task Jacobian of the shared parameters
(K passes through the trunk), which also feeds the shared update and the diagnostics.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .base import Balancer, accumulate_flat_grad, backward_into, task_jacobian


class GradNormScalingBalancer(Balancer):
    """Task weights ``1 / |g_i|`` on the shared parameters (weight 1 for a task with zero gradient)."""

    def __init__(self, task_names: Sequence[str], eps: float = 1e-12, diagnostics: bool = False):
        super().__init__(task_names, diagnostics)
        self.eps = float(eps)

    def backward(
        self,
        losses: dict[str, Tensor],
        shared_params: list[Tensor],
        task_params: dict[str, list[Tensor]] | None = None,
        step: int = 0,
        features: list[Tensor] | None = None,
    ) -> dict[str, float]:
        loss_vector = self.stack_losses(losses)
        jacobian = task_jacobian(loss_vector, list(shared_params))
        gramian = jacobian @ jacobian.T
        norms = gramian.diagonal().clamp_min(0).sqrt()
        weights = torch.where(norms > self.eps, 1 / norms.clamp_min(self.eps), torch.ones_like(norms))
        accumulate_flat_grad(list(shared_params), weights @ jacobian)
        backward_into((weights.detach().to(loss_vector.dtype) * loss_vector).sum(), self.head_params(task_params))
        diagnostics = self.weight_diagnostics(weights)
        diagnostics.update(self.gramian_diagnostics(gramian))
        return diagnostics
