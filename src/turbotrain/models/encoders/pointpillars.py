"""PointPillars (Lang et al. 2019): pillar feature net + scatter onto the BEV canvas."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from turbotrain.grid import Grid
from turbotrain.models.encoders.base import VoxelEncoder
from turbotrain.models.encoders.vfe import PillarVFE
from turbotrain.models.registry import ENCODERS

PILLAR_CHANNELS = {"tiny": 32, "paper": 64}  # paper / OpenCOOD: one 64-channel PFN layer


class PointPillarsEncoder(VoxelEncoder):
    """Pillars (voxels one cell tall) -> PointNet feature per pillar -> dense BEV canvas.

    With ``grid.bev_stride > 1`` the canvas is max-pooled to the BEV grid: pillar features are
    non-negative (ReLU) and empty cells are zero, so the pool is a max over the pillars of a BEV cell
    and an empty frame stays exactly zero; it adds no parameters.
    """

    def __init__(self, grid: Grid, size: str = "tiny", in_channels: int = 4):
        super().__init__(grid)
        if grid.grid_size[2] != 1:
            raise ValueError(
                f"PointPillars needs one voxel in z (pillars), but grid {grid.grid_size} has {grid.grid_size[2]}; "
                f"set voxel_size[2] to the z extent of point_cloud_range"
            )
        if size not in PILLAR_CHANNELS:
            raise ValueError(f"unknown PointPillars size {size!r}; expected one of {sorted(PILLAR_CHANNELS)}")
        self.out_channels = PILLAR_CHANNELS[size]
        self.vfe = PillarVFE(grid, self.out_channels, in_channels)

    def voxel_features(self, voxels: Tensor, num_points: Tensor) -> Tensor:
        return self.vfe(voxels, num_points)

    def forward_features(self, features: Tensor, coords: Tensor, num_frames: int) -> Tensor:
        self.check_coords(coords, num_frames)
        nx, ny, _ = self.grid.grid_size
        canvas = features.new_zeros(num_frames, ny, nx, features.shape[1])
        idx = coords.long()
        canvas = canvas.index_put((idx[:, 0], idx[:, 2], idx[:, 3]), features).permute(0, 3, 1, 2)
        stride = self.grid.bev_stride
        return F.max_pool2d(canvas, stride, stride) if stride > 1 else canvas.contiguous()


ENCODERS.register("pointpillars")(PointPillarsEncoder)
