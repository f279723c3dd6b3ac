"""Trajectory-level parts of the prediction branch: a track encoder and an agent-interaction layer.

Both read object *tracks* (positions over time), not LiDAR, so they are what trajectory
self-supervision (SmartPretrain, :mod:`turbotrain.pretrain.trajectory`) pretrains and what the
prediction head of the joint model reuses (on the tracks it backcasts from the BEV history).

Conventions: a track window is ``(N, W, 2)`` positions in its *anchor* frame (the agent's pose at
the window's last step: origin at the agent, x along its heading), so the encoder sees motion, not
where the agent is; where the agents are, relative to each other, enters the interaction layer
through their anchor poses in the scene frame.
"""
from __future__ import annotations

import torch
from torch import nn

# Metres per unit of the encoders' inputs: keeps 10 Hz displacements and 50 m scenes near unit scale.
POSITION_SCALE = 10.0


def rotate_xy(offsets: torch.Tensor, yaw: torch.Tensor) -> torch.Tensor:
    """Rotate ``offsets (..., 2)`` by ``yaw`` broadcast over the leading dims."""
    c, s = torch.cos(yaw), torch.sin(yaw)
    x, y = offsets[..., 0], offsets[..., 1]
    return torch.stack([c * x - s * y, s * x + c * y], dim=-1)


def to_anchor_frame(xy: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """Positions ``xy (..., W, 2)`` in the frame of ``anchor (..., 3)`` = (x, y, yaw) in the same frame."""
    return rotate_xy(xy - anchor[..., None, :2], -anchor[..., None, 2])


class TrackEncoder(nn.Module):
    """A track window -> one embedding per agent: per-step MLP tokens, then a GRU over time.

    :meth:`step_tokens` and :meth:`summarise` are separate so masked pretraining can swap the tokens
    of hidden steps for a mask token in between: nothing of a hidden step then reaches the embedding.
    """

    def __init__(self, hidden: int):
        super().__init__()
        self.step_embedding = nn.Sequential(nn.Linear(3, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, hidden))
        self.gru = nn.GRU(hidden, hidden, batch_first=True)

    def step_tokens(self, xy: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """``xy (N, W, 2)`` anchor-frame positions, ``valid (N, W)`` -> tokens ``(N, W, hidden)``."""
        present = valid[..., None].to(xy.dtype)
        return self.step_embedding(torch.cat([xy / POSITION_SCALE * present, present], dim=-1))

    def summarise(self, tokens: torch.Tensor) -> torch.Tensor:
        """Step tokens ``(N, W, hidden)`` -> ``(N, hidden)``, the GRU's last state."""
        _, state = self.gru(tokens)
        return state[-1]

    def forward(self, xy: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return self.summarise(self.step_tokens(xy, valid))


class AgentInteraction(nn.Module):
    """One self-attention layer over the agents of a scene, told where each agent is and faces."""

    def __init__(self, hidden: int, heads: int = 4):
        super().__init__()
        self.pose_embedding = nn.Linear(4, hidden)
        # dropout 0: the same inputs give the same embeddings in training and evaluation
        self.layer = nn.TransformerEncoderLayer(hidden, heads, dim_feedforward=2 * hidden, dropout=0.0, batch_first=True)

    def forward(self, tokens: torch.Tensor, poses: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """``tokens (B, N, hidden)``, ``poses (B, N, 3)`` x, y, yaw in the scene frame, ``present (B, N)``."""
        pose = torch.cat([poses[..., :2] / POSITION_SCALE, torch.sin(poses[..., 2:3]), torch.cos(poses[..., 2:3])], -1)
        # A scene without agents would attend to nothing (NaN); its rows are padding and ignored anyway.
        padding = ~present & present.any(dim=1, keepdim=True)
        return self.layer(tokens + self.pose_embedding(pose.to(tokens.dtype)), src_key_padding_mask=padding)
