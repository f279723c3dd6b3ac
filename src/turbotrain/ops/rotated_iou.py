"""BEV IoU of rotated boxes and rotated NMS.

Polygon intersection is delegated to shapely 2 (vectorised GEOS), after an axis-aligned bounding
circle test so that only pairs that can overlap reach GEOS.
"""
from __future__ import annotations

import numpy as np
import shapely

from turbotrain.geometry import box_corners_bev


def box_polygons(boxes: np.ndarray) -> np.ndarray:
    """shapely polygons of ``[x, y, z, l, w, h, yaw]`` boxes (BEV footprint)."""
    return shapely.polygons(box_corners_bev(boxes))


def rotated_iou_bev(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """(N, M) BEV IoU between rotated boxes ``[x, y, z, l, w, h, yaw]``."""
    a = np.asarray(boxes_a, dtype=np.float64).reshape(-1, 7)
    b = np.asarray(boxes_b, dtype=np.float64).reshape(-1, 7)
    iou = np.zeros((len(a), len(b)))
    if len(a) == 0 or len(b) == 0:
        return iou
    radius_a = 0.5 * np.hypot(a[:, 3], a[:, 4])
    radius_b = 0.5 * np.hypot(b[:, 3], b[:, 4])
    dist = np.linalg.norm(a[:, None, :2] - b[None, :, :2], axis=-1)
    ia, ib = np.nonzero(dist < radius_a[:, None] + radius_b[None, :])
    if len(ia) == 0:
        return iou
    poly_a, poly_b = box_polygons(a), box_polygons(b)
    inter = shapely.area(shapely.intersection(poly_a[ia], poly_b[ib]))
    area_a = a[ia, 3] * a[ia, 4]
    area_b = b[ib, 3] * b[ib, 4]
    union = area_a + area_b - inter
    iou[ia, ib] = np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)
    return iou


def rotated_nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, max_keep: int | None = None) -> np.ndarray:
    """Indices of boxes kept by greedy NMS in descending score order (BEV rotated IoU)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 7)
    order = np.argsort(-np.asarray(scores), kind="stable")
    if len(order) == 0:
        return order.astype(np.int64)
    iou = rotated_iou_bev(boxes[order], boxes[order])
    suppressed = np.zeros(len(order), dtype=bool)
    keep = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(order[i])
        if max_keep is not None and len(keep) >= max_keep:
            break
        suppressed |= iou[i] > iou_threshold
    return np.asarray(keep, dtype=np.int64)
