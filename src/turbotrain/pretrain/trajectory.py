"""Trajectory self-supervision for the prediction branch (SmartPretrain, ICLR 2025), on object tracks.

Per scene (one fused sample) every agent's track ``history + future`` is cut into two
*non-overlapping* windows of ``window`` steps. Each window is encoded agent by agent in the frame of
the agent's pose at the window's last step (:class:`~turbotrain.models.motion.TrackEncoder`), then
the agents of the scene attend to each other (:class:`~turbotrain.models.motion.AgentInteraction`).

* **Trajectory contrastive learning**: an agent's embedding in one window is the query, the same
  agent's embedding in the other window, made by a momentum (EMA) copy of the encoder, the positive
  key; the other agents of the batch and a queue of earlier keys are the negatives (InfoNCE at
  ``temperature``, MoCo). Keys of the same agent seen from another sample of its scenario are not
  used as negatives: they are the same object, not a different one. Symmetric over the two windows.
* **Trajectory reconstruction learning**: a contiguous segment of each window (never its last,
  anchor step) is hidden from the online encoder (its step tokens are replaced by a learned mask
  token) and decoded back from the agent's embedding (SmoothL1 on the hidden, valid steps).

The momentum follows SmartPretrain: ``momentum`` rising to 1 on a cosine over training. The
exported weights are the momentum branch's (SmartPretrain fine-tunes from the EMA encoder), under
the names of the prediction head that owns the two modules, so any model whose prediction branch
exposes a track encoder and an interaction layer can take them.
"""
from __future__ import annotations

import copy
import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn

from turbotrain.data.sample import Batch
from turbotrain.models.motion import AgentInteraction, TrackEncoder, to_anchor_frame

# momentum-branch module -> its attribute in the prediction head that receives the weights
HEAD_NAMES = {"encoder": "motion_encoder", "interaction": "interaction"}


