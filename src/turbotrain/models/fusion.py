"""Multi-agent BEV fusion: ``(G, A, C, H, W)`` warped agent maps -> ``(G, C, H, W)`` for the ego.

``G`` indexes (sample, step) groups and ``A`` agent slots (slot 0 = ego). Every fuser takes
``valid (G, A, 1, H, W)`` bool, the product of "this slot holds an agent" and "this cell lies
inside that agent's warped map", plus ``agent_types (G, A)`` (0 vehicle, 1 infrastructure).
Invalid entries never influence the output, and non-ego agents enter only through max/sum
reductions, so every fuser is invariant to the order of the cooperating agents.
"""
from __future__ import annotations

import torch
from torch import nn

from turbotrain.models.registry import FUSERS

NUM_AGENT_TYPES = 2


@FUSERS.register("ego")
class EgoOnly(nn.Module):
    """No intermediate fusion: the ego slot as is (also early fusion, whose slot 0 holds all points)."""

    def __init__(self, channels: int, heads: int | None = None):  # heads: the shared size preset, unused
        super().__init__()
        self.out_channels = channels

    def forward(self, features: torch.Tensor, valid: torch.Tensor, agent_types: torch.Tensor) -> torch.Tensor:
        return features[:, 0] * valid[:, 0]


@FUSERS.register("fcooper")
class FCooperMax(nn.Module):
    """F-Cooper: element-wise max over the valid agents (zero where no agent sees the cell)."""

    def __init__(self, channels: int, heads: int | None = None):  # heads: the shared size preset, unused
        super().__init__()
        self.out_channels = channels

    def forward(self, features: torch.Tensor, valid: torch.Tensor, agent_types: torch.Tensor) -> torch.Tensor:
        lowest = torch.finfo(features.dtype).min
        fused = features.masked_fill(~valid, lowest).amax(dim=1)
        return fused * valid.any(dim=1)


class EgoQueryAttention(nn.Module):
    """Per-cell multi-head attention with the ego as query and all valid agents as keys/values.

    Projections are 1x1 convolutions (per-cell linear maps). ``type_aware`` gives every agent type
    its own Q/K/V projections and adds a learned bias per (ego type, agent type) pair and head, the
    heterogeneous attention of V2X-ViT; otherwise all agents share one projection (AttFuse).
    The output is the ego feature plus the projected attention result (residual).
    """

    def __init__(self, channels: int, heads: int, type_aware: bool):
        super().__init__()
        if channels % heads:
            raise ValueError(f"fusion: channels {channels} not divisible by heads {heads}")
        self.heads = heads
        self.out_channels = channels
        num_types = NUM_AGENT_TYPES if type_aware else 1
        self.query = nn.ModuleList(nn.Conv2d(channels, channels, 1) for _ in range(num_types))
        self.key = nn.ModuleList(nn.Conv2d(channels, channels, 1) for _ in range(num_types))
        self.value = nn.ModuleList(nn.Conv2d(channels, channels, 1) for _ in range(num_types))
        self.type_pair_bias = nn.Parameter(torch.zeros(num_types, num_types, heads)) if type_aware else None
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, features: torch.Tensor, valid: torch.Tensor, agent_types: torch.Tensor) -> torch.Tensor:
        G, A, C, H, W = features.shape
        features = features * valid
        types = agent_types if self.type_pair_bias is not None else torch.zeros_like(agent_types)
        query = _typed_projection(self.query, features[:, :1], types[:, :1])  # (G, 1, C, H, W)
        key = _typed_projection(self.key, features, types)
        value = _typed_projection(self.value, features, types)
        d = C // self.heads
        query = query.view(G, 1, self.heads, d, H, W)
        key = key.view(G, A, self.heads, d, H, W)
        logits = (query * key).sum(dim=3) / d**0.5  # (G, A, heads, H, W)
        if self.type_pair_bias is not None:
            bias = self.type_pair_bias[types[:, :1], types]  # (G, A, heads)
            logits = logits + bias[..., None, None]
        weights = _masked_softmax_over_agents(logits, valid)
        attended = (weights[:, :, :, None] * value.view(G, A, self.heads, d, H, W)).sum(dim=1)
        fused = features[:, 0] + self.out(attended.reshape(G, C, H, W))
        return fused * valid.any(dim=1)


@FUSERS.register("attfuse")
class AttFusion(nn.Module):
    """OpenCOOD's AttFusion (OPV2V's AttFuse), as in ``fuse_modules/self_attn.py``: no learned weights,
    one head; per cell the ego feature attends to every agent's feature (keys = values = the
    features), scores ``q.k / sqrt(C)``, and the ego row is the output. ``per_scale``: the model
    applies it to every BEV-backbone scale before upsampling, while the next stage reads the unfused
    features (OpenCOOD's ``AttBEVBackbone``). One departure, also in every other fuser here: entries
    outside an agent's map or in an empty slot are masked out of the softmax (OpenCOOD projects
    points first, so every agent covers every cell and there are no empty slots in a batch).
    """

    per_scale = True

    def __init__(self, channels: int):
        super().__init__()
        self.out_channels = channels

    def forward(self, features: torch.Tensor, valid: torch.Tensor, agent_types: torch.Tensor) -> torch.Tensor:
        C = features.shape[2]
        features = features * valid
        logits = (features[:, :1] * features).sum(dim=2, keepdim=True) / C**0.5  # (G, A, 1, H, W)
        weights = _masked_softmax_over_agents(logits, valid)
        return (weights * features).sum(dim=1) * valid.any(dim=1)


@FUSERS.register("attfuse_mha")
class MultiHeadAttFuse(EgoQueryAttention):
    """Our learned variant of AttFuse: multi-head ego-query attention with Q/K/V/out projections and a
    residual, once on the backbone's output (the published AttFusion is :class:`AttFusion`)."""

    def __init__(self, channels: int, heads: int = 1):
        super().__init__(channels, heads, type_aware=False)


@FUSERS.register("hmsa_lite")
class HMSALite(EgoQueryAttention):
    """A light heterogeneous attention: per-type Q/K/V and a learned scalar bias per (ego type, agent
    type, head); no relation matrices, windows, FFN or norm (V2X-ViT itself: models/v2xvit.py)."""

    def __init__(self, channels: int, heads: int = 1):
        super().__init__(channels, heads, type_aware=True)


def _typed_projection(projections: nn.ModuleList, features: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
    """Apply projection ``projections[type]`` to each agent's ``(C, H, W)`` map."""
    G, A, C, H, W = features.shape
    flat = features.reshape(G * A, C, H, W)
    flat_types = types.reshape(G * A)
    if len(projections) == 1:
        return projections[0](flat).view(G, A, C, H, W)
    out = torch.zeros_like(flat)
    for agent_type, projection in enumerate(projections):
        rows = (flat_types == agent_type).nonzero(as_tuple=True)[0]
        if len(rows):
            out = out.index_copy(0, rows, projection(flat[rows]))
    return out.view(G, A, C, H, W)


def _masked_softmax_over_agents(logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Softmax over dim 1 (agents) that ignores invalid entries; all-invalid cells get zero weights.

    ``valid (G, A, 1, H, W)`` broadcasts over the heads of ``logits (G, A, heads, H, W)``. A finite
    fill value instead of -inf keeps all-invalid cells free of NaN (their weights are zeroed after).
    """
    weights = torch.softmax(logits.masked_fill(~valid, torch.finfo(logits.dtype).min), dim=1)
    return weights * valid
