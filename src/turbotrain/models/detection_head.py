"""CenterPoint-style multi-class rotated-box detection head on the fused BEV map.

Per class a heatmap of object centres (Gaussian focal loss, CenterNet's penalty-reduced variant);
at each centre cell an 8-channel regression ``[dx, dy, z, log l, log w, log h, sin yaw, cos yaw]``
(L1) and a 2-bin heading-direction classification. Decoding takes 3x3 local maxima, the top-k over
all classes, a score threshold, and class-wise rotated NMS (:func:`rotated_nms`).

The direction bin follows SECOND: the regressed yaw fixes the box axis, the bin picks which of the
two opposite headings along that axis is meant. Bin edges sit at ``DIR_OFFSET`` (45 deg) so the
common axis-aligned headings are far from an edge.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from turbotrain.grid import Grid
from turbotrain.models.bev_backbone import conv_bn_relu
from turbotrain.models.registry import DETECTION_HEADS
from turbotrain.ops.rotated_iou import rotated_nms

REGRESSION_CHANNELS = 8
DIR_OFFSET = math.pi / 4
# CenterNet's prior: initial heatmap probability ~0.1 so the focal loss starts balanced.
HEATMAP_PRIOR_BIAS = -2.19


@dataclass
class CenterTargets:
    heatmap: torch.Tensor  # (B, K, H, W) float Gaussian peaks
    positive: torch.Tensor  # (B, K, H, W) bool centre cells
    cell_index: torch.Tensor  # (B, M) long flat index row * W + col
    regression: torch.Tensor  # (B, M, 8)
    direction: torch.Tensor  # (B, M) long bin
    mask: torch.Tensor  # (B, M) bool box exists and its centre is on the map


def gaussian_radius(length: torch.Tensor, width: torch.Tensor, min_overlap: float) -> torch.Tensor:
    """CornerNet/CenterNet radius (cells) so that a box shifted by it keeps IoU >= ``min_overlap``."""
    a1, b1 = 1.0, length + width
    c1 = width * length * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + torch.sqrt(b1**2 - 4 * a1 * c1)) / 2
    a2, b2 = 4.0, 2 * (length + width)
    c2 = (1 - min_overlap) * width * length
    r2 = (b2 + torch.sqrt(b2**2 - 4 * a2 * c2)) / 2
    a3, b3 = 4 * min_overlap, -2 * min_overlap * (length + width)
    c3 = (min_overlap - 1) * width * length
    r3 = (b3 + torch.sqrt(b3**2 - 4 * a3 * c3)) / 2
    return torch.minimum(torch.minimum(r1, r2), r3)


def direction_bin(yaw: torch.Tensor) -> torch.Tensor:
    """0/1 heading bin of ``yaw`` (radians), edges at ``DIR_OFFSET`` and ``DIR_OFFSET + pi``."""
    return (torch.remainder(yaw - DIR_OFFSET, 2 * math.pi) >= math.pi).long()


def decode_yaw(sin_yaw: torch.Tensor, cos_yaw: torch.Tensor, bin_: torch.Tensor) -> torch.Tensor:
    """Regressed axis + direction bin -> yaw in [-pi, pi)."""
    axis = torch.remainder(torch.atan2(sin_yaw, cos_yaw) - DIR_OFFSET, math.pi)
    yaw = axis + DIR_OFFSET + math.pi * bin_
    return torch.remainder(yaw + math.pi, 2 * math.pi) - math.pi


class CenterTargetBuilder:
    """Turns padded GT boxes into heatmaps and per-box regression targets on ``grid``'s BEV map."""

    def __init__(self, grid: Grid, num_classes: int, min_radius: int, min_overlap: float = 0.1):
        self.grid = grid
        self.num_classes = num_classes
        self.min_radius = min_radius
        self.min_overlap = min_overlap

    def __call__(self, boxes: torch.Tensor, classes: torch.Tensor, box_mask: torch.Tensor) -> CenterTargets:
        rows, cols = self.grid.bev_shape
        cell_x, cell_y = self.grid.bev_cell
        x_min, y_min = self.grid.point_cloud_range[0], self.grid.point_cloud_range[1]
        col_f = (boxes[..., 0] - x_min) / cell_x
        row_f = (boxes[..., 1] - y_min) / cell_y
        col, row = col_f.floor().long(), row_f.floor().long()
        inside = (col >= 0) & (col < cols) & (row >= 0) & (row < rows)
        mask = box_mask & inside & (classes >= 0) & (classes < self.num_classes)
        col, row = col.clamp(0, cols - 1), row.clamp(0, rows - 1)
        heatmap, positive = self._heatmaps(boxes, classes, mask, row, col)
        yaw = boxes[..., 6]
        regression = torch.stack(
            [col_f - col, row_f - row, boxes[..., 2], *torch.log(boxes[..., 3:6].clamp_min(1e-3)).unbind(-1),
             torch.sin(yaw), torch.cos(yaw)],
            dim=-1,
        )
        return CenterTargets(heatmap, positive, row * cols + col, regression, direction_bin(yaw), mask)

    def _heatmaps(self, boxes, classes, mask, row, col) -> tuple[torch.Tensor, torch.Tensor]:
        """Class heatmaps: per class the max over its boxes of a truncated Gaussian at the centre cell."""
        B, M = mask.shape
        rows, cols = self.grid.bev_shape
        cell_x, cell_y = self.grid.bev_cell
        radius = gaussian_radius(boxes[..., 3] / cell_x, boxes[..., 4] / cell_y, self.min_overlap)
        radius = radius.floor().clamp_min(self.min_radius)  # pedestrians smaller than a cell still get a peak area
        sigma = (2 * radius + 1) / 6
        d_row = torch.arange(rows, device=boxes.device)[None, None, :, None] - row[..., None, None]
        d_col = torch.arange(cols, device=boxes.device)[None, None, None, :] - col[..., None, None]
        r = radius[..., None, None]
        window = (d_row.abs() <= r) & (d_col.abs() <= r) & mask[..., None, None]
        gauss = torch.exp(-(d_row**2 + d_col**2) / (2 * sigma[..., None, None] ** 2)) * window
        index = classes.clamp(0, self.num_classes - 1)[..., None, None].expand(B, M, rows, cols)
        heatmap = boxes.new_zeros(B, self.num_classes, rows, cols).scatter_reduce(1, index, gauss, reduce="amax")
        centre = ((d_row == 0) & (d_col == 0) & mask[..., None, None]).to(boxes.dtype)
        positive = boxes.new_zeros(B, self.num_classes, rows, cols).scatter_reduce(1, index, centre, reduce="amax")
        return heatmap, positive > 0