def draw_windows(length: int, window: int, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Start steps ``(B, 2)`` of two non-overlapping ``window``-step windows in a ``length``-step track.

    The first window ends before the second starts; the gap between them is random, as are where
    they sit in the track.
    """
    slack = length - 2 * window
    if slack < 0:
        raise ValueError(f"two windows of {window} steps need a track of {2 * window} steps, have {length}")
    first = torch.randint(0, slack + 1, (batch_size,), generator=generator)
    second = first + window + (torch.rand(batch_size, generator=generator) * (slack - first + 1)).long()
    return torch.stack([first, second.clamp_max(length - window)], dim=1)


def segment_mask(shape: tuple[int, int], window: int, mask_steps: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``(B, M, window)`` bool: one contiguous hidden segment per agent, never the last (anchor) step."""
    if not 0 < mask_steps < window:
        raise ValueError(f"mask_steps must be in 1..{window - 1} for {window}-step windows, got {mask_steps}")
    start = torch.randint(0, window - mask_steps, shape, generator=generator)
    steps = torch.arange(window)
    return (steps >= start[..., None]) & (steps < start[..., None] + mask_steps)


def agent_identities(sample_ids: list[str], track_ids: torch.Tensor) -> torch.Tensor:
    """``(B, M, 2)`` (scenario hash, track id): the same object in every sample of its scenario."""
    scenes = torch.tensor([zlib.crc32("/".join(sid.split("/")[:2]).encode()) for sid in sample_ids], dtype=torch.long)
    return torch.stack([scenes[:, None].expand_as(track_ids), track_ids.long()], dim=-1)


class TrackWindow:
    """One window of every agent's track: anchor-frame ``xy (B, M, W, 2)``, ``valid (B, M, W)``,
    scene-frame ``anchor (B, M, 3)`` pose at the last step, and ``present (B, M)``."""

    def __init__(self, track: torch.Tensor, valid: torch.Tensor, start: torch.Tensor, window: int, box_mask: torch.Tensor):
        steps = start[:, None] + torch.arange(window, device=track.device)  # (B, W)
        index = steps[:, None, :].expand(*track.shape[:2], window)
        cut = track.gather(2, index[..., None].expand(-1, -1, -1, track.shape[-1]))
        self.valid = valid.gather(2, index) & box_mask[..., None]
        self.anchor = cut[:, :, -1]
        self.xy = to_anchor_frame(cut[..., :2], self.anchor)
        # an agent takes part if its anchor is known and the window shows it move (two steps or more)
        self.present = self.valid[..., -1] & (self.valid.sum(-1) >= 2)


class TrajectorySSL(nn.Module):
    """SmartPretrain's two objectives around a track encoder and an interaction layer; see the module doc."""

    tasks = ("contrastive", "trajectory_reconstruction")

    def __init__(self, encoder: TrackEncoder, interaction: AgentInteraction, hidden: int, window: int = 5,
                 mask_steps: int = 2, temperature: float = 0.07, momentum: float = 0.996, queue_size: int = 1024,
                 projection_dim: int = 64, contrastive_weight: float = 1.0, reconstruction_weight: float = 1.0,
                 export_prefix: str = "prediction_head"):
        super().__init__()
        self.window, self.mask_steps, self.temperature, self.base_momentum = window, mask_steps, temperature, momentum
        self.contrastive_weight, self.reconstruction_weight = contrastive_weight, reconstruction_weight
        self.export_prefix = export_prefix
        self.encoder, self.interaction = encoder, interaction
        self.projector = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, projection_dim))
        self.momentum_branch = nn.ModuleDict({"encoder": copy.deepcopy(encoder), "interaction": copy.deepcopy(interaction),
                                              "projector": copy.deepcopy(self.projector)})
        self.momentum_branch.requires_grad_(False)
        self.mask_token = nn.Parameter(torch.zeros(hidden))
        self.decoder = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, window * 2))
        self.register_buffer("queue", torch.zeros(queue_size, projection_dim))
        self.register_buffer("queue_ids", torch.full((queue_size, 2), -1, dtype=torch.long))
        self.register_buffer("queue_filled", torch.zeros(queue_size, dtype=torch.bool))
        self.register_buffer("queue_next", torch.zeros((), dtype=torch.long))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        self.total_updates = 1  # set by the stage to the number of training forwards (cosine momentum schedule)

    # ------------------------------------------------------------------------------- pieces
    def momentum(self) -> float:
        """SmartPretrain's schedule: ``base_momentum`` at the start, 1 at the end, on a cosine."""
        progress = min(int(self.updates) / max(self.total_updates, 1), 1.0)
        return 1.0 - (1.0 - self.base_momentum) * (math.cos(math.pi * progress) + 1.0) / 2.0

    @torch.no_grad()
    def update_momentum_branch(self) -> None:
        m = self.momentum()
        online = {"encoder": self.encoder, "interaction": self.interaction, "projector": self.projector}
        for name, module in online.items():
            for target, source in zip(self.momentum_branch[name].parameters(), module.parameters()):
                target.mul_(m).add_(source.detach(), alpha=1.0 - m)
        self.updates += 1

    def embed(self, win: TrackWindow, hidden_steps: torch.Tensor | None = None, momentum: bool = False) -> torch.Tensor:
        """Agent embeddings ``(B, M, hidden)`` of a window in its scene; ``hidden_steps`` get the mask token."""
        encoder = self.momentum_branch["encoder"] if momentum else self.encoder
        interaction = self.momentum_branch["interaction"] if momentum else self.interaction
        B, M, W = win.valid.shape
        tokens = encoder.step_tokens(win.xy.flatten(0, 1), win.valid.flatten(0, 1))
        if hidden_steps is not None:
            mask = hidden_steps.flatten(0, 1)[..., None]
            tokens = torch.where(mask, self.mask_token.to(tokens.dtype).expand_as(tokens), tokens)
        agents = encoder.summarise(tokens).view(B, M, -1)
        return interaction(agents, win.anchor, win.present)

    def keys(self, win: TrackWindow) -> torch.Tensor:
        with torch.no_grad():
            return F.normalize(self.momentum_branch["projector"](self.embed(win, momentum=True)), dim=-1)

    def contrast(self, queries: torch.Tensor, keys: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """InfoNCE of ``queries (N, d)`` against ``keys (N, d)`` (row i is i's positive) and the queue.

        Returns the loss and, per query, whether its positive scored highest.
        """
        same = (ids[:, None] == ids[None]).all(-1)
        in_batch = (queries @ keys.T).masked_fill(same & ~torch.eye(len(ids), dtype=torch.bool, device=ids.device),
                                                  float("-inf"))
        usable = self.queue_filled[None] & ~(ids[:, None] == self.queue_ids[None]).all(-1)
        # a copy: enqueue() overwrites the queue before backward() needs these values
        queued = (queries @ self.queue.clone().T).masked_fill(~usable, float("-inf"))
        logits = torch.cat([in_batch, queued], dim=1) / self.temperature
        labels = torch.arange(len(ids), device=ids.device)
        return F.cross_entropy(logits, labels), logits.argmax(dim=1) == labels

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, ids: torch.Tensor) -> None:
        size = len(self.queue)
        keys, ids = keys[-size:], ids[-size:]
        slots = (self.queue_next + torch.arange(len(keys), device=keys.device)) % size
        self.queue[slots], self.queue_ids[slots], self.queue_filled[slots] = keys, ids, True
        self.queue_next.copy_((self.queue_next + len(keys)) % size)

    def reconstruction(self, embedding: torch.Tensor, win: TrackWindow, hidden_steps: torch.Tensor) -> torch.Tensor:
        """SmoothL1 between decoded and real positions of the hidden, valid steps of present agents."""
        decoded = self.decoder(embedding).view(*win.valid.shape, 2)
        scored = (hidden_steps & win.valid & win.present[..., None]).to(decoded.dtype)
        error = F.smooth_l1_loss(decoded, win.xy, reduction="none").sum(-1)
        return (error * scored).sum() / scored.sum().clamp_min(1)

    # ------------------------------------------------------------------------------- objective
    def windows(self, batch: Batch, generator: torch.Generator | None = None) -> tuple[TrackWindow, TrackWindow]:
        track = torch.cat([batch.history, batch.future], dim=2)
        valid = torch.cat([batch.history_valid, batch.future_valid], dim=2)
        starts = draw_windows(track.shape[2], self.window, batch.batch_size, generator).to(track.device)
        return tuple(TrackWindow(track, valid, starts[:, v], self.window, batch.box_mask) for v in range(2))

    def forward(self, batch: Batch) -> dict:
        if self.training:
            self.update_momentum_branch()
        views = self.windows(batch)
        ids = agent_identities(batch.sample_ids, batch.track_ids).to(batch.boxes.device)
        both = views[0].present & views[1].present
        queries, keys, recon = [], [], []
        for win in views:
            hidden_steps = segment_mask(win.present.shape, self.window, self.mask_steps).to(win.xy.device)
            embedding = self.embed(win, hidden_steps)
            recon.append(self.reconstruction(embedding, win, hidden_steps))
            queries.append(F.normalize(self.projector(embedding[both]), dim=-1))
            keys.append(self.keys(win)[both])
        pair_ids = ids[both]
        if len(pair_ids):
            loss_a, top_a = self.contrast(queries[0], keys[1], pair_ids)
            loss_b, top_b = self.contrast(queries[1], keys[0], pair_ids)
            contrastive, top1 = (loss_a + loss_b) / 2, torch.cat([top_a, top_b]).float().mean()
            if self.training:
                self.enqueue(torch.cat(keys), torch.cat([pair_ids, pair_ids]))
        else:  # no agent seen in both windows: nothing to contrast, keep the graph connected
            contrastive, top1 = queries[0].sum() * 0.0, torch.tensor(float("nan"))
        return {
            "contrastive": self.contrastive_weight * contrastive,
            "trajectory_reconstruction": self.reconstruction_weight * (recon[0] + recon[1]) / 2,
            "log": {"positive_top1": top1.detach(), "agent_pairs": torch.tensor(float(len(pair_ids))),
                    "momentum": torch.tensor(self.momentum())},
        }

    def export(self) -> dict[str, torch.Tensor]:
        """The momentum branch's encoder and interaction weights, named as in the prediction head."""
        return {f"{self.export_prefix}.{HEAD_NAMES[name]}.{key}": value.detach().clone()
                for name in HEAD_NAMES for key, value in self.momentum_branch[name].state_dict().items()}

    @property
    def export_groups(self) -> tuple[str, ...]:
        return tuple(f"{self.export_prefix}.{name}" for name in HEAD_NAMES.values())
