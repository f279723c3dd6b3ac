"""OpenCOOD / CooPre's anchor detection head on the fused BEV map (registered as ``anchor``).

As ``opencood/models/second_intermediate.py`` (CooPre's 3-class variant): two 1x1 convs on the BEV
map, a classification map with ``A * K * K`` channels (A rotations per cell for each of the K
classes' anchors, each anchor scoring all K classes) and a regression map with ``7 * A * K``.
Targets follow ``voxel_postprocessor.generate_label``: every class matches its own anchors only, on
the axis-aligned ("standup") BEV IoU of anchors and boxes; an anchor is positive above the class's
matched threshold and negative when below its unmatched threshold for every box, and each box's
best anchor is positive whatever its IoU. The loss is ``point_pillar_loss``: sigmoid focal loss
(alpha 0.25, gamma 2) over anchors that are positive or negative, smooth-L1 (beta 1/9) on the box
deltas with OpenCOOD's sin-difference for yaw, both normalised by the positives of the sample. No
direction classifier, as OpenCOOD: the sin-difference leaves the heading ambiguous by pi.

Boxes are ours ``[x, y, z, l, w, h, yaw]``; OpenCOOD's are ``hwl``. The deltas are the same numbers
(x, y over the anchor's BEV diagonal, z over its height, log size ratios, yaw difference), only the
three size codes are listed in our order, which an equally weighted smooth-L1 sum does not see.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from turbotrain.grid import Grid
from turbotrain.models.registry import DETECTION_HEADS
from turbotrain.ops.rotated_iou import rotated_nms

BOX_CODES = 7
# An untrained head can regress huge log-size deltas; exp must not overflow at decoding.
MAX_LOG_SIZE_DELTA = 4.0


def anchor_boxes(grid: Grid, sizes: list[list[float]], z: list[float], rotations: list[float]) -> torch.Tensor:
    """``(H, W, K, A, 7)`` anchors: per BEV cell centre (OpenCOOD's ``align_center``), class, rotation."""
    xs, ys = (torch.as_tensor(v, dtype=torch.float32) for v in grid.bev_cell_centers())
    rows, cols, K, A = len(ys), len(xs), len(sizes), len(rotations)
    anchors = torch.zeros(rows, cols, K, A, BOX_CODES)
    anchors[..., 0] = xs[None, :, None, None]
    anchors[..., 1] = ys[:, None, None, None]
    anchors[..., 2] = torch.as_tensor(z, dtype=torch.float32)[:, None]
    anchors[..., 3:6] = torch.as_tensor(sizes, dtype=torch.float32)[:, None, :]
    anchors[..., 6] = torch.as_tensor(rotations, dtype=torch.float32)
    return anchors


def standup_boxes(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) axis-aligned BEV hull ``[x1, y1, x2, y2]`` of rotated ``[x, y, z, l, w, h, yaw]`` boxes."""
    c, s = torch.cos(boxes[..., 6]).abs(), torch.sin(boxes[..., 6]).abs()
    half_x = 0.5 * (boxes[..., 3] * c + boxes[..., 4] * s)
    half_y = 0.5 * (boxes[..., 3] * s + boxes[..., 4] * c)
    x, y = boxes[..., 0], boxes[..., 1]
    return torch.stack([x - half_x, y - half_y, x + half_x, y + half_y], dim=-1)


def standup_iou(a: torch.Tensor, b: torch.Tensor, offset: float = 1.0) -> torch.Tensor:
    """(N, M) IoU of axis-aligned boxes; ``offset`` is added to every extent, as OpenCOOD's
    ``box_overlaps.pyx`` (Fast R-CNN's pixel ``+ 1``, applied there to metres).

    Hand-written: torchvision's ``box_iou`` is not in this environment and has no offset.
    """
    wh = (torch.minimum(a[:, None, 2:], b[None, :, 2:]) - torch.maximum(a[:, None, :2], b[None, :, :2]) + offset).clamp_min(0)
    inter = wh[..., 0] * wh[..., 1]
    area_a = (a[:, 2] - a[:, 0] + offset) * (a[:, 3] - a[:, 1] + offset)
    area_b = (b[:, 2] - b[:, 0] + offset) * (b[:, 3] - b[:, 1] + offset)
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def match_anchors(iou: torch.Tensor, matched: float, unmatched: float) -> tuple[torch.Tensor, torch.Tensor]:
    """OpenCOOD's assignment for one class: ``(N,)`` labels 1 / 0 / -1 (positive, negative, ignored)
    and ``(N,)`` the box index of each positive.

    A box's best anchor is positive when its IoU is > 0; an anchor over ``matched`` takes the first
    such box, a forced anchor the lowest-index box it is best for (``np.unique``'s first occurrence).
    """
    N, M = iou.shape
    labels = torch.full((N,), -1, dtype=torch.long, device=iou.device)
    gt_index = torch.zeros(N, dtype=torch.long, device=iou.device)
    if M == 0:
        return labels.fill_(0), gt_index
    labels[(iou < unmatched).all(dim=1)] = 0
    over = iou > matched
    box_ids = torch.arange(M, device=iou.device)
    best_anchor = iou.argmax(dim=0)
    has_overlap = iou[best_anchor, box_ids] > 0
    forced_box = torch.full((N,), M, dtype=torch.long, device=iou.device).scatter_reduce(
        0, best_anchor[has_overlap], box_ids[has_overlap], reduce="amin"
    )
    forced = forced_box < M
    by_threshold = over.any(dim=1)
    gt_index = torch.where(by_threshold, over.long().argmax(dim=1), forced_box.clamp_max(M - 1))
    positive = by_threshold | forced
    labels[positive] = 1
    return labels, torch.where(positive, gt_index, 0)


def encode_boxes(boxes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """OpenCOOD's deltas of ``boxes`` against same-shaped ``anchors`` (see the module docstring)."""
    diagonal = torch.hypot(anchors[..., 3], anchors[..., 4])
    return torch.stack(
        [(boxes[..., 0] - anchors[..., 0]) / diagonal, (boxes[..., 1] - anchors[..., 1]) / diagonal,
         (boxes[..., 2] - anchors[..., 2]) / anchors[..., 5],
         *torch.log(boxes[..., 3:6].clamp_min(1e-3) / anchors[..., 3:6]).unbind(-1),
         boxes[..., 6] - anchors[..., 6]],
        dim=-1,
    )


def decode_boxes(deltas: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`encode_boxes` (OpenCOOD's ``delta_to_boxes3d``); yaw wrapped to [-pi, pi)."""
    diagonal = torch.hypot(anchors[..., 3], anchors[..., 4])
    xy = deltas[..., :2] * diagonal[..., None] + anchors[..., :2]
    z = deltas[..., 2] * anchors[..., 5] + anchors[..., 2]
    sizes = torch.exp(deltas[..., 3:6].clamp(max=MAX_LOG_SIZE_DELTA)) * anchors[..., 3:6]
    yaw = torch.remainder(deltas[..., 6] + anchors[..., 6] + math.pi, 2 * math.pi) - math.pi
    return torch.cat([xy, z[..., None], sizes, yaw[..., None]], dim=-1)


def sigmoid_focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """Element-wise focal loss on sigmoid probabilities (``point_pillar_loss.cls_loss_func``)."""
    p = torch.sigmoid(logits)
    alpha_weight = target * alpha + (1 - target) * (1 - alpha)
    pt = target * (1 - p) + (1 - target) * p
    return alpha_weight * pt.pow(gamma) * F.binary_cross_entropy_with_logits(logits, target, reduction="none")


def sin_difference(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """OpenCOOD's ``add_sin_difference``: yaw codes become sin(a)cos(b) and cos(a)sin(b)."""
    a, b = pred[..., 6:7], target[..., 6:7]
    return (torch.cat([pred[..., :6], torch.sin(a) * torch.cos(b)], dim=-1),
            torch.cat([target[..., :6], torch.cos(a) * torch.sin(b)], dim=-1))


def smooth_l1(diff: torch.Tensor, beta: float) -> torch.Tensor:
    """fvcore's smooth-L1 as ``WeightedSmoothL1Loss``: quadratic below ``beta``, linear above."""
    n = diff.abs()
    return torch.where(n < beta, 0.5 * n**2 / beta, n - 0.5 * beta)


@DETECTION_HEADS.register("anchor")
class AnchorHead(nn.Module):
    """1x1 classification and regression convs over per-class anchors; see the module docstring.

    ``anchor_sizes`` (``[l, w, h]``), ``anchor_z`` and both thresholds have one entry per class in
    the order of ``classes`` (the presets carry CooPre's car / pedestrian / truck settings).
    """

    def __init__(
        self,
        in_channels: int,
        grid: Grid,
        num_classes: int,
        anchor_sizes: list[list[float]],
        anchor_z: list[float],
        rotations: list[float],
        matched_thresholds: list[float],
        unmatched_thresholds: list[float],
        cls_weight: float = 1.0,
        reg_weight: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        smooth_l1_beta: float = 1.0 / 9.0,
        standup_iou_offset: float = 1.0,
        pre_nms_max: int = 1000,
    ):
        super().__init__()
        per_class = {"anchor_sizes": anchor_sizes, "anchor_z": anchor_z, "matched_thresholds": matched_thresholds,
                     "unmatched_thresholds": unmatched_thresholds}
        for key, values in per_class.items():
            if len(values) != num_classes:
                raise ValueError(f"anchor head: {key} has {len(values)} entries for {num_classes} classes")
        self.grid, self.num_classes, self.num_rotations = grid, num_classes, len(rotations)
        self.matched, self.unmatched = list(matched_thresholds), list(unmatched_thresholds)
        self.cls_weight, self.reg_weight = cls_weight, reg_weight
        self.focal_alpha, self.focal_gamma, self.beta = focal_alpha, focal_gamma, smooth_l1_beta
        self.standup_iou_offset, self.pre_nms_max = standup_iou_offset, pre_nms_max
        self.register_buffer("anchors", anchor_boxes(grid, anchor_sizes, anchor_z, rotations), persistent=False)
        anchors_per_cell = self.num_rotations * num_classes
        self.cls_head = nn.Conv2d(in_channels, anchors_per_cell * num_classes, 1)
        self.reg_head = nn.Conv2d(in_channels, anchors_per_cell * BOX_CODES, 1)

    def forward(self, bev: torch.Tensor) -> dict[str, torch.Tensor]:
        """``psm (B, A*K*K, H, W)`` class logits and ``rm (B, 7*A*K, H, W)`` box deltas."""
        return {"psm": self.cls_head(bev), "rm": self.reg_head(bev)}

    def _flat(self, outputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N, K) logits and (B, N, 7) deltas, anchors ordered (H, W, class set, rotation)."""
        B = outputs["psm"].shape[0]
        logits = outputs["psm"].permute(0, 2, 3, 1).reshape(B, -1, self.num_classes)
        deltas = outputs["rm"].permute(0, 2, 3, 1).reshape(B, -1, BOX_CODES)
        return logits, deltas

    def targets(self, boxes: torch.Tensor, classes: torch.Tensor, box_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, N)`` labels (class + 1 positive, 0 negative, -1 ignored) and ``(B, N, 7)`` deltas."""
        labels, deltas = [], []
        for b in range(boxes.shape[0]):
            valid = box_mask[b] & (classes[b] >= 0) & (classes[b] < self.num_classes)
            sample_labels, sample_deltas = self._sample_targets(boxes[b][valid], classes[b][valid])
            labels.append(sample_labels)
            deltas.append(sample_deltas)
        return torch.stack(labels), torch.stack(deltas)

    def _sample_targets(self, boxes: torch.Tensor, classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows, cols, K, A, _ = self.anchors.shape
        labels = torch.full((rows * cols, K, A), -1, dtype=torch.long, device=boxes.device)
        deltas = torch.zeros(rows * cols, K, A, BOX_CODES, device=boxes.device)
        for k in range(K):
            anchors = self.anchors[:, :, k].reshape(-1, BOX_CODES)
            own = boxes[classes == k]
            iou = standup_iou(standup_boxes(anchors), standup_boxes(own), self.standup_iou_offset)
            match, gt_index = match_anchors(iou, self.matched[k], self.unmatched[k])
            positive = match > 0
            labels[:, k] = torch.where(positive, k + 1, match).view(-1, A)
            if positive.any():
                encoded = torch.zeros(len(anchors), BOX_CODES, device=boxes.device)
                encoded[positive] = encode_boxes(own[gt_index[positive]], anchors[positive])
                deltas[:, k] = encoded.view(-1, A, BOX_CODES)
        return labels.flatten(), deltas.view(-1, BOX_CODES)

    def loss(self, outputs: dict, boxes: torch.Tensor, classes: torch.Tensor, box_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """``classification`` (focal), ``regression`` (smooth-L1) and their weighted ``total``."""
        logits, deltas = self._flat(outputs)
        labels, target = self.targets(boxes, classes, box_mask)
        positive, cared = labels > 0, labels >= 0
        normaliser = positive.sum(dim=1, keepdim=True).clamp_min(1).to(logits.dtype)
        one_hot = F.one_hot(labels.clamp_min(0), self.num_classes + 1)[..., 1:].to(logits.dtype)
        focal = sigmoid_focal_loss(logits, one_hot, self.focal_alpha, self.focal_gamma)
        batch = logits.shape[0]
        classification = (focal * (cared / normaliser)[..., None]).sum() / batch
        pred, goal = sin_difference(deltas, target)
        regression = (smooth_l1(pred - goal, self.beta) * (positive / normaliser)[..., None]).sum() / batch
        total = self.cls_weight * classification + self.reg_weight * regression
        return {"classification": classification, "regression": regression, "total": total}

    @torch.no_grad()
    def decode(
        self, outputs: dict, score_threshold: float = 0.2, nms_iou: float = 0.15, max_detections: int = 100
    ) -> list[dict[str, np.ndarray]]:
        """Per sample ``boxes (N, 7) float32``, ``scores (N,)``, ``classes (N,) int64`` (0-based).

        As OpenCOOD's ``post_process``: best class per anchor, score threshold, class-agnostic rotated
        NMS. Ours also keeps only the ``pre_nms_max`` best anchors before NMS (OpenPCDet's
        ``NMS_PRE_MAXSIZE``): an untrained head scores every anchor near 0.5, and NMS is quadratic.
        """
        logits, deltas = self._flat(outputs)
        anchors = self.anchors.reshape(-1, BOX_CODES)
        scores, labels = torch.sigmoid(logits).max(dim=-1)
        results = []
        for b in range(logits.shape[0]):
            keep = torch.nonzero(scores[b] > score_threshold).flatten()
            keep = keep[scores[b][keep].argsort(descending=True, stable=True)[: self.pre_nms_max]]
            boxes = decode_boxes(deltas[b][keep], anchors[keep]).cpu().numpy()
            sample_scores = scores[b][keep].cpu().numpy()
            kept = rotated_nms(boxes, sample_scores, nms_iou, max_detections)
            results.append({"boxes": boxes[kept].astype(np.float32).reshape(-1, BOX_CODES),
                            "scores": sample_scores[kept].astype(np.float32),
                            "classes": labels[b][keep].cpu().numpy()[kept].astype(np.int64)})
        return results
