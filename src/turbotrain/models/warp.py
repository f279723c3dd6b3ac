"""Warp agent-frame BEV maps into the ego frame with the 2D rigid part of ``pose_to_ego``.

Every agent-frame's BEV map covers the same metric range as the ego's (``grid.point_cloud_range``)
but in the agent's own sensor frame. For each ego output cell we find where it lies in the agent
frame (``T^-1``) and sample there with ``F.grid_sample``. Normalised coordinates use
``align_corners=False``: -1/+1 are the outer *edges* of the first/last cell, so a metric point
``x`` maps to ``2 (x - x_min) / (x_max - x_min) - 1`` and cell centres land on cell centres.
BEV row 0 is ``y_min`` and column 0 is ``x_min`` (see :class:`Grid`), so grid_sample's x is metric
x and its y is metric y, with no flip.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from turbotrain.grid import Grid


def planar_rigid(pose_to_ego: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(R (N,2,2), t (N,2))``: the yaw-only rotation and xy translation of 4x4 poses.

    Roll and pitch are dropped (BEV maps are planar); the rotation is rebuilt from the yaw so it stays
    orthonormal even when the 3D pose is tilted.
    """
    yaw = torch.atan2(pose_to_ego[:, 1, 0], pose_to_ego[:, 0, 0])
    c, s = torch.cos(yaw), torch.sin(yaw)
    rotation = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    return rotation, pose_to_ego[:, :2, 3]


def map_extent(grid: Grid, height: int | None = None, width: int | None = None) -> tuple[float, float, float, float]:
    """``(x_min, y_min, x_max, y_max)`` of a BEV map of ``height x width`` cells of ``grid.bev_cell``
    starting at the grid's corner: the grid's range, or beyond it for a map zero-padded bottom/right
    (a backbone scale of a map whose size its total stride does not divide)."""
    r = grid.point_cloud_range
    if height is None and width is None:
        return (r[0], r[1], r[3], r[4])
    cell_x, cell_y = grid.bev_cell
    return (r[0], r[1], r[0] + cell_x * width, r[1] + cell_y * height)


def ego_to_agent_theta(pose_to_ego: torch.Tensor, grid: Grid, extent: tuple[float, float, float, float] | None = None) -> torch.Tensor:
    """(N, 2, 3) ``affine_grid`` matrices mapping ego-map normalised coords to agent-map ones.

    With ``x = S u + c`` (S = half extent, c = range centre) and ``p_agent = R^T (p_ego - t)``:
    ``u_agent = S^-1 R^T S u_ego + S^-1 (R^T (c - t) - c)``.
    """
    rotation, translation = planar_rigid(pose_to_ego.to(torch.float64))
    x_min, y_min, x_max, y_max = extent or map_extent(grid)
    half = torch.tensor([(x_max - x_min) / 2, (y_max - y_min) / 2], dtype=torch.float64, device=pose_to_ego.device)
    centre = torch.tensor([(x_max + x_min) / 2, (y_max + y_min) / 2], dtype=torch.float64, device=pose_to_ego.device)
    rot_t = rotation.transpose(1, 2)
    linear = rot_t * half[None, None, :] / half[None, :, None]
    offset = (torch.einsum("nij,nj->ni", rot_t, centre[None] - translation) - centre) / half
    return torch.cat([linear, offset[:, :, None]], dim=2)


def warp_to_ego(features: torch.Tensor, pose_to_ego: torch.Tensor, grid: Grid,
                extent: tuple[float, float, float, float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Warp ``features (N, C, H, W)`` (agent frames, covering ``extent``, default the grid's range,
    at any resolution) into the ego frame.

    Returns the warped maps and a ``(N, 1, H, W)`` bool mask of ego cells whose source lies inside
    the agent's map; outside cells are zero.
    """
    # Half-precision sampling coordinates would misplace cells by a large fraction of a cell on
    # wide maps, so sample in at least float32 and cast the result back.
    work_dtype = torch.promote_types(features.dtype, torch.float32)
    theta = ego_to_agent_theta(pose_to_ego, grid, extent).to(work_dtype)
    sample_grid = F.affine_grid(theta, list(features.shape), align_corners=False)
    warped = F.grid_sample(features.to(work_dtype), sample_grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    valid = (sample_grid.abs() <= 1.0).all(dim=-1)[:, None]
    return (warped * valid).to(features.dtype), valid
