"""Point cloud -> voxels on a :class:`~turbotrain.grid.Grid`, with spconv or a plain numpy reference.

Both backends follow spconv's CPU semantics, so they produce the same voxels:

* points outside ``grid.point_cloud_range`` (and non-finite points) are dropped;
* voxels are created in order of their first point in the input, and once ``max_voxels`` exist the
  points of any further voxel are dropped;
* a voxel keeps its first ``max_points_per_voxel`` points in input order, zero-padded.

Only the order of the returned voxels may differ between implementations; :func:`sort_voxels` puts
them in a canonical order (ascending linear index ``(z * ny + y) * nx + x``).
"""
from __future__ import annotations

from typing import Literal

import numpy as np

from turbotrain.grid import Grid

Backend = Literal["auto", "spconv", "numpy"]
VoxelTriple = tuple[np.ndarray, np.ndarray, np.ndarray]


def spconv_available() -> bool:
    """True when ``spconv.pytorch.utils.PointToVoxel`` can be imported."""
    try:
        from spconv.pytorch.utils import PointToVoxel  # noqa: F401
    except ImportError:
        return False
    return True


class Voxelizer:
    """``__call__(points (N, 4) float32) -> (voxels (V, P, 4), coords (V, 3) int32 z,y,x, num_points (V,) int32)``."""

    def __init__(self, grid: Grid, max_points_per_voxel: int, max_voxels: int, backend: Backend = "auto"):
        if max_points_per_voxel < 1 or max_voxels < 1:
            raise ValueError(f"max_points_per_voxel and max_voxels must be >= 1, got {max_points_per_voxel}, {max_voxels}")
        if backend not in ("auto", "spconv", "numpy"):
            raise ValueError(f"unknown voxeliser backend {backend!r}; expected auto, spconv or numpy")
        if backend == "spconv" and not spconv_available():
            raise ImportError("backend='spconv' needs the spconv package (pip install spconv, or spconv-cu121 and the like on CUDA)")
        self.grid = grid
        self.max_points_per_voxel = int(max_points_per_voxel)
        self.max_voxels = int(max_voxels)
        self.backend = ("spconv" if spconv_available() else "numpy") if backend == "auto" else backend
        # spconv allocates a dense hash table of the whole grid: build it on first use, so that a
        # Voxelizer stays cheap to construct and to send to DataLoader worker processes.
        self._spconv_generator = None

    def __call__(self, points: np.ndarray) -> VoxelTriple:
        points = _checked_points(points)
        if self.backend == "spconv":
            return self._voxelize_spconv(points)
        return voxelize_numpy(points, self.grid, self.max_points_per_voxel, self.max_voxels)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_spconv_generator"] = None
        return state

    def _voxelize_spconv(self, points: np.ndarray) -> VoxelTriple:
        import torch

        if self._spconv_generator is None:
            from spconv.pytorch.utils import PointToVoxel

            self._spconv_generator = PointToVoxel(
                vsize_xyz=list(self.grid.voxel_size),
                coors_range_xyz=list(self.grid.point_cloud_range),
                num_point_features=points.shape[1],
                max_num_voxels=self.max_voxels,
                max_num_points_per_voxel=self.max_points_per_voxel,
            )
        voxels, coords, num_points = self._spconv_generator(torch.from_numpy(points))
        # The generator returns views of its reusable buffers: copy before the next call overwrites them.
        return voxels.numpy().copy(), coords.numpy().astype(np.int32), num_points.numpy().astype(np.int32)


def voxelize_numpy(points: np.ndarray, grid: Grid, max_points_per_voxel: int, max_voxels: int) -> VoxelTriple:
    """Reference voxeliser (np.unique on the linear voxel index); see the module docstring for the rules."""
    nx, ny, nz = grid.grid_size
    ijk = _voxel_indices(points, grid)
    inside = np.all((ijk >= 0) & (ijk < np.array([nx, ny, nz])), axis=1)
    points, ijk = points[inside], ijk[inside]
    linear = (ijk[:, 2] * ny + ijk[:, 1]) * nx + ijk[:, 0]
    unique_linear, first_point, point_unique = np.unique(linear, return_index=True, return_inverse=True)
    # Number voxels by first appearance (spconv's order), so truncation keeps the same voxels.
    kept_unique = np.argsort(first_point, kind="stable")[:max_voxels]
    voxel_of_unique = np.full(len(unique_linear), -1, np.int64)
    voxel_of_unique[kept_unique] = np.arange(len(kept_unique))
    point_voxel = voxel_of_unique[point_unique.reshape(-1)]
    keep = point_voxel >= 0
    points, point_voxel = points[keep], point_voxel[keep]
    slot = _rank_within_group(point_voxel, len(kept_unique))
    fits = slot < max_points_per_voxel
    voxels = np.zeros((len(kept_unique), max_points_per_voxel, points.shape[1]), np.float32)
    voxels[point_voxel[fits], slot[fits]] = points[fits]
    counts = np.bincount(point_voxel, minlength=len(kept_unique))
    num_points = np.minimum(counts, max_points_per_voxel).astype(np.int32)
    return voxels, _linear_to_zyx(unique_linear[kept_unique], nx, ny), num_points


def sort_voxels(voxels: np.ndarray, coords: np.ndarray, num_points: np.ndarray, grid: Grid) -> VoxelTriple:
    """The same voxels in canonical order: ascending linear index of ``coords`` (z, y, x)."""
    nx, ny, _ = grid.grid_size
    linear = (coords[:, 0].astype(np.int64) * ny + coords[:, 1]) * nx + coords[:, 2]
    order = np.argsort(linear, kind="stable")
    return voxels[order], coords[order], num_points[order]


def _checked_points(points: np.ndarray) -> np.ndarray:
    points = np.asarray(points)
    if points.ndim != 2 or points.shape[1] < 3:
        raise ValueError(f"points must be (N, >=3), got shape {points.shape}")
    points = np.ascontiguousarray(points, dtype=np.float32)
    return points[np.isfinite(points).all(axis=1)]


def _voxel_indices(points: np.ndarray, grid: Grid) -> np.ndarray:
    # float32 arithmetic as in spconv's kernel, so points near a voxel border fall on the same side.
    low = np.asarray(grid.point_cloud_range[:3], np.float32)
    size = np.asarray(grid.voxel_size, np.float32)
    return np.floor((points[:, :3] - low) / size).astype(np.int64)


def _rank_within_group(group: np.ndarray, n_groups: int) -> np.ndarray:
    """Position of each element among the elements of its group, in input order."""
    order = np.argsort(group, kind="stable")
    counts = np.bincount(group, minlength=n_groups)
    starts = np.cumsum(counts) - counts
    rank = np.empty(len(group), np.int64)
    rank[order] = np.arange(len(group)) - np.repeat(starts, counts)
    return rank


def _linear_to_zyx(linear: np.ndarray, nx: int, ny: int) -> np.ndarray:
    x = linear % nx
    y = (linear // nx) % ny
    z = linear // (nx * ny)
    return np.stack([z, y, x], axis=1).astype(np.int32)
