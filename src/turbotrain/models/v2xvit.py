"""V2X-ViT fusion (Xu et al., ECCV 2022): heterogeneous multi-agent attention + multi-scale windows.

Reference, read for its facts (the code here is our own):

- DerrickXuNu/OpenCOOD @ 31ba16025da27ffe4e336f011290dfbc66f9a1f1 (files last changed in
  c06bb67e8a6d05dd70daebd4adabacb57808caed): ``opencood/models/fuse_modules/v2xvit_basic.py``
  (``V2XTEncoder``, ``V2XFusionBlock``), ``opencood/models/fuse_modules/hmsa.py``
  (``HGTCavAttention``), ``opencood/models/fuse_modules/mswin.py`` (``PyramidWindowAttention``,
  ``BaseWindowAttention``), ``opencood/models/sub_modules/split_attn.py`` (``SplitAttn``),
  ``opencood/models/sub_modules/base_transformer.py`` (``PreNorm``, ``FeedForward``) and
  ``opencood/hypes_yaml/point_pillar_v2xvit.yaml`` (our ``paper`` preset: 3 layers; HMSA 8 heads x 32;
  windows 4/8/16 with 16/8/4 heads x 16/32/64; split attention; FFN 256; dropout 0.3).
- ucla-mobility/V2X-Real @ b6d5be142a92beaba129bb9da40855d647df35ea: the same module files (byte
  identical) and ``opencood/hypes_yaml/point_pillar_v2xvit.yaml`` with windows 2/4/8 and 1 layer.

Each layer, on channels-last maps ``(G, A, H, W, C)`` of all agents:
``x = HMSA(LN(x)) + x``; ``x = PyramidWindows(LN(x)) + x``; ``x = FFN(LN(x)) + x``; the ego row is the
output. HMSA attends over agents at each cell with per-type Q/K/V/output maps and per-relation (query
type, key type) matrices ``W_att`` / ``W_msg`` per head; the window attention attends within windows of
each agent's own map, one branch per window size, combined by split attention.

Differences from the reference, all but the first forced by our inputs:

- No delay-aware positional encoding (RTE): it needs each agent's time delay, which our batches do
  not carry. OpenCOOD's unused ``prior_feed`` linear layer is also left out.
- No spatial-temporal correction (STTF): our maps arrive already warped into the ego frame.
- Invalid entries (empty slots, cells outside an agent's warped map) are zeroed at the input and
  masked as HMSA keys, as OpenCOOD's ROI mask does; where *no* agent is valid at a cell, every
  row is kept at zero after each sub-layer and enters window attention as a zero token (OpenCOOD's
  ego covers every cell, so it has no such cells); empty slots stay zero throughout. A cell whose
  keys are all masked gets zero attention weights instead of OpenCOOD's NaN.
- H and W are zero-padded to a multiple of each window size and cropped back (OpenCOOD requires
  divisibility); padded cells are zero tokens, like the cells above.
- Split attention pools over the map's cells with uncovered cells at zero, for any number of
  branches (OpenCOOD's ``SplitAttn`` is fixed to 3 branches and 256 channels).
- The last layer computes only the ego row (queries = ego, keys = all agents): the other rows of
  the last layer are discarded by OpenCOOD too, so the output is the same, at 1/A of the cost.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from turbotrain.models.fusion import NUM_AGENT_TYPES
from turbotrain.models.registry import FUSERS

WINDOW_FUSIONS = ("split_attn", "mean")


@FUSERS.register("v2xvit")
class V2XViT(nn.Module):
    """V2X-ViT: ``layers`` x [PreNorm(HMSA) + residual, PreNorm(pyramid window attention) + residual,
    PreNorm(FFN) + residual], then the ego slot. Defaults are OpenCOOD's ``point_pillar_v2xvit.yaml``.

    ``heads`` x ``dim_head``: HMSA (agent attention); ``window_sizes`` / ``window_heads`` /
    ``window_dim_heads``: one window-attention branch each; ``window_fusion``: ``split_attn``
    (OpenCOOD's choice) or ``mean`` (OpenCOOD's ``naive``); ``relative_position_bias``: a learned
    bias per relative offset (else one per pair of window positions, OpenCOOD's other option).
    The delay-aware positional encoding (RTE) is left out: it needs per-agent latencies, which our
    batches do not have. See the module docstring for every difference from the reference.
    """

    def __init__(
        self,
        channels: int,
        heads: int = 8,
        dim_head: int = 32,
        window_sizes: tuple[int, ...] | list[int] = (4, 8, 16),
        window_heads: tuple[int, ...] | list[int] = (16, 8, 4),
        window_dim_heads: tuple[int, ...] | list[int] = (16, 32, 64),
        layers: int = 3,
        mlp_dim: int = 256,
        dropout: float = 0.3,
        relative_position_bias: bool = True,
        window_fusion: str = "split_attn",
    ):
        super().__init__()
        if not len(window_sizes) == len(window_heads) == len(window_dim_heads) >= 1:
            raise ValueError("v2xvit: window_sizes, window_heads and window_dim_heads need one entry per branch")
        if layers < 1 or window_fusion not in WINDOW_FUSIONS:
            raise ValueError(f"v2xvit: layers must be >= 1 and window_fusion one of {WINDOW_FUSIONS}")
        self.out_channels = channels
        self.layers = nn.ModuleList(
            V2XViTLayer(
                channels,
                HeteroAgentAttention(channels, heads, dim_head, dropout),
                PyramidWindowAttention(channels, [
                    WindowAttention(channels, m, d, w, dropout, relative_position_bias)
                    for w, m, d in zip(window_sizes, window_heads, window_dim_heads)
                ], window_fusion),
                mlp_dim,
                dropout,
            )
            for _ in range(layers)
        )

    def forward(self, features: torch.Tensor, valid: torch.Tensor, agent_types: torch.Tensor) -> torch.Tensor:
        G, A = features.shape[:2]
        x = (features * valid).permute(0, 1, 3, 4, 2)  # (G, A, H, W, C)
        key_valid = valid[:, :, 0]  # (G, A, H, W)
        covered = valid.any(dim=1)  # (G, 1, H, W)
        occupied = key_valid.flatten(2).any(dim=2)  # (G, A)
        keep = (occupied[:, :, None, None] & covered).unsqueeze(-1).to(x.dtype)  # (G, A, H, W, 1)
        for n, layer in enumerate(self.layers):
            queries = 1 if n == len(self.layers) - 1 else A  # the last layer only needs the ego row
            x = layer(x, key_valid, keep[:, :queries], agent_types, queries)
        return x[:, 0].permute(0, 3, 1, 2) * covered


class V2XViTLayer(nn.Module):
    """One encoder layer: pre-norm HMSA, pre-norm pyramid windows, pre-norm FFN, each with a residual;
    rows and cells outside ``keep`` are zeroed after each sub-layer."""

    def __init__(self, channels: int, agents: nn.Module, windows: nn.Module, mlp_dim: int, dropout: float):
        super().__init__()
        self.agent_norm, self.agent_attention = nn.LayerNorm(channels), agents
        self.window_norm, self.window_attention = nn.LayerNorm(channels), windows
        self.ffn_norm = nn.LayerNorm(channels)
        self.ffn = nn.Sequential(nn.Linear(channels, mlp_dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(mlp_dim, channels), nn.Dropout(dropout))

    def forward(self, x, key_valid, keep, agent_types, queries: int) -> torch.Tensor:
        G, _, H, W, C = x.shape
        rows = (x[:, :queries] + self.agent_attention(self.agent_norm(x), key_valid, agent_types, queries)) * keep
        rows, keep = rows.reshape(G * queries, H, W, C), keep.reshape(G * queries, H, W, 1)
        rows = (rows + self.window_attention(self.window_norm(rows) * keep, keep)) * keep
        rows = (rows + self.ffn(self.ffn_norm(rows))) * keep
        return rows.view(G, queries, H, W, C)


class HeteroAgentAttention(nn.Module):
    """HMSA (OpenCOOD's ``HGTCavAttention``): per cell, each query agent ``i`` attends to the valid
    agents ``j`` with ``q_i^T W_att[r] k_j / sqrt(dim_head)`` and takes messages ``v_j^T W_msg[r]``,
    ``r = type_i * num_types + type_j``; Q/K/V use the agent's type, the output map the query's."""

    def __init__(self, channels: int, heads: int, dim_head: int, dropout: float, num_types: int = NUM_AGENT_TYPES):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head, self.num_types = heads, dim_head, num_types
        self.query, self.key, self.value = (
            nn.ModuleList(nn.Linear(channels, inner) for _ in range(num_types)) for _ in range(3)
        )
        self.out = nn.ModuleList(nn.Linear(inner, channels) for _ in range(num_types))
        self.relation_att = nn.Parameter(torch.empty(num_types**2, heads, dim_head, dim_head))
        self.relation_msg = nn.Parameter(torch.empty(num_types**2, heads, dim_head, dim_head))
        nn.init.xavier_uniform_(self.relation_att)  # on the whole 4D tensor, as OpenCOOD does
        nn.init.xavier_uniform_(self.relation_msg)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, key_valid: torch.Tensor, types: torch.Tensor, queries: int) -> torch.Tensor:
        """``x (G, A, H, W, C)``, ``key_valid (G, A, H, W)`` -> ``(G, queries, H, W, C)`` for rows ``:queries``."""
        G, A, H, W, _ = x.shape
        split = (self.heads, self.dim_head)
        q = typed_linear(self.query, x[:, :queries], types[:, :queries]).view(G, queries, H * W, *split)
        k = typed_linear(self.key, x, types).view(G, A, H * W, *split)
        v = typed_linear(self.value, x, types).view(G, A, H * W, *split)
        relation = types[:, :queries, None] * self.num_types + types[:, None, :]  # (G, Q, A)
        q_att = torch.einsum("ginmp,gijmpc->gijnmc", q, self.relation_att[relation])
        logits = torch.einsum("gijnmc,gjnmc->gijnm", q_att, k) * self.dim_head**-0.5
        weights = masked_softmax(logits, key_valid.view(G, 1, A, H * W, 1), dim=2)
        messages = torch.einsum("gijnm,gjnmp->gijnmp", weights, v)
        out = torch.einsum("gijnmp,gijmpc->ginmc", messages, self.relation_msg[relation])
        out = typed_linear(self.out, out.reshape(G, queries, H, W, -1), types[:, :queries])
        return self.dropout(out)


def typed_linear(linears: nn.ModuleList, x: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
    """``linears[type]`` applied to each agent's ``(H, W, C_in)`` map: ``x (G, A, H, W, C_in)``, ``types (G, A)``."""
    weight = torch.stack([linear.weight for linear in linears])[types]  # (G, A, C_out, C_in)
    bias = torch.stack([linear.bias for linear in linears])[types]  # (G, A, C_out)
    return torch.einsum("gahwc,gaoc->gahwo", x, weight) + bias[:, :, None, None]


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Softmax over ``dim`` ignoring entries where ``mask`` is False; all-masked slices get zero weights."""
    weights = torch.softmax(logits.masked_fill(~mask, torch.finfo(logits.dtype).min), dim=dim)
    return weights * mask


class PyramidWindowAttention(nn.Module):
    """One window-attention branch per window size, combined by split attention or their mean."""

    def __init__(self, channels: int, branches: list[nn.Module], fusion: str = "split_attn"):
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.split_attention = SplitAttention(channels, len(branches)) if fusion == "split_attn" else None

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """``x (N, H, W, C)`` (zero outside ``keep (N, H, W, 1)``) -> ``(N, H, W, C)``."""
        outputs = [branch(x) * keep for branch in self.branches]
        if self.split_attention is None:
            return torch.stack(outputs).mean(dim=0)
        return self.split_attention(outputs)


class SplitAttention(nn.Module):
    """OpenCOOD's ``SplitAttn``: pool the branch sum over the map, ``fc -> LayerNorm -> ReLU -> fc`` to
    one weight per branch and channel, softmax over the branches (sigmoid for one branch)."""

    def __init__(self, channels: int, branches: int):
        super().__init__()
        self.branches = branches
        self.fc1 = nn.Linear(channels, channels, bias=False)
        self.norm = nn.LayerNorm(channels)
        self.fc2 = nn.Linear(channels, channels * branches, bias=False)

    def forward(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        N, C = outputs[0].shape[0], outputs[0].shape[-1]
        pooled = torch.stack(outputs).sum(dim=0).mean(dim=(1, 2))  # (N, C)
        logits = self.fc2(F.relu(self.norm(self.fc1(pooled)))).view(N, self.branches, C)
        weights = logits.softmax(dim=1) if self.branches > 1 else logits.sigmoid()
        return sum(out * weights[:, b, None, None] for b, out in enumerate(outputs))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside non-overlapping ``window x window`` windows of each map, with
    a learned bias per relative offset shared by the heads (OpenCOOD's ``BaseWindowAttention``):
    ``bias_table`` has ``(2 window - 1)^2`` rows, or ``window^4`` entries ``(window^2, window^2)``
    without ``relative_position_bias``. Maps are zero-padded to a multiple of the window, then cropped."""

    def __init__(
        self, channels: int, heads: int, dim_head: int, window: int, dropout: float, relative_position_bias: bool = True
    ):
        super().__init__()
        self.heads, self.dim_head, self.window = heads, dim_head, window
        self.qkv = nn.Linear(channels, 3 * heads * dim_head, bias=False)
        self.out = nn.Sequential(nn.Linear(heads * dim_head, channels), nn.Dropout(dropout))
        if relative_position_bias:
            self.bias_table = nn.Parameter(torch.randn((2 * window - 1) ** 2))
            self.register_buffer("bias_index", relative_offset_index(window), persistent=False)
        else:
            self.bias_table = nn.Parameter(torch.randn(window**2, window**2))
            self.bias_index = None

    def position_bias(self) -> torch.Tensor:
        """``(window^2, window^2)`` bias added to the logits of every head and window."""
        return self.bias_table if self.bias_index is None else self.bias_table[self.bias_index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (N, H, W, C) -> (N, H, W, C)``."""
        N, H, W, C = x.shape
        w = self.window
        x = F.pad(x, (0, 0, 0, -W % w, 0, -H % w))
        Hp, Wp = x.shape[1:3]
        windows = x.view(N, Hp // w, w, Wp // w, w, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, C)
        q, k, v = self.qkv(windows).view(-1, w * w, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=self.position_bias().to(q.dtype))
        out = self.out(attended.transpose(1, 2).reshape(-1, w * w, self.heads * self.dim_head))
        out = out.view(N, Hp // w, Wp // w, w, w, C).permute(0, 1, 3, 2, 4, 5).reshape(N, Hp, Wp, C)
        return out[:, :H, :W]


def relative_offset_index(window: int) -> torch.Tensor:
    """``(window^2, window^2)`` long: for window positions ``i, j`` (row-major), the flat index of the
    offset ``pos_j - pos_i`` in a ``(2 window - 1) x (2 window - 1)`` table."""
    rows, cols = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    pos = torch.stack([rows.flatten(), cols.flatten()], dim=1)  # (window^2, 2)
    offset = pos[None, :, :] - pos[:, None, :] + window - 1
    return offset[..., 0] * (2 * window - 1) + offset[..., 1]
