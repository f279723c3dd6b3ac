"""Trajectory self-supervision for the prediction branch (SmartPretrain, ICLR 2025), on object tracks.

Follows the release (youngzhou1999/SmartPretrain ``predictors/qcnet_ssl.py``, ``train_ssl.sh``)
unless an option says otherwise; docs/faithfulness.md lists what remains different.

Per scene (one fused sample) every agent's track ``history + future`` is cut into two
*non-overlapping* windows of ``window`` steps (default: the model's history length, the track length
the prediction head's motion encoder reads in fine-tuning). Each window is encoded agent by agent in
the frame of the agent's pose at the window's last step (:class:`~turbotrain.models.motion.TrackEncoder`),
then the agents of the scene attend to each other (:class:`~turbotrain.models.motion.AgentInteraction`).
Both branches end in a projector ``hidden -> 4 hidden (BN, ReLU) -> 2 hidden`` (128 -> 512 -> 256 in
the release).

* **Trajectory contrastive learning** (``direction: forward``, the release): the online branch sees
  the first window; its projection goes through a predictor ``2h -> 8h (BN, ReLU) -> 2h`` (256 -> 1024
  -> 256) and is the query. The keys are the momentum (EMA) branch's projections of *both* windows:
  the same agent's second-window key is the positive, its own first-window key is left out, every
  other key is a negative (InfoNCE at ``temperature``), and the loss is scaled by ``2 x temperature``
  (``scale_by_temperature``). ``direction: symmetric`` also queries from the second window.
  Our additions, named: ``exclude_same_object`` (default on) leaves out keys of the same object seen
  from another sample of its scenario (cooperative samples share objects; they are not negatives), and
  ``queue_size`` > 0 keeps earlier keys as extra negatives (MoCo; off in the release).
* **Trajectory reconstruction learning** (``reconstruction: forecast``, the release): from the first
  window's online projection and a learned embedding of the step where that window starts, a head
  ``4h -> 8h (LayerNorm, ReLU) -> 2 x track steps`` predicts per-step displacements; summed from the
  step after the first window, they give the positions up to the end of the second window, in the first
  window's anchor frame. SmoothL1 on the valid steps, averaged per step over agents, then over steps.
  ``reconstruction: inpaint`` is our earlier objective: a contiguous segment of each window (never
  its anchor step) is hidden behind a mask token and decoded back from the agent's embedding.

Our addition, named: ``input_noise_m`` > 0 adds Gaussian noise to the window steps the encoders
read (never the anchor step, never the targets), because fine-tuning feeds the motion encoder the
prediction head's backcast tracks, which are not ground truth; 0 reads clean tracks, as the release.

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
    scene-frame ``anchor (B, M, 3)`` pose at the last step, and ``present (B, M)``.

    ``inputs`` is what the encoders read: ``xy`` plus Gaussian noise of ``noise_m`` metres per
    coordinate on every step but the anchor (which stays the origin, as a backcast track ends at its
    box). Fine-tuning feeds the motion encoder the prediction head's backcast tracks, not ground truth;
    the noise makes the pretraining tracks look like them. Targets always use the clean ``xy``."""

    def __init__(self, track: torch.Tensor, valid: torch.Tensor, start: torch.Tensor, window: int, box_mask: torch.Tensor,
                 noise_m: float = 0.0, generator: torch.Generator | None = None):
        steps = start[:, None] + torch.arange(window, device=track.device)  # (B, W)
        index = steps[:, None, :].expand(*track.shape[:2], window)
        cut = track.gather(2, index[..., None].expand(-1, -1, -1, track.shape[-1]))
        self.valid = valid.gather(2, index) & box_mask[..., None]
        self.anchor = cut[:, :, -1]
        self.xy = to_anchor_frame(cut[..., :2], self.anchor)
        self.inputs = self.xy
        if noise_m > 0:
            noise = torch.randn(self.xy.shape, generator=generator).to(self.xy.device) * noise_m
            self.inputs = self.xy + noise * (torch.arange(window, device=track.device) < window - 1)[:, None]
        # an agent takes part if its anchor is known and the window shows it move (two steps or more)
        self.present = self.valid[..., -1] & (self.valid.sum(-1) >= 2)


