"""TurboTrain-style balancing: gradient-conflict suppression on the shared parameters or features.

TurboTrain (Zhou et al., "TurboTrain: Towards Efficient and Balanced Multi-Task Learning for
Multi-Agent Perception and Prediction", arXiv 2508.04682, ICCV 2025) balances detection and
prediction by "gradient conflict suppression". The paper's exact rule is not public; this module
implements the following rule, chosen to be simple, continuous in the gradients and local.

The task gradients are split into blocks (which blocks depends on the space, below). In each block
b, with task gradients ``g_1..g_K`` restricted to b:

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
Heads always get their own task's plain gradient.

Spaces
------
``space="parameters"``: ``g_i`` are gradients of the shared PARAMETERS; one block per
parameter tensor (``granularity="tensor"``, default) or one for everything (``"global"``). The
property above then holds for the update itself. Cost: K backward passes through the whole trunk
(about 1.45x the step time of ``sum`` for the tiny CooperativePnP on CPU, see
``benchmarks/bench_balancers.py``). With ``trailing_fraction < 1`` the rule is applied only to the
trailing share (by parameter count, whole tensors) of ``shared_params``, which must then be listed
from input to output (as ``CooperativePnP.shared_parameters()`` does); the leading parameters get the
plain sum from the single full backward pass.

``space="features"``: the shared-representation trick of MGDA-UB (Sener & Koltun, "Multi-Task
Learning as Multi-Objective Optimization", NeurIPS 2018). ``g_i`` are gradients of the shared
FEATURES the heads read (for CooperativePnP ``[bev, step_bev]``, returned by the step function under
``"features"``); they cost K backward passes through the heads only. The rule combines them and
ONE backward sends the combined feature gradient into the shared parameters (mechanics and the
contract on ``features`` in :mod:`.features`). About 1.2x the step time of ``sum`` on the same
benchmark. Blocks: one per feature, sample and BEV cell (``granularity="cell"``, default; all
channels, and all history steps of ``step_bev``, at that cell) or one per feature and sample
(``"sample"``). Cells, because conflicts are local in BEV: the detection loss pulls on every cell,
while the prediction head reads the maps only at its query boxes' centres, so in a per-sample block
the many detection-only cells dilute the cosine of the few shared cells towards 0 and a real local
conflict goes unsuppressed; per cell, it is caught where it happens and every other cell keeps
exactly the plain sum. The guarantee is then per feature block, not on the parameter update: as in
MGDA-UB, ``d . g_i >= 0`` in feature space does not carry through the trunk's Jacobian to the
parameters. On the tiny CooperativePnP at initialisation the features-space update still opposed the
prediction gradient of the shared parameters (as the plain sum does) where the parameters-space
update did not. ``features`` is nonetheless the default, for cost: on the default model and grid
(config/config.yaml, batch 4, one torch thread) issue 15 measured the parameters space at 1.54-1.77x
a summed step and the features space at 1.12-1.14x, inside the 1.3x goal; rerun
``benchmarks/bench_balancers.py`` for the current ratios. ``magnitude_balancing=False`` skips step 2
(an implicit task reweighting; the effective weights are logged as ``weight/<task>``).

Why per block rather than one flattened vector: conflict is typically local (e.g. the last shared
layers feeding two heads, or the cells both heads read) while most of the trunk agrees; a global
projection would also bend the agreeing blocks, and one conflicting block could flip the global
cosine for all of them.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from turbotrain.utils.errors import ConfigError

from .base import GradientCombinationBalancer
from .features import FEATURE_GRANULARITIES, feature_block_ids
from .surgery import project_conflicts

PARAMETER_GRANULARITIES = ("tensor", "global")
DEFAULT_GRANULARITY = {"parameters": "tensor", "features": "cell"}


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


def suppression_weights(gramians: Tensor, magnitude_balancing: bool = True) -> tuple[Tensor, Tensor]:
    """Per-block coefficients ``(B, K)`` on the original task gradients, and the severities.

    Without ``magnitude_balancing`` step 2 is skipped (every scale 1): only the projection acts."""
    severity = conflict_severity(gramians)
    scales = balancing_scales(gramians, severity) if magnitude_balancing else torch.ones_like(gramians[:, 0])
    scaled_gramians = gramians * scales[:, :, None] * scales[:, None, :]
    num_tasks = gramians.shape[1]
    fixed_order = [list(range(num_tasks))] * num_tasks
    return project_conflicts(scaled_gramians, fixed_order) * scales, severity


def parameter_block_ids(
    param_sizes: Sequence[int], granularity: str, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Block index of every flat shared-gradient element (one block per tensor, or one in all), and
    the number of elements per block."""
    sizes = torch.tensor(list(param_sizes) if granularity == "tensor" else [sum(param_sizes)], device=device)
    return torch.repeat_interleave(torch.arange(len(sizes), device=device), sizes), sizes


