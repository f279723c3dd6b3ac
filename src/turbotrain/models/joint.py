"""The joint cooperative perception-and-prediction model, assembled from named parts.

Data flow for a :class:`~turbotrain.data.sample.Batch` of F agent-frames:
encoder (sparse voxels -> per-frame BEV) -> BEV backbone (per frame) -> warp into the ego frame at
the current time -> multi-agent fusion per (sample, step) -> temporal fusion over steps ->
detection head on the fused map and prediction head on the per-step and fused maps.
"""
from __future__ import annotations

import importlib
from typing import Callable

import numpy as np
import torch
from torch import nn

from turbotrain.data.sample import Batch
from turbotrain.grid import Grid
from turbotrain.models.presets import part_config
from turbotrain.models.registry import BEV_BACKBONES, DETECTION_HEADS, ENCODERS, FUSERS, PREDICTION_HEADS, TEMPORAL
from turbotrain.models.warp import map_extent, warp_to_ego

# Importing these modules registers their parts by name.
from turbotrain.models import anchor_head, bev_backbone, detection_head, fusion, prediction_head, temporal, v2xvit  # noqa: F401

FeatureHook = Callable[[torch.Tensor], torch.Tensor]
PART_GROUPS = ("encoder", "bev_backbone", "fusion", "temporal", "detection_head", "prediction_head")
SHARED_GROUPS = ("encoder", "bev_backbone", "fusion", "temporal")


def build_encoder(cfg: dict, grid: Grid, size: str) -> nn.Module:
    """``ENCODERS.build`` after importing the encoders package, which registers them."""
    importlib.import_module("turbotrain.models.encoders")
    options = {k: v for k, v in cfg.items() if k != "name"}
    if cfg["name"] == "pointpillars":
        options.pop("backend", None)  # pillars scatter to a dense canvas: no sparse-conv backend to pick
    return ENCODERS.build(cfg["name"], grid=grid, size=size, **options)


