"""Gradient surgery on the shared parameters: PCGrad (Yu et al. 2020) and CAGrad (Liu et al. 2021).

Both are written as *gramian weightings* (as torchjd does): from the ``(K, K)`` gramian of the task
gradients they compute coefficients ``w`` and the shared update is ``w @ J``. The K x K work is
negligible next to the K backward passes that produce ``J``.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from turbotrain.utils.errors import ConfigError

from .base import GradientCombinationBalancer


def project_conflicts(gramians: Tensor, orders: Sequence[Sequence[int]]) -> Tensor:
    """PCGrad coefficients for a batch of gramians ``(B, K, K)``; returns ``(B, K)``.

    Task i's gradient is projected, over the tasks j in ``orders[i]`` (i itself is skipped), off
    the ORIGINAL ``g_j`` whenever ``g_i' . g_j < 0``; the result is ``sum_i g_i'``, expressed as
    coefficients on the original gradients. Batched with ``torch.where`` instead of Python ``if`` so
    many blocks are handled at once and no device sync is needed.
    """
    batch, num_tasks, _ = gramians.shape
    eye = torch.eye(num_tasks, dtype=gramians.dtype, device=gramians.device)
    squared_norms = gramians.diagonal(dim1=1, dim2=2).clamp_min(torch.finfo(gramians.dtype).tiny)
    total = torch.zeros(batch, num_tasks, dtype=gramians.dtype, device=gramians.device)
    for i in range(num_tasks):
        current = eye[i].expand(batch, num_tasks).clone()
        for j in orders[i]:
            if j == i:
                continue
            inner = (gramians[:, j, :] * current).sum(dim=1)
            current[:, j] -= torch.where(inner < 0, inner / squared_norms[:, j], torch.zeros_like(inner))
        total += current
    return total


class PCGradBalancer(GradientCombinationBalancer):
    """PCGrad on the shared parameters, summing the projected task gradients (as the paper/torchjd).

    The per-task projection order is random, drawn from this balancer's own seeded generator so a
    run is reproducible without touching the global RNG stream. That is the one difference from
    torchjd's ``PCGrad`` (same result for the same orders, tested), which draws from the global
    generator and so shifts every later random draw of the run (data order, dropout) by the
    balancer's choice.
    """

    def __init__(
        self, task_names: Sequence[str], seed: int = 0, space: str = "parameters", diagnostics: bool = False
    ):
        super().__init__(task_names, space, diagnostics)
        self.generator = torch.Generator().manual_seed(seed)

    def random_orders(self) -> list[list[int]]:
        return [torch.randperm(self.num_tasks, generator=self.generator).tolist() for _ in range(self.num_tasks)]

    def combine(
        self, jacobian: Tensor, gramian: Tensor, layout: tuple
    ) -> tuple[Tensor, Tensor, dict[str, float]]:
        weights = project_conflicts(gramian[None], self.random_orders())[0]
        return weights @ jacobian, weights, {}

    def get_extra_state(self) -> Tensor:
        # The generator state is what makes a resumed run draw the same orders.
        return self.generator.get_state()

    def set_extra_state(self, state: Tensor) -> None:
        self.generator.set_state(state)


def cagrad_weights(gramian: Tensor, c: float, pareto_eps: float = 1e-4) -> Tensor:
    """CAGrad coefficients ``(1/K + lambda w) / (1 + c^2)`` from the task gramian.

    ``w`` on the simplex minimises ``w.(G g0) + sqrt(phi) |G^T w|`` with ``sqrt(phi) = c |g0|``,
    solved by scipy SLSQP with the analytic gradient. The gramian is first divided by its trace,
    which leaves ``w`` and ``lambda`` unchanged but keeps the solver well scaled. When ``|g_w|``
    vanishes the gradients are (nearly) Pareto-stationary and no common descent direction exists,
    so the update is zero (as in torchjd).
    """
    num_tasks = gramian.shape[0]
    matrix = gramian.detach().double().cpu().numpy()
    trace = float(np.trace(matrix))
    if trace <= 0:
        return torch.zeros(num_tasks, dtype=gramian.dtype, device=gramian.device)
    matrix = matrix / trace
    mean = np.full(num_tasks, 1.0 / num_tasks)
    towards_mean = matrix @ mean
    sqrt_phi = c * float(np.sqrt(max(mean @ towards_mean, 0.0)))

    def objective(w: np.ndarray) -> float:
        return float(w @ towards_mean + sqrt_phi * np.sqrt(max(w @ matrix @ w, 1e-20)))

    def objective_grad(w: np.ndarray) -> np.ndarray:
        return towards_mean + sqrt_phi * (matrix @ w) / np.sqrt(max(w @ matrix @ w, 1e-20))

    from scipy.optimize import minimize  # ~0.5 s to import: only runs with this balancer pay it

    result = minimize(
        objective, mean, jac=objective_grad, method="SLSQP", bounds=[(0.0, 1.0)] * num_tasks,
        constraints=({"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones_like(w)},),
        options={"ftol": 1e-12, "maxiter": 200},
    )
    w = np.clip(result.x, 0.0, None)
    w = w / w.sum()
    gw_norm = float(np.sqrt(max(w @ matrix @ w, 0.0)))
    if gw_norm < pareto_eps:
        coefficients = np.zeros(num_tasks)
    else:
        coefficients = (mean + (sqrt_phi / gw_norm) * w) / (1.0 + c**2)
    return torch.from_numpy(coefficients).to(dtype=gramian.dtype, device=gramian.device)


class CAGradBalancer(GradientCombinationBalancer):
    """Conflict-averse gradient descent on the shared parameters (``c`` = 0.4 by default).

    The update ``(g0 + sqrt(phi)/|g_w| g_w) / (1 + c^2)`` is the official implementation's
    ``rescale=1`` form; torchjd's ``CAGrad`` is the same without the ``1 / (1 + c^2)`` factor (tested)
    and needs cvxpy + clarabel, so this scipy version stays (docs/faithfulness.md).
    """

    def __init__(
        self, task_names: Sequence[str], c: float = 0.4, space: str = "parameters", diagnostics: bool = False
    ):
        super().__init__(task_names, space, diagnostics)
        if c < 0:
            raise ConfigError(f"cagrad c must be >= 0, got {c}")
        self.c = float(c)

    def combine(
        self, jacobian: Tensor, gramian: Tensor, layout: tuple
    ) -> tuple[Tensor, Tensor, dict[str, float]]:
        weights = cagrad_weights(gramian, self.c)
        return weights @ jacobian, weights, {}
