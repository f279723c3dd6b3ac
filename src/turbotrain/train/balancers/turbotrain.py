"""TurboTrain-style balancing: gradient-conflict suppression on the shared parameters.

TurboTrain (Zhou et al., "TurboTrain: Towards Efficient and Balanced Multi-Task Learning for
Multi-Agent Perception and Prediction", arXiv 2508.04682, ICCV 2025) balances detection and
prediction by "gradient conflict suppression". The paper's exact rule is not public; this module
implements the following rule, chosen to be simple, continuous in the gradients and local.

The shared gradient is split into blocks — one per shared parameter tensor (``granularity="tensor"``,
default) or one for everything (``granularity="global"``). In each block b, with task gradients
``g_1..g_K`` restricted to b:

1. Conflict severity ``s_b = max(0, max_{i<j} -cos(g_i, g_j))`` in [0, 1].
2. Magnitude balancing in proportion to the conflict:
   ``h_i = ((1 - s_b) + s_b * m_b / |g_i|) * g_i`` with ``m_b = mean_i |g_i|`` (zero gradients stay
   zero). Where tasks fight head-on every task gets the mean norm, so the larger gradient cannot
   simply overrule the smaller one; where they agree nothing changes.
3. Conflict projection (PCGrad in both directions, against the ORIGINAL ``h_j``, tasks in fixed
   order so no RNG is involved): ``h_i' = h_i - (h_i'.h_j / |h_j|^2) h_j`` whenever ``h_i'.h_j < 0``.
4. Block update ``d_b = sum_i h_i'``.

Properties (tested): a block without a conflicting pair gets exactly ``sum_i g_i``; two exactly
opposite gradients cancel to zero instead of the larger one winning; for two tasks ``d_b . g_i >= 0``
for each task and block, i.e. no task's loss is increased to first order by any block's update.
Because steps 2-3 rescale and project by amounts that go to zero as ``cos -> 0``, the update has no
jump when a block's cosine changes sign (a hard "normalise only under conflict" switch would).

Cost and ``trailing_fraction``: per-task gradients of all shared parameters take K backward passes
through the whole trunk. With ``trailing_fraction < 1`` the rule is applied only to the trailing
share (by parameter count, whole tensors) of ``shared_params``, which must then be listed from input
to output (as ``CooperativePnP.shared_parameters()`` does); the leading parameters get the plain sum
from the single full backward pass. Per-task gradients of the last layers only need a backward
through the heads and those layers — the reason GradNorm measures on the last shared layer.

Why per block rather than one flattened vector: conflict is typically local (e.g. the last shared
layers feeding two heads) while most of the trunk agrees; a global projection would also bend the
agreeing blocks, and one conflicting block could flip the global cosine for all of them.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from turbotrain.utils.errors import ConfigError

from .base import GradientCombinationBalancer
from .surgery import project_conflicts

GRANULARITIES = ("tensor", "global")


def block_gramians(jacobian: Tensor, block_ids: Tensor, num_blocks: int) -> Tensor:
    """``(B, K, K)`` gramians of the task gradients restricted to each block, by segment sums."""
    num_tasks = jacobian.shape[0]
    gramians = jacobian.new_zeros(num_blocks, num_tasks, num_tasks)
    for i in range(num_tasks):
        for j in range(i, num_tasks):
            sums = jacobian.new_zeros(num_blocks).index_add_(0, block_ids, jacobian[i] * jacobian[j])
            gramians[:, i, j] = sums
            gramians[:, j, i] = sums
    return gramians


def conflict_severity(gramians: Tensor) -> Tensor:
    """``(B,)`` worst pairwise ``-cos`` per block, clipped to [0, 1]; 0 means no conflict."""
    norms = gramians.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt()
    denom = (norms[:, :, None] * norms[:, None, :]).clamp_min(torch.finfo(gramians.dtype).tiny)
    off_diagonal = ~torch.eye(gramians.shape[1], dtype=torch.bool, device=gramians.device)
    cosines = torch.where(off_diagonal, gramians / denom, torch.zeros_like(gramians))
    return (-cosines).amax(dim=(1, 2)).clamp(0, 1)


def balancing_scales(gramians: Tensor, severity: Tensor) -> Tensor:
    """``(B, K)`` factors ``(1 - s) + s * mean_norm / |g_i|`` (1 for zero gradients)."""
    norms = gramians.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt()
    to_mean = norms.mean(dim=1, keepdim=True) / norms.clamp_min(torch.finfo(norms.dtype).tiny)
    to_mean = torch.where(norms > 0, to_mean, torch.ones_like(to_mean))
    return (1 - severity[:, None]) + severity[:, None] * to_mean


def suppression_weights(gramians: Tensor) -> tuple[Tensor, Tensor]:
    """Per-block coefficients ``(B, K)`` on the original task gradients, and the severities."""
    severity = conflict_severity(gramians)
    scales = balancing_scales(gramians, severity)
    scaled_gramians = gramians * scales[:, :, None] * scales[:, None, :]
    num_tasks = gramians.shape[1]
    fixed_order = [list(range(num_tasks))] * num_tasks
    return project_conflicts(scaled_gramians, fixed_order) * scales, severity


class TurboTrainBalancer(GradientCombinationBalancer):
    """Block-wise gradient-conflict suppression (rule in the module docstring)."""

    def __init__(
        self,
        task_names: Sequence[str],
        granularity: str = "tensor",
        trailing_fraction: float = 1.0,
        diagnostics: bool = False,
    ):
        super().__init__(task_names, diagnostics)
        if granularity not in GRANULARITIES:
            raise ConfigError(f"turbotrain granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if not 0 < trailing_fraction <= 1:
            raise ConfigError(f"turbotrain trailing_fraction must be in (0, 1], got {trailing_fraction}")
        self.granularity = granularity
        self.trailing_fraction = float(trailing_fraction)
        self._block_ids_cache: dict[tuple, Tensor] = {}

    def split_shared(self, shared_params: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Leading parameters (plain sum) and the trailing ``trailing_fraction`` of them (balanced)."""
        target = self.trailing_fraction * sum(p.numel() for p in shared_params)
        start, covered = len(shared_params), 0
        while start > 0 and covered < target:
            start -= 1
            covered += shared_params[start].numel()
        return shared_params[:start], shared_params[start:]

    def block_sizes(self, param_sizes: list[int]) -> list[int]:
        return list(param_sizes) if self.granularity == "tensor" else [sum(param_sizes)]

    def block_ids(self, sizes: list[int], device: torch.device) -> Tensor:
        """Block index of every flat shared-gradient element (cached: the layout never changes)."""
        key = (tuple(sizes), str(device))
        if key not in self._block_ids_cache:
            counts = torch.tensor(sizes, device=device)
            self._block_ids_cache[key] = torch.repeat_interleave(torch.arange(len(sizes), device=device), counts)
        return self._block_ids_cache[key]

    def combine(
        self, jacobian: Tensor, gramian: Tensor, param_sizes: list[int]
    ) -> tuple[Tensor, Tensor, dict[str, float]]:
        sizes = self.block_sizes(param_sizes)
        ids = self.block_ids(sizes, jacobian.device)
        weights, severity = suppression_weights(block_gramians(jacobian, ids, len(sizes)))
        per_element = weights[ids]  # (N, K)
        combined = (per_element.T * jacobian).sum(dim=0)
        numel = torch.tensor(sizes, dtype=jacobian.dtype, device=jacobian.device)
        mean_weights = (weights * numel[:, None]).sum(dim=0) / numel.sum()
        conflict_fraction = (numel * (severity > 0)).sum() / numel.sum()
        return combined, mean_weights, {"conflict_fraction": conflict_fraction.item()}