def gaussian_focal_loss(logits: torch.Tensor, target: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """CenterNet focal loss (alpha 2, beta 4), normalised by the number of centres."""
    log_p, log_not_p = F.logsigmoid(logits), F.logsigmoid(-logits)
    p = torch.sigmoid(logits)
    pos_loss = -((1 - p) ** 2 * log_p)[positive].sum()
    neg_weight = (1 - target) ** 4 * p**2
    neg_loss = -(neg_weight * log_not_p)[~positive].sum()
    return (pos_loss + neg_loss) / positive.sum().clamp_min(1)


@DETECTION_HEADS.register("center")
class CenterHead(nn.Module):
    """Class heatmaps + box regression + direction bins; see the module docstring."""

    def __init__(
        self,
        in_channels: int,
        grid: Grid,
        num_classes: int,
        head_channels: int = 64,
        min_radius: int = 2,
        regression_weight: float = 0.25,
        direction_weight: float = 0.2,
    ):
        super().__init__()
        self.grid = grid
        self.num_classes = num_classes
        self.regression_weight = regression_weight
        self.direction_weight = direction_weight
        self.targets = CenterTargetBuilder(grid, num_classes, min_radius)
        self.shared = conv_bn_relu(in_channels, head_channels)
        self.heatmap = nn.Sequential(conv_bn_relu(head_channels, head_channels), nn.Conv2d(head_channels, num_classes, 1))
        self.regression = nn.Sequential(
            conv_bn_relu(head_channels, head_channels), nn.Conv2d(head_channels, REGRESSION_CHANNELS, 1)
        )
        self.direction = nn.Sequential(conv_bn_relu(head_channels, head_channels), nn.Conv2d(head_channels, 2, 1))
        nn.init.constant_(self.heatmap[-1].bias, HEATMAP_PRIOR_BIAS)

    def forward(self, bev: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.shared(bev)
        return {"heatmap": self.heatmap(x), "regression": self.regression(x), "direction": self.direction(x)}

    def loss(self, outputs: dict, boxes: torch.Tensor, classes: torch.Tensor, box_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """``heatmap``, ``regression``, ``direction`` terms and their weighted ``total``."""
        t = self.targets(boxes, classes, box_mask)
        heatmap = gaussian_focal_loss(outputs["heatmap"], t.heatmap, t.positive)
        num_boxes = t.mask.sum().clamp_min(1)
        reg = _gather_cells(outputs["regression"], t.cell_index)  # (B, M, 8)
        regression = ((reg - t.regression).abs().sum(-1) * t.mask).sum() / num_boxes
        dir_logits = _gather_cells(outputs["direction"], t.cell_index)
        direction = (F.cross_entropy(dir_logits.transpose(1, 2), t.direction, reduction="none") * t.mask).sum() / num_boxes
        total = heatmap + self.regression_weight * regression + self.direction_weight * direction
        return {"heatmap": heatmap, "regression": regression, "direction": direction, "total": total}

    @torch.no_grad()
    def decode(
        self, outputs: dict, score_threshold: float = 0.2, nms_iou: float = 0.15, max_detections: int = 100
    ) -> list[dict[str, np.ndarray]]:
        """Per sample ``boxes (N, 7) float32``, ``scores (N,)``, ``classes (N,) int64`` after NMS."""
        scores = torch.sigmoid(outputs["heatmap"])
        peaks = scores * (scores == F.max_pool2d(scores, 3, stride=1, padding=1))
        B, K, H, W = peaks.shape
        top_scores, top_index = peaks.view(B, -1).topk(min(4 * max_detections, K * H * W), dim=1)
        results = []
        for b in range(B):
            keep = top_scores[b] > score_threshold
            flat = top_index[b][keep]
            cls, cell = flat // (H * W), flat % (H * W)
            boxes = self._decode_boxes(outputs["regression"][b], outputs["direction"][b], cell, W)
            results.append(
                _classwise_nms(boxes.cpu().numpy(), top_scores[b][keep].cpu().numpy(), cls.cpu().numpy(), nms_iou, max_detections)
            )
        return results

    def _decode_boxes(self, regression: torch.Tensor, direction: torch.Tensor, cell: torch.Tensor, width: int) -> torch.Tensor:
        """(N, 7) boxes from one sample's maps at flat ``cell`` indices."""
        reg = regression.flatten(1)[:, cell].T  # (N, 8)
        bins = direction.flatten(1)[:, cell].argmax(0)
        cell_x, cell_y = self.grid.bev_cell
        x = self.grid.point_cloud_range[0] + ((cell % width).to(reg.dtype) + reg[:, 0]) * cell_x
        y = self.grid.point_cloud_range[1] + ((cell // width).to(reg.dtype) + reg[:, 1]) * cell_y
        sizes = torch.exp(reg[:, 3:6].clamp(max=6.0))  # clamp: an untrained head must not overflow exp
        yaw = decode_yaw(reg[:, 6], reg[:, 7], bins)
        return torch.cat([x[:, None], y[:, None], reg[:, 2:3], sizes, yaw[:, None]], dim=1)


def _gather_cells(maps: torch.Tensor, cell_index: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) maps at (B, M) flat cells -> (B, M, C)."""
    B, C = maps.shape[:2]
    flat = maps.reshape(B, C, -1)
    return flat.gather(2, cell_index[:, None, :].expand(B, C, cell_index.shape[1])).transpose(1, 2)


def _classwise_nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou: float, max_keep: int) -> dict:
    keep = np.concatenate(
        [np.flatnonzero(classes == c)[rotated_nms(boxes[classes == c], scores[classes == c], iou)] for c in np.unique(classes)]
        + [np.zeros(0, np.int64)]
    ).astype(np.int64)
    keep = keep[np.argsort(-scores[keep], kind="stable")][:max_keep]
    return {
        "boxes": boxes[keep].astype(np.float32).reshape(-1, 7),
        "scores": scores[keep].astype(np.float32),
        "classes": classes[keep].astype(np.int64),
    }
