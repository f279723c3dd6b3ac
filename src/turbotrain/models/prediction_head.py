"""Multi-modal motion prediction for query boxes from the fused BEV features.

For each query (GT boxes in training, detections at test time) the head samples, at the box's
current centre, the per-step fused maps ``(B, T, C, H, W)`` and the temporally fused map
``(B, C, H, W)`` (bilinear ``grid_sample``). A GRU runs over the T step features (the object's
history as the model sees it, no GT history is used), and its last state, the fused feature and a
box embedding give K trajectories of F steps plus K mode logits. Offsets are predicted in the box's
heading frame and rotated into the ego frame, so a turned scene gives turned trajectories.

Loss: winner-take-all. The winning mode has the smallest ADE over the valid future steps; its
offsets get a SmoothL1 loss and the mode logits a cross-entropy towards it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from turbotrain.grid import Grid
from turbotrain.models.registry import PREDICTION_HEADS

BOX_FEATURES = 5  # log l, log w, log h, sin yaw, cos yaw


def sample_bev(maps: torch.Tensor, xy: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Bilinear features of ``maps (N, C, H, W)`` at ego-frame points ``xy (N, Q, 2)`` -> (N, Q, C).

    Points off the map read zeros.
    """
    r = grid.point_cloud_range
    u = 2 * (xy[..., 0] - r[0]) / (r[3] - r[0]) - 1
    v = 2 * (xy[..., 1] - r[1]) / (r[4] - r[1]) - 1
    # Sample in at least float32: half-precision coordinates would shift points by a fraction of a cell.
    work_dtype = torch.promote_types(maps.dtype, torch.float32)
    sample_grid = torch.stack([u, v], dim=-1)[:, :, None, :].to(work_dtype)  # (N, Q, 1, 2)
    sampled = F.grid_sample(maps.to(work_dtype), sample_grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return sampled[..., 0].transpose(1, 2).to(maps.dtype)


def rotate_xy(offsets: torch.Tensor, yaw: torch.Tensor) -> torch.Tensor:
    """Rotate ``offsets (..., 2)`` by ``yaw`` broadcast over the leading dims."""
    c, s = torch.cos(yaw), torch.sin(yaw)
    x, y = offsets[..., 0], offsets[..., 1]
    return torch.stack([c * x - s * y, s * x + c * y], dim=-1)


def box_features(boxes: torch.Tensor, classes: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, Q, 5 + num_classes) size/heading features and a one-hot class of query boxes."""
    yaw = boxes[..., 6]
    geometry = torch.cat(
        [torch.log(boxes[..., 3:6].clamp_min(1e-3)), torch.sin(yaw)[..., None], torch.cos(yaw)[..., None]], dim=-1
    )
    one_hot = F.one_hot(classes.clamp(0, num_classes - 1), num_classes).to(boxes.dtype)
    return torch.cat([geometry, one_hot], dim=-1)


@PREDICTION_HEADS.register("multimodal")
class MultiModalTrajectoryHead(nn.Module):
    """K-mode trajectory decoder for query boxes; see the module docstring."""

    def __init__(
        self,
        in_channels: int,
        grid: Grid,
        num_classes: int,
        future: int,
        modes: int = 6,
        hidden: int = 128,
        classification_weight: float = 1.0,
    ):
        super().__init__()
        self.grid = grid
        self.num_classes = num_classes
        self.future = future
        self.modes = modes
        self.classification_weight = classification_weight
        self.history_gru = nn.GRU(in_channels, hidden, batch_first=True)
        self.box_encoder = nn.Sequential(nn.Linear(BOX_FEATURES + num_classes, hidden), nn.ReLU(inplace=True))
        self.fused_encoder = nn.Sequential(nn.Linear(in_channels, hidden), nn.ReLU(inplace=True))
        self.trunk = nn.Sequential(nn.Linear(3 * hidden, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, hidden), nn.ReLU(inplace=True))
        self.trajectory = nn.Linear(hidden, modes * future * 2)
        self.mode_logits = nn.Linear(hidden, modes)

    def forward(
        self, step_bev: torch.Tensor, bev: torch.Tensor, boxes: torch.Tensor, classes: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """``trajectories (B, Q, K, F, 2)`` ego-frame offsets from the box centre and ``logits (B, Q, K)``."""
        B, T, C, H, W = step_bev.shape
        Q = boxes.shape[1]
        centres = boxes[..., :2]
        step_features = sample_bev(step_bev.reshape(B * T, C, H, W), centres.repeat_interleave(T, dim=0), self.grid)
        step_features = step_features.view(B, T, Q, C).transpose(1, 2).reshape(B * Q, T, C)
        _, history_state = self.history_gru(step_features)
        embedding = torch.cat(
            [
                history_state[-1].view(B, Q, -1),
                self.fused_encoder(sample_bev(bev, centres, self.grid)),
                self.box_encoder(box_features(boxes, classes, self.num_classes)),
            ],
            dim=-1,
        )
        hidden = self.trunk(embedding)
        local = self.trajectory(hidden).view(B, Q, self.modes, self.future, 2)
        trajectories = rotate_xy(local, boxes[..., 6][..., None, None])
        return {"trajectories": trajectories, "logits": self.mode_logits(hidden)}

    def loss(
        self, outputs: dict, boxes: torch.Tensor, box_mask: torch.Tensor, future: torch.Tensor, future_valid: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Winner-take-all ``regression`` (SmoothL1) and ``classification`` (CE) terms and ``total``."""
        target = future[..., :2] - boxes[..., None, :2]  # (B, Q, F, 2) offsets from the current centre
        valid = future_valid & box_mask[..., None]  # (B, Q, F)
        has_future = valid.any(dim=-1)
        pred = outputs["trajectories"]
        step_valid = valid[:, :, None, :].to(pred.dtype)  # (B, Q, 1, F)
        displacement = torch.linalg.vector_norm(pred - target[:, :, None], dim=-1)  # (B, Q, K, F)
        ade = (displacement * step_valid).sum(-1) / step_valid.sum(-1).clamp_min(1)
        winner = ade.detach().argmin(dim=-1)  # (B, Q)
        best = pred.gather(2, winner[..., None, None, None].expand(-1, -1, 1, *pred.shape[3:]))[:, :, 0]
        smooth = F.smooth_l1_loss(best, target, reduction="none").sum(-1)  # (B, Q, F)
        regression = (smooth * valid).sum() / valid.sum().clamp_min(1)
        ce = F.cross_entropy(outputs["logits"].transpose(1, 2), winner, reduction="none")  # (B, Q)
        classification = (ce * has_future).sum() / has_future.sum().clamp_min(1)
        total = regression + self.classification_weight * classification
        return {"regression": regression, "classification": classification, "total": total}
