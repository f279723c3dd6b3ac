"""The voxel and BEV grids shared by the data loader, the encoders, masking and the heads."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Grid:
    """``point_cloud_range = [x_min, y_min, z_min, x_max, y_max, z_max]`` (m), ``voxel_size = [dx, dy, dz]``.

    The encoder reduces the voxel grid by ``bev_stride`` in x and y; the BEV map has ``bev_shape``
    = (rows along y, columns along x) and cells of ``bev_cell`` metres. BEV row 0 is y_min and column
    0 is x_min, matching voxel coords ``(z, y, x)``.
    """

    point_cloud_range: tuple[float, float, float, float, float, float]
    voxel_size: tuple[float, float, float]
    bev_stride: int = 1

    def __post_init__(self):
        size = self.grid_size
        if any(s <= 0 for s in size):
            raise ValueError(f"empty voxel grid {size} for range {self.point_cloud_range}")
        if size[0] % self.bev_stride or size[1] % self.bev_stride:
            raise ValueError(f"voxel grid {size[:2]} is not divisible by bev_stride {self.bev_stride}")

    @property
    def grid_size(self) -> tuple[int, int, int]:
        """(nx, ny, nz) voxels."""
        r, v = np.asarray(self.point_cloud_range), np.asarray(self.voxel_size)
        n = np.round((r[3:] - r[:3]) / v).astype(int)
        return int(n[0]), int(n[1]), int(n[2])

    @property
    def bev_shape(self) -> tuple[int, int]:
        nx, ny, _ = self.grid_size
        return ny // self.bev_stride, nx // self.bev_stride

    @property
    def bev_cell(self) -> tuple[float, float]:
        """(cell size along x, along y) in metres."""
        return self.voxel_size[0] * self.bev_stride, self.voxel_size[1] * self.bev_stride

    def bev_cell_of(self, xy: np.ndarray) -> np.ndarray:
        """(N, 2) integer (row, col) BEV cell of ego-frame points; may fall outside the map."""
        cx, cy = self.bev_cell
        col = np.floor((xy[:, 0] - self.point_cloud_range[0]) / cx).astype(np.int64)
        row = np.floor((xy[:, 1] - self.point_cloud_range[1]) / cy).astype(np.int64)
        return np.stack([row, col], axis=1)

    def bev_cell_centers(self) -> tuple[np.ndarray, np.ndarray]:
        """x (cols,) and y (rows,) coordinates of BEV cell centres."""
        rows, cols = self.bev_shape
        cx, cy = self.bev_cell
        xs = self.point_cloud_range[0] + (np.arange(cols) + 0.5) * cx
        ys = self.point_cloud_range[1] + (np.arange(rows) + 0.5) * cy
        return xs, ys

    def contains(self, points: np.ndarray) -> np.ndarray:
        r = self.point_cloud_range
        return (
            (points[:, 0] >= r[0]) & (points[:, 0] < r[3])
            & (points[:, 1] >= r[1]) & (points[:, 1] < r[4])
            & (points[:, 2] >= r[2]) & (points[:, 2] < r[5])
        )

    @classmethod
    def from_config(cls, cfg: dict) -> "Grid":
        return cls(tuple(cfg["point_cloud_range"]), tuple(cfg["voxel_size"]), int(cfg.get("bev_stride", 1)))