def suppress_blocks(
    jacobian: Tensor, block_ids: Tensor, block_sizes: Tensor, magnitude_balancing: bool = True
) -> tuple[Tensor, Tensor, float]:
    """Apply the rule block by block to the ``(K, N)`` task gradients; ``block_sizes`` counts the
    elements of each block.

    Returns the flat combined gradient, the per-task coefficients averaged over elements (for the
    logs) and the fraction of elements lying in a block with a conflict.
    """
    gramians = block_gramians(jacobian, block_ids, len(block_sizes))
    weights, severity = suppression_weights(gramians, magnitude_balancing)
    # index_select on the contiguous (K, blocks) transpose: 4x faster than gathering (N, K) rows.
    combined = (weights.T.contiguous().index_select(1, block_ids) * jacobian).sum(dim=0)
    numel = block_sizes.to(jacobian.dtype)
    mean_weights = (weights * numel[:, None]).sum(dim=0) / numel.sum()
    conflict_fraction = (numel * (severity > 0)).sum() / numel.sum()
    return combined, mean_weights, conflict_fraction.item()


class TurboTrainBalancer(GradientCombinationBalancer):
    """Block-wise gradient-conflict suppression (rule and spaces in the module docstring)."""

    def __init__(
        self,
        task_names: Sequence[str],
        space: str = "features",
        granularity: str | None = None,
        trailing_fraction: float = 1.0,
        magnitude_balancing: bool = True,
        diagnostics: bool = False,
    ):
        super().__init__(task_names, space, diagnostics)
        granularity = DEFAULT_GRANULARITY[space] if granularity is None else granularity
        allowed = PARAMETER_GRANULARITIES if space == "parameters" else FEATURE_GRANULARITIES
        if granularity not in allowed:
            raise ConfigError(
                f"turbotrain granularity in {space} space must be one of {allowed}, got {granularity!r}"
            )
        if not 0 < trailing_fraction <= 1:
            raise ConfigError(f"turbotrain trailing_fraction must be in (0, 1], got {trailing_fraction}")
        if space == "features" and trailing_fraction != 1:
            raise ConfigError("turbotrain trailing_fraction applies to the parameters space only")
        self.granularity = granularity
        self.trailing_fraction = float(trailing_fraction)
        self.magnitude_balancing = bool(magnitude_balancing)
        self._block_ids_cache: dict[tuple, tuple[Tensor, Tensor]] = {}

    def split_shared(self, shared_params: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Leading parameters (plain sum) and the trailing ``trailing_fraction`` of them (balanced)."""
        target = self.trailing_fraction * sum(p.numel() for p in shared_params)
        start, covered = len(shared_params), 0
        while start > 0 and covered < target:
            start -= 1
            covered += shared_params[start].numel()
        return shared_params[:start], shared_params[start:]

    def blocks(self, key: tuple, device: torch.device) -> tuple[Tensor, Tensor]:
        """Block index of every flat gradient element and the block sizes, for the parameter sizes
        or the feature shapes in ``key`` (cached: that layout does not change during a run)."""
        cache_key = (key, str(device))
        if cache_key not in self._block_ids_cache:
            build = feature_block_ids if self.space == "features" else parameter_block_ids
            self._block_ids_cache[cache_key] = build(key, self.granularity, device)
        return self._block_ids_cache[cache_key]

    def combine(
        self, jacobian: Tensor, gramian: Tensor, layout: tuple
    ) -> tuple[Tensor, Tensor, dict[str, float]]:
        ids, sizes = self.blocks(tuple(layout), jacobian.device)
        combined, mean_weights, conflict_fraction = suppress_blocks(jacobian, ids, sizes, self.magnitude_balancing)
        return combined, mean_weights, {"conflict_fraction": conflict_fraction}
