"""BEV-guided masking on the fused multi-agent view (CooPre), extended over time (TurboTrain).

The BEV grid is the encoder's BEV grid *in the ego frame*: every voxel of every agent-frame is placed
in the ego cell its centre falls into (through ``pose_to_ego``), so a masked cell hides the points of
all agents there. A share ``mask_ratio`` of the non-empty cells is masked:

* ``shared``: cells are drawn once per sample over the union of non-empty cells of all steps, and
  the same cell is masked at every step (the model cannot copy a cell from its own history);
* ``independent``: drawn per (sample, step), so history can reveal what the present hides.

Masked voxels keep their coordinates (so occupancy still reaches the encoder, as in CooPre: a
documented design choice) but their features are replaced by a learnable token (see
:mod:`turbotrain.pretrain.objective`), and their points by a content-free placeholder
(:func:`conceal_masked_voxels`) before any layer sees them.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from turbotrain.data.sample import Batch
from turbotrain.grid import Grid


@dataclass
class MaskPlan:
    voxel_masked: torch.Tensor  # (V,) bool
    cells: torch.Tensor  # (N, 4) int64: sample, step, row, col of masked non-empty cells
    nonempty_cells: int  # number of (sample, step, cell) triples with at least one voxel
    target: torch.Tensor  # (N, cap, 3) target points relative to the cell centre (ego frame)
    target_mask: torch.Tensor  # (N, cap) bool
    num_steps: int  # masked steps: the last ``num_steps`` of the batch; cell step num_steps - 1 = present


class BevCellIndexer:
    """Maps voxels and points of agent-frames to (sample, step, row, col) cells of the ego BEV grid."""

    def __init__(self, grid: Grid, num_steps: int):
        self.grid = grid
        self.num_steps = num_steps
        self.rows, self.cols = grid.bev_shape
        self.cell = grid.bev_cell

    def voxel_centres(self, coords: torch.Tensor) -> torch.Tensor:
        """(V, 3) xyz centres in each voxel's own sensor frame from (frame, z, y, x) coords."""
        r = self.grid.point_cloud_range
        vs = torch.tensor(self.grid.voxel_size, dtype=torch.float32, device=coords.device)
        lo = torch.tensor(r[:3], dtype=torch.float32, device=coords.device)
        zyx = coords[:, 1:].float()
        return lo + (zyx.flip(1) + 0.5) * vs

    def keys(self, xyz_own: torch.Tensor, frame: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Linear cell key per point (-1 if outside the ego BEV grid)."""
        pose = batch.frame_pose_to_ego[frame]
        ego = torch.einsum("nij,nj->ni", pose[:, :3, :3], xyz_own) + pose[:, :3, 3]
        col = torch.floor((ego[:, 0] - self.grid.point_cloud_range[0]) / self.cell[0]).long()
        row = torch.floor((ego[:, 1] - self.grid.point_cloud_range[1]) / self.cell[1]).long()
        inside = (row >= 0) & (row < self.rows) & (col >= 0) & (col < self.cols)
        sample = batch.frame_sample[frame]
        step = batch.frame_step[frame] - (batch.frame_step.max() + 1 - self.num_steps)
        inside &= step >= 0
        key = ((sample * self.num_steps + step) * self.rows + row) * self.cols + col
        return torch.where(inside, key, torch.full_like(key, -1))

    def decode(self, key: torch.Tensor) -> torch.Tensor:
        col = key % self.cols
        row = (key // self.cols) % self.rows
        step = (key // (self.cols * self.rows)) % self.num_steps
        sample = key // (self.cols * self.rows * self.num_steps)
        return torch.stack([sample, step, row, col], dim=1)

    def cell_centres(self, cells: torch.Tensor) -> torch.Tensor:
        """(N, 3) ego-frame centres (z at the middle of the range) of decoded cells."""
        r = self.grid.point_cloud_range
        x = r[0] + (cells[:, 3].float() + 0.5) * self.cell[0]
        y = r[1] + (cells[:, 2].float() + 0.5) * self.cell[1]
        z = torch.full_like(x, 0.5 * (r[2] + r[5]))
        return torch.stack([x, y, z], dim=1)


def conceal_masked_voxels(batch: Batch, grid: Grid, voxel_masked: torch.Tensor) -> Batch:
    """A copy of ``batch`` whose masked voxels hold one placeholder point at the voxel centre (intensity 0).

    Swapping the VFE output for the mask token alone is not enough: a VFE with BatchNorm
    (PointPillars' PFN) pools its training-mode statistics over *every* point, so hidden points would
    still shift the features of visible voxels. The placeholder depends on the voxel's coordinates
    only, which the encoder sees anyway.
    """
    placeholder = torch.zeros_like(batch.voxels[voxel_masked])
    placeholder[:, 0, :3] = BevCellIndexer(grid, num_steps=1).voxel_centres(batch.coords[voxel_masked])
    voxels = batch.voxels.clone()
    voxels[voxel_masked] = placeholder
    num_points = torch.where(voxel_masked, torch.ones_like(batch.num_points), batch.num_points)
    return replace(batch, voxels=voxels, num_points=num_points)


def _choose(keys: torch.Tensor, group: torch.Tensor, ratio: float, generator: torch.Generator | None) -> torch.Tensor:
    """Pick round(ratio * n_g) of the unique ``keys`` in each group ``g`` uniformly at random."""
    if len(keys) == 0:
        return keys
    score = torch.rand(len(keys), generator=generator).to(keys.device)
    order = torch.argsort(score)
    order = order[torch.argsort(group[order], stable=True)]
    sorted_group = group[order]
    _, counts = torch.unique_consecutive(sorted_group, return_counts=True)
    starts = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    rank = torch.arange(len(keys), device=keys.device) - starts
    quota = torch.repeat_interleave(torch.round(counts.double() * ratio).long(), counts)
    return keys[order[rank < quota]]


def _group_points_by_cell(keys: torch.Tensor, cap: int, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For points with cell ``keys``: (kept point index, its cell key, slot < cap), seeded subsample."""
    perm = torch.randperm(len(keys), generator=generator).to(keys.device)
    order = perm[torch.argsort(keys[perm], stable=True)]
    sorted_keys = keys[order]
    _, counts = torch.unique_consecutive(sorted_keys, return_counts=True)
    starts = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    slot = torch.arange(len(keys), device=keys.device) - starts
    keep = slot < cap
    return order[keep], sorted_keys[keep], slot[keep]


def plan_masking(
    batch: Batch,
    grid: Grid,
    num_steps: int,
    mask_ratio: float,
    temporal: str = "shared",
    max_target_points: int = 64,
    generator: torch.Generator | None = None,
) -> MaskPlan:
    """Mask ``mask_ratio`` of the non-empty ego-BEV cells of the last ``num_steps`` steps; build targets.

    ``generator=None`` draws from torch's global RNG, which the training engine checkpoints, so a
    resumed run masks exactly as an uninterrupted one.
    """
    if temporal not in ("shared", "independent"):
        raise ValueError(f"temporal masking must be 'shared' or 'independent', got {temporal!r}")
    indexer = BevCellIndexer(grid, num_steps)
    voxel_keys = indexer.keys(indexer.voxel_centres(batch.coords), batch.coords[:, 0].long(), batch)
    cells = torch.unique(voxel_keys[voxel_keys >= 0])
    decoded = indexer.decode(cells)
    if temporal == "independent":
        masked = _choose(cells, decoded[:, 0] * num_steps + decoded[:, 1], mask_ratio, generator)
    else:
        spatial = (decoded[:, 0] * indexer.rows + decoded[:, 2]) * indexer.cols + decoded[:, 3]
        spatial_unique = torch.unique(spatial)
        chosen = _choose(spatial_unique, spatial_unique // (indexer.rows * indexer.cols), mask_ratio, generator)
        masked = cells[torch.isin(spatial, chosen)]
    masked = torch.sort(masked).values
    voxel_masked = torch.isin(voxel_keys, masked) & (voxel_keys >= 0)
    target, target_mask = _targets(batch, indexer, masked, max_target_points, generator)
    return MaskPlan(voxel_masked, indexer.decode(masked), len(cells), target, target_mask, num_steps)


def _targets(batch, indexer, masked, cap, generator):
    """Real points (all agents of the batch) of each masked cell, relative to the cell centre: the
    batch's raw target points when it carries them (CooPre), else the points its voxels hold."""
    if batch.target_points is not None:
        points, frame = batch.target_points, batch.target_frame
    else:
        P = batch.voxels.shape[1]
        valid = torch.arange(P, device=batch.voxels.device)[None, :] < batch.num_points[:, None]
        points = batch.voxels[valid][:, :3]
        frame = batch.coords[:, 0].long()[:, None].expand(-1, P)[valid]
    keys = indexer.keys(points, frame, batch)
    pose = batch.frame_pose_to_ego[frame]
    ego = torch.einsum("nij,nj->ni", pose[:, :3, :3], points) + pose[:, :3, 3]
    in_masked = torch.isin(keys, masked)
    idx, point_keys, slot = _group_points_by_cell(keys[in_masked], cap, generator)
    row_of = torch.searchsorted(masked, point_keys)
    target = torch.zeros(len(masked), cap, 3, device=points.device)
    target_mask = torch.zeros(len(masked), cap, dtype=torch.bool, device=points.device)
    centres = indexer.cell_centres(indexer.decode(masked))
    target[row_of, slot] = ego[in_masked][idx] - centres[row_of]
    target_mask[row_of, slot] = True
    return target, target_mask