class CooperativePnP(nn.Module):
    """Joint detection + motion prediction over cooperating agents and history steps.

    ``model_cfg`` names each part (``{"encoder": {"name": "second", ...}, "fusion": {"name":
    "attfuse"}, ...}``) plus ``size`` (tiny|paper, see :mod:`presets`); extra keys override the
    preset. ``encoder`` may be given directly instead of being built from ``model_cfg["encoder"]``.
    """

    def __init__(
        self,
        model_cfg: dict,
        grid: Grid,
        classes: list[str],
        history: int,
        future: int,
        encoder: nn.Module | None = None,
    ):
        super().__init__()
        size = model_cfg.get("size", "tiny")
        self.grid, self.classes, self.history, self.future = grid, list(classes), int(history), int(future)
        self.encoder = encoder if encoder is not None else build_encoder(model_cfg["encoder"], grid, size)
        self.bev_backbone = _build(BEV_BACKBONES, model_cfg, "bev_backbone", size, in_channels=self.encoder.out_channels)
        channels = self.bev_backbone.out_channels
        self.fusion = _build(FUSERS, model_cfg, "fusion", size, channels=channels)
        self.temporal = _build(TEMPORAL, model_cfg, "temporal", size, channels=channels, history=self.history)
        self.detection_head = _build(
            DETECTION_HEADS, model_cfg, "detection_head", size, in_channels=channels, grid=grid, num_classes=len(classes)
        )
        self.prediction_head = _build(
            PREDICTION_HEADS, model_cfg, "prediction_head", size,
            in_channels=channels, grid=grid, num_classes=len(classes), future=self.future, history=self.history,
        )

    # ----------------------------------------------------------------------------------- forward
    def encoder_bev(self, batch: Batch, feature_hook: FeatureHook | None = None) -> torch.Tensor:
        """``(F, C, H, W)``: each frame's height-compressed 3D-encoder map, in its own sensor frame,
        before the BEV backbone (what CooPre's decoder reads)."""
        features = self.encoder.voxel_features(batch.voxels, batch.num_points)
        if feature_hook is not None:
            features = feature_hook(features)
        return self.encoder.forward_features(features, batch.coords, len(batch.frame_sample))

    def forward_bev(self, batch: Batch, feature_hook: FeatureHook | None = None) -> dict[str, torch.Tensor]:
        """``step_bev (B, T, C, H, W)``, ``step_valid (B, T)``, ``bev (B, C, H, W)``.

        ``feature_hook`` maps the encoder's voxel features ``(V, C) -> (V, C)`` (masked pretraining).
        A per-scale fuser (``attfuse``) fuses every backbone stage's output before upsampling, the
        next stage reading unfused features (OpenCOOD's AttBEVBackbone); other fusers fuse the
        backbone's output once.
        """
        encoded = self.encoder_bev(batch, feature_hook)
        if getattr(self.fusion, "per_scale", False):
            height, width = encoded.shape[-2:]
            stride = self.bev_backbone.total_stride
            extent = map_extent(self.grid, -(-height // stride) * stride, -(-width // stride) * stride)
            fused_scales = [self._fuse(scale, batch, extent) for scale in self.bev_backbone.scales(encoded)]
            fused = self.bev_backbone.merge([f for f, _ in fused_scales], height, width)
            step_valid = fused_scales[0][1]
        else:
            fused, step_valid = self._fuse(self.bev_backbone(encoded), batch)
        B, T = batch.batch_size, self.history
        step_bev = fused.view(B, T, *fused.shape[1:])
        return {"step_bev": step_bev, "step_valid": step_valid, "bev": self.temporal(step_bev, step_valid)}

    def _fuse(self, frame_maps: torch.Tensor, batch: Batch, extent=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-frame maps ``(F, C, h, w)`` -> warped into the ego frame and fused per (sample, step):
        ``(B*T, C, h, w)`` and ``step_valid (B, T)``."""
        warped, valid = warp_to_ego(frame_maps, batch.frame_pose_to_ego, self.grid, extent)
        agents, agent_valid, agent_types = self._agent_slots(warped, valid, batch)
        B, T, A = batch.batch_size, self.history, agents.shape[0] // (batch.batch_size * self.history)
        fused = self.fusion(
            agents.view(B * T, A, *agents.shape[1:]),
            agent_valid.view(B * T, A, *agent_valid.shape[1:]),
            agent_types.view(B * T, A),
        )
        return fused, agent_valid.view(B, T, -1).any(dim=-1)

    def _agent_slots(self, warped: torch.Tensor, valid: torch.Tensor, batch: Batch):
        """Scatter frames into dense ``(B*T*A, ...)`` slots by (sample, step, agent); empty slots invalid."""
        if len(batch.frame_step) and int(batch.frame_step.max()) >= self.history:
            raise ValueError(f"batch has history step {int(batch.frame_step.max())} but the model was built for {self.history}")
        B, T = batch.batch_size, self.history
        A = int(batch.frame_agent.max()) + 1 if len(batch.frame_agent) else 1
        device = warped.device
        slot = ((batch.frame_sample * T + batch.frame_step) * A + batch.frame_agent).to(device)
        agents = warped.new_zeros(B * T * A, *warped.shape[1:]).index_copy(0, slot, warped)
        agent_valid = torch.zeros(B * T * A, *valid.shape[1:], dtype=torch.bool, device=device).index_copy(0, slot, valid)
        types = torch.zeros(B * T * A, dtype=torch.long, device=device).index_copy(0, slot, batch.frame_agent_type.to(device))
        return agents, agent_valid, types

    def forward(self, batch: Batch) -> dict:
        """BEV maps, raw detection maps, and trajectories for the GT boxes (the training queries)."""
        out = self.forward_bev(batch)
        out["detection"] = self.detection_head(out["bev"])
        out["prediction"] = self.prediction_head(out["step_bev"], out["bev"], batch.boxes, batch.classes, batch.box_mask)
        return out

    def losses(self, outputs: dict, batch: Batch) -> dict[str, torch.Tensor]:
        """``detection`` and ``prediction`` task losses plus their terms as ``<task>/<term>``."""
        det = self.detection_head.loss(outputs["detection"], batch.boxes, batch.classes, batch.box_mask)
        pred = self.prediction_head.loss(outputs["prediction"], batch.boxes, batch.box_mask, batch.future, batch.future_valid,
                                         batch.history, batch.history_valid)
        terms = {f"detection/{k}": v for k, v in det.items() if k != "total"}
        terms.update({f"prediction/{k}": v for k, v in pred.items() if k != "total"})
        return {"detection": det["total"], "prediction": pred["total"], **terms}

    # ----------------------------------------------------------------------------------- inference
    def predict(
        self, batch: Batch, score_threshold: float = 0.2, nms_iou: float = 0.15, max_detections: int = 100
    ) -> list[dict[str, np.ndarray]]:
        """Detections and their K trajectories (absolute ego-frame xy) per sample, in eval mode."""
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                bev = self.forward_bev(batch)
                detections = self.detection_head.decode(self.detection_head(bev["bev"]), score_threshold, nms_iou, max_detections)
                boxes, classes, real = _pad_queries(detections, bev["bev"].device)
                pred = self.prediction_head(bev["step_bev"], bev["bev"], boxes, classes, real)
        finally:
            self.train(was_training)
        return [_sample_prediction(det, pred, b) for b, det in enumerate(detections)]

    # ----------------------------------------------------------------------------------- parameters
    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters per part: encoder, bev_backbone, fusion, temporal, detection_head, prediction_head."""
        return {name: list(getattr(self, name).parameters()) for name in PART_GROUPS}

    def shared_parameters(self) -> list[nn.Parameter]:
        """Parameters both tasks backpropagate through (encoder, backbone, fusion, temporal)."""
        groups = self.parameter_groups()
        return [p for name in SHARED_GROUPS for p in groups[name]]

    def task_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Task-specific parameters: ``{"detection": head params, "prediction": head params}``."""
        groups = self.parameter_groups()
        return {"detection": groups["detection_head"], "prediction": groups["prediction_head"]}


def _build(registry, model_cfg: dict, part: str, size: str, **required) -> nn.Module:
    cfg = model_cfg.get(part)
    if not cfg or "name" not in cfg:
        raise KeyError(f"model config needs '{part}: {{name: ...}}'; choices: {registry.names()}")
    return registry.build(cfg["name"], **required, **part_config(size, part, cfg))


def _pad_queries(detections: list[dict], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Detections as padded ``(B, Q, 7)`` boxes, ``(B, Q)`` classes and ``(B, Q)`` real-query mask;
    Q >= 1 so the GRU has input."""
    Q = max([len(d["boxes"]) for d in detections] + [1])
    boxes = torch.zeros(len(detections), Q, 7, device=device)
    classes = torch.zeros(len(detections), Q, dtype=torch.long, device=device)
    real = torch.zeros(len(detections), Q, dtype=torch.bool, device=device)
    for b, det in enumerate(detections):
        n = len(det["boxes"])
        boxes[b, :n] = torch.from_numpy(det["boxes"]).to(device)
        classes[b, :n] = torch.from_numpy(det["classes"]).to(device)
        real[b, :n] = True
    return boxes, classes, real


def _sample_prediction(det: dict, pred: dict, b: int) -> dict[str, np.ndarray]:
    n = len(det["boxes"])
    offsets = pred["trajectories"][b, :n].cpu().numpy()
    centres = det["boxes"][:, None, None, :2]
    return {
        **det,
        "trajectories": (centres + offsets).astype(np.float32),
        "mode_probs": torch.softmax(pred["logits"][b, :n], dim=-1).cpu().numpy().astype(np.float32),
    }