def mlp_head(in_dim: int, hidden: int, out_dim: int, norm: type[nn.Module]) -> nn.Sequential:
    """SmartPretrain's two-layer heads: Linear, ``norm`` (BatchNorm1d / LayerNorm), ReLU, Linear."""
    return nn.Sequential(nn.Linear(in_dim, hidden), norm(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))


RECONSTRUCTIONS, DIRECTIONS = ("forecast", "inpaint"), ("forward", "symmetric")


class TrajectorySSL(nn.Module):
    """SmartPretrain's two objectives around a track encoder and an interaction layer; see the module doc."""

    tasks = ("contrastive", "trajectory_reconstruction")

    def __init__(self, encoder: TrackEncoder, interaction: AgentInteraction, hidden: int, track_steps: int,
                 window: int = 5, reconstruction: str = "forecast", mask_steps: int = 2, temperature: float = 0.07,
                 momentum: float = 0.996, direction: str = "forward", scale_by_temperature: bool = True,
                 exclude_same_object: bool = True, queue_size: int = 0, projection_dim: int | None = None,
                 input_noise_m: float = 0.0,
                 contrastive_weight: float = 1.0, reconstruction_weight: float = 1.0,
                 export_prefix: str = "prediction_head"):
        super().__init__()
        if reconstruction not in RECONSTRUCTIONS or direction not in DIRECTIONS:
            raise ValueError(f"reconstruction must be one of {RECONSTRUCTIONS} and direction one of {DIRECTIONS}, "
                             f"got {reconstruction!r}, {direction!r}")
        self.window, self.mask_steps, self.temperature, self.base_momentum = window, mask_steps, temperature, momentum
        self.reconstruction_mode, self.direction = reconstruction, direction
        self.scale_by_temperature, self.exclude_same_object = scale_by_temperature, exclude_same_object
        self.contrastive_weight, self.reconstruction_weight = contrastive_weight, reconstruction_weight
        self.track_steps, self.export_prefix, self.input_noise_m = track_steps, export_prefix, input_noise_m
        self.encoder, self.interaction = encoder, interaction
        dim = projection_dim or 2 * hidden
        self.projector = mlp_head(hidden, 4 * hidden, dim, nn.BatchNorm1d)
        self.predictor = mlp_head(dim, 8 * hidden, dim, nn.BatchNorm1d)
        self.momentum_branch = nn.ModuleDict({"encoder": copy.deepcopy(encoder), "interaction": copy.deepcopy(interaction),
                                              "projector": copy.deepcopy(self.projector)})
        self.momentum_branch.requires_grad_(False)
        if reconstruction == "forecast":
            self.start_embedding = nn.Parameter(torch.zeros(track_steps, dim))
            self.decoder = mlp_head(2 * dim, 8 * hidden, track_steps * 2, nn.LayerNorm)
        else:
            self.mask_token = nn.Parameter(torch.zeros(hidden))
            self.decoder = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, window * 2))
        self.register_buffer("queue", torch.zeros(queue_size, dim))
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
        tokens = encoder.step_tokens(win.inputs.flatten(0, 1), win.valid.flatten(0, 1))
        if hidden_steps is not None:
            mask = hidden_steps.flatten(0, 1)[..., None]
            tokens = torch.where(mask, self.mask_token.to(tokens.dtype).expand_as(tokens), tokens)
        agents = encoder.summarise(tokens).view(B, M, -1)
        return interaction(agents, win.anchor, win.present)

    def keys(self, win: TrackWindow) -> torch.Tensor:
        """``(P, dim)`` normalised momentum projections of the window's present agents."""
        with torch.no_grad():
            return F.normalize(self.momentum_branch["projector"](self.embed(win, momentum=True)[win.present]), dim=-1)

    def contrast(self, queries: torch.Tensor, keys: torch.Tensor, query_ids: torch.Tensor, key_ids: torch.Tensor,
                 positive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """InfoNCE of ``queries (N, d)`` against ``keys (K, d)``, column ``positive[i]`` being query i's
        positive, plus the queue. A key with the query's identity other than its positive is left out
        (its own first-window key, and other views of the same object). Returns the loss (scaled by
        2 x temperature where the release does) and, per query, whether its positive scored highest."""
        same = (query_ids[:, None] == key_ids[None]).all(-1)
        same[torch.arange(len(queries), device=queries.device), positive] = False
        in_batch = (queries @ keys.T).masked_fill(same, float("-inf"))
        usable = self.queue_filled[None] & ~(query_ids[:, None] == self.queue_ids[None]).all(-1)
        # a copy: enqueue() overwrites the queue before backward() needs these values
        queued = (queries @ self.queue.clone().T).masked_fill(~usable, float("-inf"))
        logits = torch.cat([in_batch, queued], dim=1) / self.temperature
        loss = F.cross_entropy(logits, positive)
        return loss * (2 * self.temperature if self.scale_by_temperature else 1.0), logits.argmax(dim=1) == positive

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, ids: torch.Tensor) -> None:
        size = len(self.queue)
        if size == 0:
            return
        keys, ids = keys[-size:], ids[-size:]
        slots = (self.queue_next + torch.arange(len(keys), device=keys.device)) % size
        self.queue[slots], self.queue_ids[slots], self.queue_filled[slots] = keys, ids, True
        self.queue_next.copy_((self.queue_next + len(keys)) % size)

    def inpainting(self, embedding: torch.Tensor, win: TrackWindow, hidden_steps: torch.Tensor) -> torch.Tensor:
        """SmoothL1 between decoded and real positions of the hidden, valid steps of present agents."""
        decoded = self.decoder(embedding).view(*win.valid.shape, 2)
        scored = (hidden_steps & win.valid & win.present[..., None]).to(decoded.dtype)
        error = F.smooth_l1_loss(decoded, win.xy, reduction="none").sum(-1)
        return (error * scored).sum() / scored.sum().clamp_min(1)

    def forecast_targets(self, track: torch.Tensor, valid: torch.Tensor, starts: torch.Tensor,
                         first: TrackWindow) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(positions (B, M, L, 2) in the first window's anchor frame, scored (B, M, L), after (B, L))``:
        the steps after the first window up to the end of the second, where the track is valid."""
        steps = torch.arange(track.shape[2], device=track.device)
        after = steps[None] > (starts[:, 0:1] + self.window - 1)
        upto = steps[None] <= (starts[:, 1:2] + self.window - 1)
        positions = to_anchor_frame(track[..., :2], first.anchor)
        scored = valid & (after & upto)[:, None] & first.present[..., None]
        return positions, scored, after

    def forecasting(self, projected: torch.Tensor, present: torch.Tensor, starts: torch.Tensor,
                    targets: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """SmartPretrain's cross-window reconstruction loss for the present agents' ``projected (P, dim)``."""
        positions, scored, after = targets
        sample = torch.nonzero(present)[:, 0]
        start = self.start_embedding[starts[sample, 0]]
        deltas = self.decoder(torch.cat([projected, start], dim=-1)).view(len(sample), self.track_steps, 2)
        predicted = torch.cumsum(deltas * after[sample][..., None], dim=1)  # summed from the first step after
        mask = scored[present].to(deltas.dtype)
        error = F.smooth_l1_loss(predicted, positions[present], reduction="none").sum(-1) * mask
        counts = mask.sum(0)
        per_step = error.sum(0)[counts > 0] / counts[counts > 0]
        return per_step.mean() if len(per_step) else projected.sum() * 0.0

    # ------------------------------------------------------------------------------- objective
    def windows(self, batch: Batch, generator: torch.Generator | None = None):
        """The two views and what the forecast needs: ``(views, track, valid, starts)``."""
        track = torch.cat([batch.history, batch.future], dim=2)
        valid = torch.cat([batch.history_valid, batch.future_valid], dim=2) & batch.box_mask[..., None]
        starts = draw_windows(track.shape[2], self.window, batch.batch_size, generator).to(track.device)
        views = tuple(TrackWindow(track, valid, starts[:, v], self.window, batch.box_mask, self.input_noise_m, generator)
                      for v in range(2))
        return views, track, valid, starts

    def _identities(self, batch: Batch) -> torch.Tensor:
        if self.exclude_same_object:
            return agent_identities(batch.sample_ids, batch.track_ids).to(batch.boxes.device)
        B, M = batch.track_ids.shape  # one identity per agent of a sample
        return torch.stack(torch.meshgrid(torch.arange(B), torch.arange(M), indexing="ij"), -1).to(batch.boxes.device)

    def _query(self, projected: torch.Tensor, query_win: TrackWindow, key_win: TrackWindow, ids: torch.Tensor):
        """Contrast of one direction: queries from ``query_win``'s agents also present in ``key_win``."""
        keys_own, keys_other = self.keys(query_win), self.keys(key_win)
        both = query_win.present & key_win.present
        rank_other = torch.cumsum(key_win.present.flatten(), 0) - 1
        chosen = both.flatten()
        queries = F.normalize(self.predictor(projected[both[query_win.present]]), dim=-1)
        positive = len(keys_own) + rank_other[chosen]  # its own first-window key is excluded by identity
        key_ids = torch.cat([ids[query_win.present], ids[key_win.present]])
        loss, top1 = self.contrast(queries, torch.cat([keys_own, keys_other]), ids[both], key_ids, positive)
        return loss, top1, keys_other, ids[key_win.present]

    def forward(self, batch: Batch) -> dict:
        if self.training:
            self.update_momentum_branch()
        views, track, valid, starts = self.windows(batch)
        ids = self._identities(batch)
        both = views[0].present & views[1].present
        # BatchNorm needs two rows in training; a batch with fewer agents trains nothing this step
        enough = int(both.sum()) >= 2 or not self.training
        directions = [(0, 1)] + ([(1, 0)] if self.direction == "symmetric" else [])
        contrastive, recon, tops, keys, key_ids = [], [], [], [], []
        for q, k in directions:
            win = views[q]
            hidden_steps = (segment_mask(win.present.shape, self.window, self.mask_steps).to(win.xy.device)
                            if self.reconstruction_mode == "inpaint" else None)
            embedding = self.embed(win, hidden_steps)
            if hidden_steps is not None:
                recon.append(self.inpainting(embedding, win, hidden_steps))
            if not enough:
                contrastive.append(embedding.sum() * 0.0)
                continue
            projected = self.projector(embedding[win.present])
            loss, top1, k_keys, k_ids = self._query(projected, win, views[k], ids)
            contrastive.append(loss)
            tops.append(top1)
            keys.append(k_keys)
            key_ids.append(k_ids)
            if self.reconstruction_mode == "forecast" and q == 0:
                recon.append(self.forecasting(projected, win.present, starts,
                                              self.forecast_targets(track, valid, starts, win)))
        if self.training and keys:
            self.enqueue(torch.cat(keys), torch.cat(key_ids))
        top1 = torch.cat(tops).float().mean() if tops else torch.tensor(float("nan"))
        reconstruction = sum(recon) / len(recon) if recon else contrastive[0] * 0.0
        return {
            "contrastive": self.contrastive_weight * sum(contrastive) / len(contrastive),
            "trajectory_reconstruction": self.reconstruction_weight * reconstruction,
            "log": {"positive_top1": top1.detach(), "agent_pairs": torch.tensor(float(both.sum())),
                    "momentum": torch.tensor(self.momentum())},
        }

    def export(self) -> dict[str, torch.Tensor]:
        """The momentum branch's encoder and interaction weights, named as in the prediction head."""
        return {f"{self.export_prefix}.{HEAD_NAMES[name]}.{key}": value.detach().clone()
                for name in HEAD_NAMES for key, value in self.momentum_branch[name].state_dict().items()}

    @property
    def export_groups(self) -> tuple[str, ...]:
        return tuple(f"{self.export_prefix}.{name}" for name in HEAD_NAMES.values())
