"""Multi-modal motion prediction for query boxes from the fused BEV features.

For each query (GT boxes in training, detections at test time) the head samples, at the box's
current centre, the per-step fused maps ``(B, T, C, H, W)`` and the temporally fused map
``(B, C, H, W)`` (bilinear ``grid_sample``). A GRU runs over the T step features (the object's
history as the model sees it, no GT history is used), and its last state, the fused feature and a
box embedding give K trajectories of F steps plus K mode logits. Offsets are predicted in the box's
heading frame and rotated into the ego frame, so a turned scene gives turned trajectories.

Motion branch (``motion=True``, the default): from the same embedding the head first *backcasts*
where each query was at the T-1 past steps (supervised by the tracked history of the GT boxes, a
``backcast`` loss term), then encodes that track with a :class:`~turbotrain.models.motion.TrackEncoder`
and lets the queries of a scene attend to each other (:class:`~turbotrain.models.motion.AgentInteraction`).
Queries are GT boxes in training and detections at test time, and neither comes with a tracked
history, so the head estimates one itself; training and test run the same path. These two modules
read tracks only, which is what trajectory self-supervision (SmartPretrain) pretrains.

Loss: winner-take-all. The winning mode has the smallest ADE over the valid future steps; its
offsets get a SmoothL1 loss and the mode logits a cross-entropy towards it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from turbotrain.grid import Grid
from turbotrain.models.motion import AgentInteraction, TrackEncoder, rotate_xy, to_anchor_frame
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
        motion: bool = True,
        history: int = 1,
        interaction_heads: int = 4,
        backcast_weight: float = 1.0,
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
        self.motion = motion
        self.past_steps = max(int(history) - 1, 0)
        self.backcast_weight = backcast_weight
        trunk_in = 3 * hidden
        if motion:
            # a one-step history (single-frame models) has no past to estimate
            self.backcast = nn.Sequential(nn.Linear(3 * hidden, hidden), nn.ReLU(inplace=True),
                                          nn.Linear(hidden, self.past_steps * 2)) if self.past_steps else None
            self.motion_encoder = TrackEncoder(hidden)
            self.interaction = AgentInteraction(hidden, interaction_heads)
            trunk_in += hidden
        self.trunk = nn.Sequential(nn.Linear(trunk_in, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, hidden), nn.ReLU(inplace=True))
        self.trajectory = nn.Linear(hidden, modes * future * 2)
        self.mode_logits = nn.Linear(hidden, modes)

    def forward(
        self, step_bev: torch.Tensor, bev: torch.Tensor, boxes: torch.Tensor, classes: torch.Tensor,
        query_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """``trajectories (B, Q, K, F, 2)`` ego-frame offsets from the box centre, ``logits (B, Q, K)``
        and, with the motion branch, ``backcast (B, Q, T-1, 2)`` past positions in the box's heading frame.

        ``query_mask (B, Q)`` marks real queries (padding takes no part in the agents' interaction).
        """
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
        out = {}
        if self.motion:
            if T != self.past_steps + 1:
                raise ValueError(f"prediction head built for {self.past_steps + 1} history steps got {T}")
            mask = torch.ones(B, Q, dtype=torch.bool, device=boxes.device) if query_mask is None else query_mask
            past = self.backcast(embedding) if self.backcast is not None else embedding.new_zeros(B, Q, 0)
            out["backcast"] = past.view(B, Q, self.past_steps, 2)
            embedding = torch.cat([embedding, self._motion_context(out["backcast"], boxes, mask)], dim=-1)
        hidden = self.trunk(embedding)
        local = self.trajectory(hidden).view(B, Q, self.modes, self.future, 2)
        trajectories = rotate_xy(local, boxes[..., 6][..., None, None])
        return {**out, "trajectories": trajectories, "logits": self.mode_logits(hidden)}

    def _motion_context(self, backcast: torch.Tensor, boxes: torch.Tensor, query_mask: torch.Tensor) -> torch.Tensor:
        """Encode each query's backcast track (ending at its current centre), then let the queries interact.

        The track is detached: the backcast learns from its own loss, and the motion encoder reads it
        as a tracker's output, as it reads the tracks of trajectory pretraining.
        """
        B, Q = boxes.shape[:2]
        track = torch.cat([backcast.detach(), backcast.new_zeros(B, Q, 1, 2)], dim=2)
        valid = torch.ones(track.shape[:-1], dtype=torch.bool, device=track.device)
        tokens = self.motion_encoder(track.flatten(0, 1), valid.flatten(0, 1)).view(B, Q, -1)
        return self.interaction(tokens, boxes[..., (0, 1, 6)], query_mask)

    def loss(
        self, outputs: dict, boxes: torch.Tensor, box_mask: torch.Tensor, future: torch.Tensor, future_valid: torch.Tensor,
        history: torch.Tensor | None = None, history_valid: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Winner-take-all ``regression`` (SmoothL1) and ``classification`` (CE) terms, the motion branch's
        ``backcast`` term when ``history (B, Q, T, 3)`` is given, and their weighted ``total``."""
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
        terms = {"regression": regression, "classification": classification}
        total = regression + self.classification_weight * classification
        if "backcast" in outputs and history is not None:
            terms["backcast"] = backcast_loss(outputs["backcast"], boxes, box_mask, history, history_valid)
            total = total + self.backcast_weight * terms["backcast"]
        return {**terms, "total": total}


def backcast_loss(backcast: torch.Tensor, boxes: torch.Tensor, box_mask: torch.Tensor, history: torch.Tensor,
                  history_valid: torch.Tensor) -> torch.Tensor:
    """SmoothL1 between backcast past positions and the tracked history, both in the box's heading frame."""
    past = backcast.shape[2]
    if past == 0:
        return backcast.new_zeros(())
    target = to_anchor_frame(history[..., -past - 1:-1, :2], boxes[..., (0, 1, 6)])
    valid = (history_valid[..., -past - 1:-1] & box_mask[..., None]).to(backcast.dtype)  # (B, Q, T-1)
    smooth = F.smooth_l1_loss(backcast, target, reduction="none").sum(-1)
    return (smooth * valid).sum() / valid.sum().clamp_min(1)
