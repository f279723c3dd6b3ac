"""torchjd's Jacobian aggregators as balancers, by name (``balancer: upgrad``, ``nash_mtl``, ...).

An aggregator is torchjd's pure function of the ``(K, N)`` task Jacobian (or of its gramian); this
module only wires it to our autograd plumbing (:class:`GradientCombinationBalancer`): per-task
gradients of the shared parameters (``space="parameters"``, the published setting) or of the shared
features (``space="features"``, MGDA-UB's trick: K passes through the heads, one through the
trunk), the aggregate into ``.grad``, heads with their own plain gradient.

Effective task weights are logged for every aggregator: torchjd's own weights where it is a
weighted aggregator (UPGrad, MGDA, ...), else (ConFIG, GradDrop) the least-squares coefficients of
the update on the task gradients (exact for ConFIG, whose update lies in their span; an
approximation for GradDrop, whose elementwise masks leave it).

Stateful aggregators (Nash-MTL, GradVac, ExcessMTL) keep their state in Python attributes that
torchjd does not put into ``state_dict``: a resumed run restarts that state (docs/faithfulness.md).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from scipy.optimize import nnls
from torch import Tensor
from torchjd import aggregation
from torchjd._linalg._gramian import normalize, regularize
from torchjd.linalg import DualConeProjector, QuadprogProjector

from turbotrain.utils.errors import ConfigError

from .base import GradientCombinationBalancer


class NNLSProjector(DualConeProjector):
    """UPGrad's / DualProj's dual-cone QP ``min_v v^T G v s.t. v >= u`` solved exactly by scipy's NNLS.

    Hand-written adapter because torchjd's only projector needs qpsolvers + quadprog: with
    ``G + eps I = L L^T`` and ``v = u + x``, the QP is ``min_{x >= 0} |L^T x + L^T u|^2``, an NNLS
    problem. The gramian is normalised and regularised exactly as torchjd's ``QuadprogProjector``
    does, so both solve the same QP (tested against it where quadprog is installed).
    """

    def __init__(self, norm_eps: float = 1e-4, reg_eps: float = 1e-4):
        self.norm_eps, self.reg_eps = norm_eps, reg_eps

    def __call__(self, U: Tensor, G: Tensor) -> Tensor:
        matrix = regularize(normalize(G, self.norm_eps), self.reg_eps).detach().cpu().double().numpy()
        factor_t = np.linalg.cholesky(matrix).T
        targets = U.detach().cpu().double().numpy()
        solve = lambda u: u + nnls(factor_t, -factor_t @ u)[0]  # noqa: E731
        weights = np.apply_along_axis(solve, -1, targets)
        return torch.as_tensor(weights, dtype=G.dtype, device=G.device)


PROJECTORS: dict[str, Callable[[], DualConeProjector]] = {
    "nnls": NNLSProjector,
    "quadprog": QuadprogProjector,
}


def _with_projector(cls: type) -> Callable[..., aggregation.Aggregator]:
    def build(projector: str = "nnls", **options: Any) -> aggregation.Aggregator:
        if projector not in PROJECTORS:
            raise ConfigError(f"projector must be one of {sorted(PROJECTORS)}, got {projector!r}")
        return cls(projector=PROJECTORS[projector](), **options)

    return build


# Config name -> builder of the torchjd aggregator from the config options (list options that torchjd
# takes as tensors are converted in ``torchjd_options``). ``n_tasks`` is filled in for Nash-MTL.
AGGREGATORS: dict[str, Callable[..., aggregation.Aggregator]] = {
    "upgrad": _with_projector(aggregation.UPGrad),
    "dualproj": _with_projector(aggregation.DualProj),
    "config": aggregation.ConFIG,
    "aligned_mtl": aggregation.AlignedMTL,
    "nash_mtl": aggregation.NashMTL,
    "fairgrad": aggregation.FairGrad,
    "imtl_g": aggregation.IMTLG,
    "gradvac": aggregation.GradVac,
    "mgda": aggregation.MGDA,
    "graddrop": aggregation.GradDrop,
    "excess_mtl": aggregation.ExcessMTL,
    "mean": aggregation.Mean,
}
# Options torchjd requires that have no default there: the value each paper's experiments used.
REQUIRED_DEFAULTS: dict[str, dict[str, Any]] = {"fairgrad": {"alpha": 1.0}}
TENSOR_OPTIONS = ("pref_vector", "leak")


def torchjd_options(name: str, num_tasks: int, options: dict[str, Any]) -> dict[str, Any]:
    """Config options of aggregator ``name`` as torchjd keyword arguments."""
    merged = {**REQUIRED_DEFAULTS.get(name, {}), **options}
    if name == "nash_mtl":
        merged["n_tasks"] = num_tasks
    for key in TENSOR_OPTIONS:
        if key in merged and merged[key] is not None:
            merged[key] = torch.tensor(merged[key], dtype=torch.float64)
    return merged


def build_aggregator(name: str, num_tasks: int, **options: Any) -> aggregation.Aggregator:
    """torchjd's aggregator ``name`` with the config ``options`` (bad keys raise ConfigError)."""
    try:
        return AGGREGATORS[name](**torchjd_options(name, num_tasks, options))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"balancer '{name}': {err}") from err


def least_squares_weights(jacobian: Tensor, gramian: Tensor, update: Tensor) -> Tensor:
    """Coefficients ``w`` minimising ``|J^T w - update|``, via the ``(K, K)`` gramian (pseudo-inverse)."""
    return torch.linalg.pinv(gramian) @ (jacobian @ update)


class AggregatorBalancer(GradientCombinationBalancer):
    """One torchjd aggregator applied to the task Jacobian of the shared parameters or features."""

    def __init__(
        self,
        task_names: Sequence[str],
        aggregator: str,
        space: str = "parameters",
        diagnostics: bool = False,
        **options: Any,
    ):
        super().__init__(task_names, space, diagnostics)
        if aggregator not in AGGREGATORS:
            raise ConfigError(f"unknown aggregator {aggregator!r}; expected one of {sorted(AGGREGATORS)}")
        self.aggregator_name = aggregator
        self.aggregator = build_aggregator(aggregator, self.num_tasks, **options)

    def combine(self, jacobian: Tensor, gramian: Tensor, layout: tuple) -> tuple[Tensor, Tensor, dict[str, float]]:
        aggregator = self.aggregator
        if isinstance(aggregator, aggregation.GramianWeightedAggregator):
            weights = aggregator.gramian_weighting(gramian)  # the gramian is already at hand
        elif isinstance(aggregator, aggregation.WeightedAggregator):
            weights = aggregator.weighting(jacobian)
        else:
            update = aggregator(jacobian)
            return update, least_squares_weights(jacobian, gramian, update), {}
        weights = weights.to(jacobian.dtype)
        return weights @ jacobian, weights, {}


def aggregator_balancer(name: str) -> Callable[..., AggregatorBalancer]:
    """Constructor of the balancer registered as ``name`` (``task_names`` then the options)."""

    def build(task_names: Sequence[str], space: str = "parameters", diagnostics: bool = False, **options: Any):
        return AggregatorBalancer(task_names, name, space, diagnostics, **options)

    build.__name__ = f"{name}_balancer"
    return build
