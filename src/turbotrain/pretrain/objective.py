"""Masked multi-agent (spatio-temporal) reconstruction: the pretraining objective.

Variants (``pretrain.variants.<name>.type``):

* ``ego_only``: BEV-MAE-style, the ego's own current cloud only; only the 3D encoder transfers.
* ``multi_agent``: CooPre, early-fused current cloud of all agents (ego + cooperators) in the ego
  frame, reconstructing every agent's points; only the 3D encoder transfers (as CooPre). As in
  CooPre's ``sparse_backbone_3d.py``, the decoder reads the 3D encoder's height-compressed map
  (``decode_from: encoder``): the BEV backbone is not run, so the part that transfers is the part
  that has to inpaint.
* ``spatiotemporal``: TurboTrain, the intermediate-fusion model over all H history steps; masking
  across time; the current frame is reconstructed from the temporally fused map and each history
  step from its multi-agent fused map (``decode_from: fused``: our extension transfers the BEV
  backbone, fusion and temporal parts, so they are what it trains); everything else is CooPre's
  (decoder, Chamfer, masking).
* ``trajectory``: SmartPretrain on the object tracks only (no LiDAR read), see
  :mod:`turbotrain.pretrain.trajectory`; the prediction head's track encoder and interaction transfer.
* ``lidar_trajectory``: ``spatiotemporal`` and ``trajectory`` together on the same batches, their
  losses summed (:class:`CombinedPretraining`); both sets of parts transfer.
"""
from __future__ import annotations

import torch
from torch import nn

from turbotrain.data.sample import Batch
from turbotrain.grid import Grid
from turbotrain.pretrain.chamfer import ChamferOptions, chamfer_loss
from turbotrain.pretrain.masking import MaskPlan, conceal_masked_voxels, plan_masking
from turbotrain.pretrain.transfer import group_state

SPATIOTEMPORAL_PARTS = ("encoder", "bev_backbone", "fusion", "temporal")

# What each variant reads from the fusion cache, which model groups it pretrains / transfers and
# where its decoder reads (``decode_from: auto``; see the module docstring).
VARIANT_INPUT = {
    "ego_only": {"fusion_mode": "none", "history": 1, "transfer": ("encoder",), "decode_from": "encoder"},
    "multi_agent": {"fusion_mode": "early", "history": 1, "transfer": ("encoder",), "decode_from": "encoder"},
    "spatiotemporal": {"fusion_mode": "intermediate", "history": None, "transfer": SPATIOTEMPORAL_PARTS,  # None: all cached steps
                       "decode_from": "fused"},
    # the trajectory objective names its own parts (TrajectorySSL.export_groups)
    "trajectory": {"fusion_mode": "tracks", "history": None, "transfer": ()},
    "lidar_trajectory": {"fusion_mode": "intermediate", "history": None, "transfer": SPATIOTEMPORAL_PARTS,
                         "decode_from": "fused"},
}
DECODE_FROM = ("encoder", "fused")


