"""The interface every per-agent 3D encoder implements, and the shared sparse -> BEV scatter."""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn

from turbotrain.grid import Grid


class VoxelEncoder(nn.Module, ABC):
    """Voxelised agent-frames -> BEV features ``(num_frames, out_channels, *grid.bev_shape)``.

    Split in two steps so masked pretraining can swap rows of :meth:`voxel_features` for a learnable
    mask token before :meth:`forward_features`: the encoder then never sees masked points.
    """

    out_channels: int

    def __init__(self, grid: Grid):
        super().__init__()
        self.grid = grid

    @abstractmethod
    def voxel_features(self, voxels: Tensor, num_points: Tensor) -> Tensor:
        """(V, P, C_in) zero-padded points + (V,) counts -> (V, C_vfe) per-voxel features."""

    @abstractmethod
    def forward_features(self, features: Tensor, coords: Tensor, num_frames: int) -> Tensor:
        """(V, C_vfe) features at (V, 4) coords [frame, z, y, x] -> (num_frames, out_channels, H_bev, W_bev)."""

    def forward(self, voxels: Tensor, num_points: Tensor, coords: Tensor, num_frames: int) -> Tensor:
        return self.forward_features(self.voxel_features(voxels, num_points), coords, num_frames)

    def empty_bev(self, num_frames: int, like: Tensor) -> Tensor:
        """All-zero BEV map, for batches without a single voxel."""
        rows, cols = self.grid.bev_shape
        return like.new_zeros(num_frames, self.out_channels, rows, cols)

    def check_coords(self, coords: Tensor, num_frames: int) -> None:
        """Out-of-grid coords would alias other sites in the sparse hashing, so reject them loudly."""
        if coords.ndim != 2 or coords.shape[1] != 4:
            raise ValueError(f"coords must be (V, 4) [frame, z, y, x], got shape {tuple(coords.shape)}")
        if coords.numel() == 0:
            return
        nx, ny, nz = self.grid.grid_size
        upper = torch.tensor([num_frames, nz, ny, nx], device=coords.device)
        low, high = coords.amin(dim=0), coords.amax(dim=0)
        if bool((low < 0).any()) or bool((high >= upper).any()):
            raise ValueError(
                f"coords outside [0, {upper.tolist()}) (frames, z, y, x): min {low.tolist()}, max {high.tolist()}"
            )


def scatter_to_dense(features: Tensor, indices: Tensor, spatial_shape: tuple[int, int, int], batch_size: int) -> Tensor:
    """Sparse sites -> dense ``(B, C, D, H, W)``; sites are unique, so plain assignment is exact."""
    D, H, W = spatial_shape
    dense = features.new_zeros(batch_size, D, H, W, features.shape[1])
    idx = indices.long()
    dense = dense.index_put((idx[:, 0], idx[:, 1], idx[:, 2], idx[:, 3]), features)
    return dense.permute(0, 4, 1, 2, 3)


def height_compression(dense: Tensor) -> Tensor:
    """``(B, C, D, H, W) -> (B, C*D, H, W)``, channel ``c * D + d`` as OpenPCDet's HeightCompression."""
    B, C, D, H, W = dense.shape
    return dense.reshape(B, C * D, H, W)
