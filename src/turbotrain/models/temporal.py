"""Temporal fusion of per-step fused BEV maps ``(B, T, C, H, W)`` -> ``(B, C, H, W)``.

All steps are already in the ego frame at the current time (``pose_to_ego`` includes ego motion),
so fusion is per cell. ``step_valid (B, T)`` marks steps that hold at least one agent-frame; the last
step (T-1) is the current one.
"""
from __future__ import annotations

import torch
from torch import nn

from turbotrain.models.registry import TEMPORAL


@TEMPORAL.register("none")
class CurrentStepOnly(nn.Module):
    """No temporal fusion: the current step's map."""

    def __init__(self, channels: int, history: int, heads: int | None = None):  # heads: shared size preset, unused
        super().__init__()
        self.out_channels = channels

    def forward(self, step_bev: torch.Tensor, step_valid: torch.Tensor) -> torch.Tensor:
        return step_bev[:, -1]


@TEMPORAL.register("attention")
class TemporalAttention(nn.Module):
    """Per-cell multi-head attention over time; the query is the current step.

    Learned step embeddings (one per history step, added before projecting) tell the attention how
    old each map is. Output = current map + projected attention result.
    """

    def __init__(self, channels: int, history: int, heads: int = 1):
        super().__init__()
        if channels % heads:
            raise ValueError(f"temporal: channels {channels} not divisible by heads {heads}")
        self.heads = heads
        self.out_channels = channels
        self.step_embedding = nn.Parameter(torch.randn(history, channels) * 0.02)
        self.query = nn.Conv2d(channels, channels, 1)
        self.key = nn.Conv2d(channels, channels, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, step_bev: torch.Tensor, step_valid: torch.Tensor) -> torch.Tensor:
        B, T, C, H, W = step_bev.shape
        if T > self.step_embedding.shape[0]:
            raise ValueError(f"temporal: {T} steps but the model was built for history {self.step_embedding.shape[0]}")
        embedded = step_bev + self.step_embedding[-T:, :, None, None]
        flat = embedded.reshape(B * T, C, H, W)
        d = C // self.heads
        query = self.query(embedded[:, -1]).view(B, 1, self.heads, d, H, W)
        key = self.key(flat).view(B, T, self.heads, d, H, W)
        value = self.value(flat).view(B, T, self.heads, d, H, W)
        logits = (query * key).sum(dim=3) / d**0.5  # (B, T, heads, H, W)
        valid = step_valid[:, :, None, None, None]
        logits = logits.masked_fill(~valid, torch.finfo(logits.dtype).min)
        weights = torch.softmax(logits, dim=1) * valid
        attended = (weights[:, :, :, None] * value).sum(dim=1).reshape(B, C, H, W)
        return step_bev[:, -1] + self.out(attended)


class ConvGRUCell(nn.Module):
    """Convolutional GRU cell (3x3 gates)."""

    def __init__(self, channels: int):
        super().__init__()
        self.gates = nn.Conv2d(2 * channels, 2 * channels, 3, padding=1)
        self.candidate = nn.Conv2d(2 * channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        update, reset = torch.sigmoid(self.gates(torch.cat([x, hidden], dim=1))).chunk(2, dim=1)
        candidate = torch.tanh(self.candidate(torch.cat([x, reset * hidden], dim=1)))
        return (1 - update) * hidden + update * candidate


@TEMPORAL.register("conv_gru")
class ConvGRUTemporal(nn.Module):
    """ConvGRU over the steps, oldest first; missing steps leave the hidden state unchanged.

    The current map is added to the final hidden state so the fused map never loses the present.
    """

    def __init__(self, channels: int, history: int, heads: int | None = None):  # heads: shared size preset, unused
        super().__init__()
        self.out_channels = channels
        self.cell = ConvGRUCell(channels)

    def forward(self, step_bev: torch.Tensor, step_valid: torch.Tensor) -> torch.Tensor:
        hidden = torch.zeros_like(step_bev[:, 0])
        for t in range(step_bev.shape[1]):
            updated = self.cell(step_bev[:, t], hidden)
            hidden = torch.where(step_valid[:, t, None, None, None], updated, hidden)
        return step_bev[:, -1] + hidden