class ReconstructionDecoder(nn.Module):
    """CooPre's light decoder: one 3x3 conv (as wide as its input, BN, ReLU), then a 1x1 head giving
    ``points_per_cell`` xyz per cell."""

    def __init__(self, in_channels: int, points_per_cell: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or in_channels
        self.points_per_cell = points_per_cell
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True)
        )
        self.head = nn.Conv2d(hidden, points_per_cell * 3, 1)

    def forward(self, bev: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, H, W, points_per_cell, 3) offsets from each cell centre (metres)."""
        out = self.head(self.conv(bev))
        n, _, h, w = out.shape
        return out.view(n, self.points_per_cell, 3, h, w).permute(0, 3, 4, 1, 2)


class MaskedReconstruction(nn.Module):
    """Wraps a :class:`CooperativePnP` with a mask token and a decoder; ``forward`` returns the loss.

    The steps are public so tests and figures can hold the mask plan fixed: :meth:`draw_plan` ->
    :meth:`encode` (BEV maps of the masked input) -> :meth:`reconstruct` (points per masked cell).
    """

    tasks = ("reconstruction",)

    def __init__(self, model: nn.Module, grid: Grid, variant: dict, num_steps: int, vfe_channels: int,
                 decoder_channels: int, points_per_cell: int = 20, max_target_points: int = 64,
                 transfer: tuple[str, ...] = SPATIOTEMPORAL_PARTS, decode_from: str = "fused",
                 chamfer: ChamferOptions = ChamferOptions()):
        super().__init__()
        if decode_from not in DECODE_FROM:
            raise ValueError(f"decode_from must be one of {DECODE_FROM}, got {decode_from!r}")
        self.decode_from = decode_from
        self.chamfer = chamfer
        self.model = model
        self.export_groups = tuple(transfer)
        self.grid = grid
        self.mask_ratio = float(variant.get("mask_ratio", 0.7))
        self.temporal = variant.get("temporal_masking", "shared")
        self.num_steps = num_steps
        self.max_target_points = max_target_points
        self.mask_token = nn.Parameter(torch.zeros(vfe_channels))
        self.decoder = ReconstructionDecoder(decoder_channels, points_per_cell)

    def draw_plan(self, batch: Batch, generator: torch.Generator | None = None) -> MaskPlan:
        """Which cells to hide and their target points (global torch RNG unless ``generator``)."""
        return plan_masking(batch, self.grid, self.num_steps, self.mask_ratio, self.temporal,
                            self.max_target_points, generator)

    def _hide(self, batch: Batch, plan: MaskPlan):
        """The batch with the plan's points concealed, and the hook putting the mask token on its voxels."""
        masked = plan.voxel_masked[:, None]

        def hide_masked(features: torch.Tensor) -> torch.Tensor:
            return torch.where(masked, self.mask_token.to(features.dtype).expand_as(features), features)

        return conceal_masked_voxels(batch, self.grid, plan.voxel_masked), hide_masked

    def encode(self, batch: Batch, plan: MaskPlan) -> dict[str, torch.Tensor]:
        """``forward_bev`` outputs of ``batch`` with the plan's voxels hidden (placeholder points, mask token)."""
        return self.model.forward_bev(*self._hide(batch, plan))

    def reconstruct(self, batch: Batch, plan: MaskPlan) -> torch.Tensor:
        """(N, points_per_cell, 3) predicted offsets from the centre of each of ``plan.cells``."""
        if self.decode_from == "encoder":
            return self._reconstruct_from_encoder(batch, plan)
        bev = self.encode(batch, plan)
        maps = bev["step_bev"][:, -self.num_steps:].clone()  # (B, T, C, H, W)
        maps[:, -1] = bev["bev"]  # the present is reconstructed through temporal fusion
        b, t = maps.shape[:2]
        decoded = self.decoder(maps.flatten(0, 1)).view(b, t, *maps.shape[-2:], -1, 3)
        cells = plan.cells
        return decoded[cells[:, 0], cells[:, 1], cells[:, 2], cells[:, 3]]

    def _reconstruct_from_encoder(self, batch: Batch, plan: MaskPlan) -> torch.Tensor:
        """CooPre: decode each frame's encoder map; a cell's (sample, step) names its one frame, whose
        sensor frame is the ego frame (early fusion or the ego's own cloud; build_objective checks)."""
        maps = self.model.encoder_bev(*self._hide(batch, plan))
        if tuple(maps.shape[-2:]) != tuple(self.grid.bev_shape):
            raise ValueError(f"decode_from 'encoder': the encoder's map is {tuple(maps.shape[-2:])}, the masking "
                             f"grid {tuple(self.grid.bev_shape)} (grid.bev_stride must be the encoder's stride)")
        decoded = self.decoder(maps)  # (F, H, W, K, 3)
        step = batch.frame_step - (batch.frame_step.max() + 1 - self.num_steps)
        frame_of = torch.full((batch.batch_size * self.num_steps,), -1, dtype=torch.long, device=maps.device)
        present = step >= 0
        frame_of[(batch.frame_sample * self.num_steps + step)[present]] = torch.nonzero(present).flatten().to(maps.device)
        cells = plan.cells
        return decoded[frame_of[cells[:, 0] * self.num_steps + cells[:, 1]], cells[:, 2], cells[:, 3]]

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        plan = self.draw_plan(batch)
        pred = self.reconstruct(batch, plan)
        loss = chamfer_loss(pred, None, plan.target, plan.target_mask, self.chamfer, self.grid.voxel_size)
        return {
            "reconstruction": loss,
            "log": {
                "masked_cells": torch.tensor(float(len(plan.cells))),
                "masked_share": torch.tensor(len(plan.cells) / max(plan.nonempty_cells, 1)),
            },
        }

    def export(self) -> dict[str, torch.Tensor]:
        """The pretrained tensors of the transferred model parts, named as in the model."""
        return group_state(self.model, self.export_groups)


class CombinedPretraining(nn.Module):
    """Several objectives over the same batch (and the same model): their task losses side by side.

    Task names must differ, so the engine's balancer (a plain sum for pretraining) sees each term and
    the scalar log keeps them apart.
    """

    def __init__(self, *objectives: nn.Module):
        super().__init__()
        self.objectives = nn.ModuleList(objectives)
        self.tasks = tuple(t for o in objectives for t in o.tasks)
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"objectives share task names: {self.tasks}")
        self.export_groups = tuple(g for o in objectives for g in o.export_groups)

    def forward(self, batch: Batch) -> dict:
        losses, log = {}, {}
        for objective in self.objectives:
            out = dict(objective(batch))
            log.update(out.pop("log", {}))
            losses.update(out)
        return {**losses, "log": log}

    def export(self) -> dict[str, torch.Tensor]:
        return {k: v for o in self.objectives for k, v in o.export().items()}
