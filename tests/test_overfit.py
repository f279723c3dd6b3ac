"""The tiny joint model can fit one fixed cooperative batch: losses fall and decoded boxes hit the GT."""
from __future__ import annotations

import numpy as np
import torch
from torch.optim.swa_utils import update_bn

from turbotrain.grid import Grid
from turbotrain.models.joint import CooperativePnP
from turbotrain.testing import ToySceneConfig, toy_batch
from turbotrain.ops.rotated_iou import rotated_iou_bev
from turbotrain.utils.seed import seed_everything

GRID = Grid((-12.8, -12.8, -3.0, 12.8, 12.8, 1.0), (0.4, 0.4, 0.5), 2)  # 32 x 32 BEV, 0.8 m cells
CLASSES = ["car", "pedestrian", "truck"]
STEPS = 200


def _train(model: CooperativePnP, batch) -> tuple[dict, dict]:
    """Adam on the sum of the task losses; returns the first step's and the last 10 steps' mean losses."""
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    history = []
    for _ in range(STEPS):
        losses = model.losses(model(batch), batch)
        optimizer.zero_grad()
        (losses["detection"] + losses["prediction"]).backward()
        optimizer.step()
        history.append({k: float(losses[k].detach()) for k in ("detection", "prediction")})
    last = {k: float(np.mean([h[k] for h in history[-10:]])) for k in history[0]}
    return history[0], last


def test_tiny_model_overfits_one_cooperative_batch():
    seed_everything(0)
    batch = toy_batch(GRID, (ToySceneConfig(history=2, future=4, num_objects=4),), seed=1)
    cfg = {
        "size": "tiny",
        "encoder": {"name": "second", "backend": "auto"},
        "bev_backbone": {"name": "resnet_fpn"},
        "fusion": {"name": "v2xvit"},
        "temporal": {"name": "attention"},
        "detection_head": {"name": "center"},
        "prediction_head": {"name": "multimodal"},
    }
    model = CooperativePnP(cfg, GRID, CLASSES, history=2, future=4)
    first, last = _train(model, batch)
    assert last["detection"] < first["detection"] / 5, (first, last)
    assert last["prediction"] < first["prediction"] / 5, (first, last)

    # SECOND's BatchNorm uses OpenPCDet's momentum 0.01, so 200 steps leave its running statistics far
    # from the batch statistics; recompute them on the training batch before evaluating.
    update_bn([batch], model)
    (pred,) = model.predict(batch)
    gt_boxes, gt_classes = batch.boxes[0].numpy(), batch.classes[0].numpy()
    iou = rotated_iou_bev(gt_boxes, pred["boxes"])
    same_class = gt_classes[:, None] == pred["classes"][None, :]
    assert (np.where(same_class, iou, 0.0).max(axis=1) >= 0.5).all(), (iou, pred["classes"], gt_classes)

    # The trajectories of the matched detections follow the GT futures (best mode, metres).
    match = np.where(same_class, iou, 0.0).argmax(axis=1)
    future = batch.future[0, :, :, :2].numpy()
    ade = np.linalg.norm(pred["trajectories"][match] - future[:, None], axis=-1).mean(axis=-1).min(axis=1)
    assert (ade < 0.5).all(), ade
