"""Voxel feature encoders (VFE): the per-voxel step that turns a voxel's points into one vector."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from turbotrain.grid import Grid


def valid_point_mask(num_points: Tensor, max_points: int) -> Tensor:
    """(V, P) True for the first ``num_points[v]`` slots of each voxel."""
    slots = torch.arange(max_points, device=num_points.device)
    return slots[None, :] < num_points[:, None]


def masked_mean(points: Tensor, valid: Tensor) -> Tensor:
    """(V, P, C) points, (V, P) mask -> (V, C) mean of the valid points.

    Masks explicitly instead of trusting zero padding, so a caller who fills padding with anything
    (or a masking step that edits points) cannot shift the mean.
    """
    weights = valid.to(points.dtype).unsqueeze(-1)
    count = weights.sum(dim=1).clamp(min=1.0)
    return (points * weights).sum(dim=1) / count


class MeanVFE(nn.Module):
    """SECOND's VFE: the mean of each voxel's valid points (no parameters)."""

    def __init__(self, in_channels: int = 4):
        super().__init__()
        self.out_channels = in_channels

    def forward(self, voxels: Tensor, num_points: Tensor) -> Tensor:
        return masked_mean(voxels, valid_point_mask(num_points, voxels.shape[1]))


class PillarVFE(nn.Module):
    """PointPillars' pillar feature net: a shared Linear-BN-ReLU on augmented points, max over the pillar.

    Each point gets its raw channels, its offset to the pillar's point mean and its offset to the
    pillar's geometric centre (Lang et al. 2019, Sec. 2.1) before the PointNet layer.
    """

    def __init__(self, grid: Grid, out_channels: int, in_channels: int = 4):
        super().__init__()
        self.grid = grid
        self.out_channels = out_channels
        self.linear = nn.Linear(in_channels + 6, out_channels, bias=False)
        # OpenPCDet's BN settings for point-wise layers
        self.norm = nn.BatchNorm1d(out_channels, eps=1e-3, momentum=0.01)

    def pillar_centres(self, point_mean_xy: Tensor) -> Tensor:
        """(V, 3) geometric centre of each pillar.

        The interface hands the VFE no coords, so the pillar's cell is recovered from its points'
        mean, which (a convex combination of points inside the cell) lies inside that cell.
        """
        x_min, y_min, z_min, _, _, z_max = self.grid.point_cloud_range
        vx, vy, _ = self.grid.voxel_size
        origin = point_mean_xy.new_tensor([x_min, y_min])
        cell_size = point_mean_xy.new_tensor([vx, vy])
        cell = torch.floor((point_mean_xy - origin) / cell_size)
        centre_xy = origin + (cell + 0.5) * cell_size
        centre_z = centre_xy.new_full((len(centre_xy), 1), 0.5 * (z_min + z_max))
        return torch.cat([centre_xy, centre_z], dim=1)

    def augmented_points(self, voxels: Tensor, valid: Tensor) -> Tensor:
        """(V, P, C_in + 6): raw channels, offset to the pillar's point mean, offset to its centre."""
        xyz = voxels[..., :3]
        mean = masked_mean(xyz, valid)
        centre = self.pillar_centres(mean[:, :2])
        return torch.cat([voxels, xyz - mean[:, None, :], xyz - centre[:, None, :]], dim=-1)

    def forward(self, voxels: Tensor, num_points: Tensor) -> Tensor:
        valid = valid_point_mask(num_points, voxels.shape[1])
        points = self.augmented_points(voxels, valid)
        # Only real points enter the layer (and the BN statistics); OpenPCDet also feeds the zero
        # padding, which makes a pillar's feature depend on how much padding its batch carries.
        encoded = torch.relu(self.norm(self.linear(points[valid])))
        # ReLU outputs are >= 0 and every pillar has a point, so a zero fill leaves the max exact.
        per_slot = encoded.new_zeros(*valid.shape, self.out_channels)
        per_slot = per_slot.index_put(tuple(valid.nonzero().t()), encoded)
        return per_slot.amax(dim=1)
