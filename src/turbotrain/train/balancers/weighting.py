"""Loss-weighting balancers: plain sum, fixed weights, uncertainty weighting (Kendall) and DWA."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from turbotrain.utils.errors import ConfigError

from .base import LossWeightingBalancer


class SumBalancer(LossWeightingBalancer):
    """Every task weighted 1: identical to ``sum(losses).backward()``."""

    def loss_weights(self, loss_vector: Tensor) -> Tensor:
        return torch.ones_like(loss_vector)


class FixedBalancer(LossWeightingBalancer):
    """Constant per-task weights given in the config (tasks not named default to 1)."""

    def __init__(
        self,
        task_names: Sequence[str],
        weights: Mapping[str, float] | None = None,
        diagnostics: bool = False,
    ):
        super().__init__(task_names, diagnostics)
        weights = dict(weights or {})
        unknown = set(weights) - set(self.task_names)
        if unknown:
            raise ConfigError(f"fixed balancer weights for unknown tasks {sorted(unknown)}")
        values = [float(weights.get(name, 1.0)) for name in self.task_names]
        self.register_buffer("weights", torch.tensor(values))

    def loss_weights(self, loss_vector: Tensor) -> Tensor:
        return self.weights.to(loss_vector)


class UncertaintyBalancer(LossWeightingBalancer):
    """Kendall et al. 2018: ``sum_i L_i / (2 exp(s_i)) + s_i / 2`` with learnable log-variances s.

    The objective is torchjd's ``UW`` scalarizer; ``s`` is a parameter of this module, so the engine
    must hand ``balancer.parameters()`` to its optimiser (and gets it checkpointed via state_dict).
    """

    def __init__(self, task_names: Sequence[str], diagnostics: bool = False):
        super().__init__(task_names, diagnostics)
        # Imported here: torchjd pulls in cvxpy (~1 s), which runs that use another balancer never need.
        from torchjd.scalarization import UW

        self.uw = UW(len(self.task_names))

    @property
    def log_variances(self) -> Tensor:
        return self.uw.log_var

    def loss_weights(self, loss_vector: Tensor) -> Tensor:
        return 0.5 * torch.exp(-self.uw.log_var.detach())

    def objective(self, loss_vector: Tensor, weights: Tensor) -> Tensor:
        return self.uw(loss_vector)


class DWABalancer(LossWeightingBalancer):
    """Dynamic Weight Average (Liu et al. 2019): ``w = K softmax(r / T)``, ``r_i = L_i(t-1)/L_i(t-2)``.

    Hand-written rather than torchjd's ``DWA`` because the engine already hands over epoch means via
    :meth:`end_epoch`, and the two-epoch history has to live in buffers so a resumed run (state_dict)
    keeps it; torchjd's DWA accumulates batch losses itself and keeps its history outside state_dict.
    Weights are uniform until two epochs have been seen.
    """

    def __init__(self, task_names: Sequence[str], temperature: float = 2.0, diagnostics: bool = False):
        super().__init__(task_names, diagnostics)
        if temperature <= 0:
            raise ConfigError(f"dwa temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.register_buffer("epoch_means", torch.ones(2, len(self.task_names), dtype=torch.float64))
        self.register_buffer("epochs_seen", torch.zeros((), dtype=torch.long))

    def end_epoch(self, epoch_losses: dict[str, float]) -> None:
        if set(epoch_losses) != set(self.task_names):
            raise KeyError(f"dwa expects epoch losses for {self.task_names}, got {sorted(epoch_losses)}")
        latest = torch.tensor([float(epoch_losses[n]) for n in self.task_names], dtype=torch.float64)
        self.epoch_means.copy_(torch.stack([self.epoch_means[1], latest.to(self.epoch_means)]))
        self.epochs_seen += 1

    def loss_weights(self, loss_vector: Tensor) -> Tensor:
        if int(self.epochs_seen) < 2:
            return torch.ones_like(loss_vector)
        rates = self.epoch_means[1] / self.epoch_means[0]
        weights = self.num_tasks * torch.softmax(rates / self.temperature, dim=0)
        return weights.to(loss_vector)
