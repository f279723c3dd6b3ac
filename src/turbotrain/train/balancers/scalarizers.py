"""torchjd's loss scalarizers as balancers, by name (``balancer: stch``, ``imtl_l``, ``geometric_mean``).

A scalarizer is torchjd's function of the loss vector; the update is the gradient of that one
scalar, so it costs one backward pass like ``sum``. The logged task weights are its derivative
with respect to each loss at the current losses. FAMO, uncertainty weighting (torchjd ``UW``) and
DWA have balancers of their own (:mod:`.famo`, :mod:`.weighting`), which say why.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torchjd import scalarization

from turbotrain.utils.errors import ConfigError

from .base import LossWeightingBalancer

# Config name -> builder from (number of tasks, options); list options become tensors.
SCALARIZERS: dict[str, Callable[..., scalarization.Scalarizer]] = {
    "stch": lambda num_tasks, mu=1.0, weights=None, reference=None: scalarization.STCH(
        mu, None if weights is None else torch.tensor(weights), None if reference is None else torch.tensor(reference)
    ),
    "imtl_l": lambda num_tasks: scalarization.IMTLL(num_tasks),
    "geometric_mean": lambda num_tasks: scalarization.GeometricMean(),
}


class ScalarizerBalancer(LossWeightingBalancer):
    """One torchjd scalarizer of the task losses; its learnable parameters (IMTL-L) are this module's."""

    def __init__(self, task_names: Sequence[str], scalarizer: str, diagnostics: bool = False, **options: Any):
        super().__init__(task_names, diagnostics)
        if scalarizer not in SCALARIZERS:
            raise ConfigError(f"unknown scalarizer {scalarizer!r}; expected one of {sorted(SCALARIZERS)}")
        try:
            self.scalarizer = SCALARIZERS[scalarizer](self.num_tasks, **options)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"balancer '{scalarizer}': {err}") from err

    def loss_weights(self, loss_vector: Tensor) -> Tensor:
        """d scalarizer / d L_i at the current losses: the multiplier of each task's gradient."""
        values = loss_vector.detach().requires_grad_()
        with torch.enable_grad():
            return torch.autograd.grad(self.scalarizer(values), values)[0]

    def objective(self, loss_vector: Tensor, weights: Tensor) -> Tensor:
        return self.scalarizer(loss_vector)


def scalarizer_balancer(name: str) -> Callable[..., ScalarizerBalancer]:
    """Constructor of the balancer registered as ``name`` (``task_names`` then the options)."""

    def build(task_names: Sequence[str], diagnostics: bool = False, **options: Any) -> ScalarizerBalancer:
        return ScalarizerBalancer(task_names, name, diagnostics, **options)

    build.__name__ = f"{name}_balancer"
    return build
