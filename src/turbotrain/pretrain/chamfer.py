"""Chamfer distance over padded point sets, vectorised in PyTorch, with CooPre's choices as options.

No pip-installable Linux wheel of pytorch3d exists and chamferdist needs a compiler; for CooPre's
20 predicted x 64 target points per cell a padded ``torch.cdist`` is small and fast enough.

CooPre's release (ucla-mobility/CooPre ``opencood/loss/chamfer_loss.py``, ``MaskChamferDistance``
with ``mode='l1'``, ``reduction='mean'``) and our earlier loss differ on three points, each an option
of :class:`ChamferOptions` (``pretrain.chamfer``):

* ``distance``: ``l1`` = the Manhattan distance ``sum_d |p_d - q_d|`` (CooPre: ``l1_loss(...).sum(-1)``),
  ``squared`` = squared Euclidean (pytorch3d's default).
* ``units``: ``voxel`` = coordinates divided by the voxel size per axis before the distance (CooPre
  decodes and targets points in voxel units, so with its 0.1 x 0.1 x 0.2 m voxels an x/y error weighs
  twice a z error), ``metre`` = as they are.
* ``reduction``: ``per_point`` = prediction -> target averaged over every predicted point of the
  batch plus target -> prediction averaged over every valid target point of the batch (CooPre: dense
  cells count more), ``per_cell`` = each cell's two means, then the mean over cells.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

DISTANCES, UNITS, REDUCTIONS = ("l1", "squared"), ("voxel", "metre"), ("per_point", "per_cell")


@dataclass(frozen=True)
class ChamferOptions:
    distance: str = "l1"
    units: str = "voxel"
    reduction: str = "per_point"

    def __post_init__(self):
        for name, allowed in (("distance", DISTANCES), ("units", UNITS), ("reduction", REDUCTIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"chamfer {name} must be one of {allowed}, got {getattr(self, name)!r}")


def nearest_distances(pred: torch.Tensor, pred_mask: torch.Tensor, target: torch.Tensor, target_mask: torch.Tensor,
                      distance: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pred -> nearest valid target (N, K), target -> nearest valid prediction (N, M))``; entries
    of sets with nothing on the other side are +inf-free placeholders (masked out by the callers)."""
    if distance == "l1":
        d = torch.cdist(pred, target, p=1.0)
    else:
        d = torch.cdist(pred, target, compute_mode="donot_use_mm_for_euclid_dist").square()
    big = torch.finfo(d.dtype).max
    d = d.masked_fill(~(pred_mask[:, :, None] & target_mask[:, None, :]), big)
    return d.min(dim=2).values, d.min(dim=1).values


def chamfer_distance(pred: torch.Tensor, pred_mask: torch.Tensor | None, target: torch.Tensor,
                     target_mask: torch.Tensor, squared: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric Chamfer distance per set (the ``per_cell`` terms).

    ``pred`` (N, K, D) with ``pred_mask`` (N, K) (None = all valid), ``target`` (N, M, D) with
    ``target_mask`` (N, M). For each set: mean over valid predictions of the distance to the nearest
    valid target, plus mean over valid targets of the distance to the nearest valid prediction
    (squared Euclidean, or Manhattan with ``squared=False``). Returns ``(distance (N,), valid (N,))``;
    a set with no valid prediction or no valid target has distance 0 and ``valid = False``.
    """
    pred_mask = _all_valid(pred) if pred_mask is None else pred_mask
    to_target, to_pred = nearest_distances(pred, pred_mask, target, target_mask, "squared" if squared else "l1")
    n_pred, n_target = pred_mask.sum(1), target_mask.sum(1)
    valid = (n_pred > 0) & (n_target > 0)
    term_a = torch.where(pred_mask & valid[:, None], to_target, torch.zeros_like(to_target)).sum(1)
    term_b = torch.where(target_mask & valid[:, None], to_pred, torch.zeros_like(to_pred)).sum(1)
    return term_a / n_pred.clamp(min=1) + term_b / n_target.clamp(min=1), valid


def chamfer_loss(pred, pred_mask, target, target_mask, options: ChamferOptions = ChamferOptions(),
                 voxel_size: Sequence[float] | None = None) -> torch.Tensor:
    """The reconstruction loss over a batch of cells (0 if no cell has points on both sides).

    ``voxel_size`` (per axis, metres) is needed for ``units="voxel"``.
    """
    if options.units == "voxel":
        if voxel_size is None:
            raise ValueError("chamfer units 'voxel' need the voxel size")
        scale = torch.as_tensor(voxel_size, dtype=pred.dtype, device=pred.device)
        pred, target = pred / scale, target / scale
    pred_mask = _all_valid(pred) if pred_mask is None else pred_mask
    if options.reduction == "per_cell":
        distance, valid = chamfer_distance(pred, pred_mask, target, target_mask, options.distance == "squared")
        return distance[valid].mean() if bool(valid.any()) else pred.sum() * 0.0
    valid = (pred_mask.sum(1) > 0) & (target_mask.sum(1) > 0)
    if not bool(valid.any()):
        return pred.sum() * 0.0
    to_target, to_pred = nearest_distances(pred, pred_mask, target, target_mask, options.distance)
    pred_used, target_used = pred_mask & valid[:, None], target_mask & valid[:, None]
    return to_target[pred_used].mean() + to_pred[target_used].mean()


def _all_valid(points: torch.Tensor) -> torch.Tensor:
    return torch.ones(points.shape[:2], dtype=torch.bool, device=points.device)
