"""The OpenCOOD / CooPre anchor head: anchors, target assignment on a hand-made scene, loss, decoding."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from turbotrain.grid import Grid
from turbotrain.models.anchor_head import (
    AnchorHead,
    decode_boxes,
    encode_boxes,
    match_anchors,
    standup_boxes,
    standup_iou,
)
from turbotrain.models.presets import COOPRE_ANCHORS, part_config
from turbotrain.models.registry import DETECTION_HEADS

# 8 m x 8 m, 0.8 m BEV cells: a 10 x 10 map, cell centres at 0.4, 1.2, ..., 7.6 m
GRID = Grid((0.0, 0.0, -3.0, 8.0, 8.0, 1.0), (0.4, 0.4, 4.0), 2)
CAR, PEDESTRIAN, TRUCK = 0, 1, 2
CAR_DIAGONAL = math.hypot(3.9, 1.6)


def head(channels: int = 4) -> AnchorHead:
    torch.manual_seed(0)
    return AnchorHead(channels, GRID, 3, **part_config("tiny", "detection_head", {"name": "anchor"}))


def anchor_index(row: int, col: int, cls: int, rotation: int) -> int:
    """Flat index of an anchor, in the head's (H, W, class set, rotation) order."""
    return ((row * 10 + col) * 3 + cls) * 2 + rotation


def scene(*boxes: tuple[list[float], int]):
    """Padded (1, M, 7) boxes, (1, M) classes, (1, M) mask of ``(box, class)`` pairs, plus one padding row."""
    rows = [b for b, _ in boxes] + [[0.0] * 7]
    classes = [c for _, c in boxes] + [-1]
    mask = [True] * len(boxes) + [False]
    return torch.tensor([rows]), torch.tensor([classes]), torch.tensor([mask])


def test_registered_with_coopre_three_class_anchors_and_1x1_convs():
    h = DETECTION_HEADS.build("anchor", in_channels=512, grid=GRID, num_classes=3,
                              **part_config("paper", "detection_head", {"name": "anchor"}))
    assert h.anchors.shape == (10, 10, 3, 2, 7)
    # CooPre's second_intermediate: cls 1x1 conv 512 -> 2 * 3 * 3, reg 1x1 conv 512 -> 7 * 2 * 3
    assert h.cls_head.kernel_size == (1, 1) and h.cls_head.out_channels == 18 and h.reg_head.out_channels == 42
    assert sum(p.numel() for p in h.parameters()) == (512 * 18 + 18) + (512 * 42 + 42)
    car_anchor = h.anchors[5, 5, CAR, 1]
    assert car_anchor.tolist() == pytest.approx([4.4, 4.4, -1.78, 3.9, 1.6, 1.56, 1.57])
    assert h.anchors[0, 0, PEDESTRIAN, 0, 3:6].tolist() == pytest.approx([0.8, 0.6, 1.73])
    assert COOPRE_ANCHORS["matched_thresholds"] == [0.6, 0.5, 0.6]
    assert COOPRE_ANCHORS["unmatched_thresholds"] == [0.45, 0.35, 0.45]
    with pytest.raises(ValueError, match="anchor_z has 2 entries for 3 classes"):
        AnchorHead(4, GRID, 3, **{**COOPRE_ANCHORS, "anchor_z": [0.0, 0.0]})


def test_standup_iou_adds_one_metre_to_each_extent_as_opencood():
    car = torch.tensor([[4.4, 4.4, -1.78, 3.9, 1.6, 1.56, 0.0]])
    shifted_x = car + torch.tensor([0.8, 0, 0, 0, 0, 0, 0])
    # extents with the +1: 4.9 x 2.6 (area 12.74); 0.8 m apart along x they share 4.1 x 2.6 = 10.66
    iou = standup_iou(standup_boxes(car), standup_boxes(shifted_x))
    assert iou.item() == pytest.approx(10.66 / (2 * 12.74 - 10.66), abs=1e-5)
    assert standup_iou(standup_boxes(car), standup_boxes(shifted_x), offset=0.0).item() == pytest.approx(
        3.1 * 1.6 / (2 * 3.9 * 1.6 - 3.1 * 1.6), abs=1e-5)
    # a box turned by 90 degrees has its extents swapped
    assert standup_boxes(car + torch.tensor([0, 0, 0, 0, 0, 0, math.pi / 2]))[0].tolist() == pytest.approx(
        [3.6, 2.45, 5.2, 6.35], abs=1e-5)


def test_match_anchors_thresholds_ignores_and_forces_the_best_anchor():
    iou = torch.tensor([[0.70, 0.00],   # over 0.6: positive for box 0
                        [0.50, 0.00],   # between: ignored
                        [0.10, 0.20],   # under 0.45 for every box: negative ...
                        [0.00, 0.30]])  # ... except box 1's best anchor, forced positive
    labels, gt = match_anchors(iou, matched=0.6, unmatched=0.45)
    assert labels.tolist() == [1, -1, 0, 1]
    assert gt[labels > 0].tolist() == [0, 1]
    no_boxes, _ = match_anchors(torch.zeros(4, 0), 0.6, 0.45)
    assert no_boxes.tolist() == [0, 0, 0, 0]


def test_targets_on_a_hand_made_scene():
    # a car on the anchor of cell (row 5, col 5), rotation 0; a 0.6 m x 0.4 m pedestrian at a cell
    # corner, where no anchor passes 0.5; a padding row that must be ignored
    car = [4.4, 4.4, -1.78, 3.9, 1.6, 1.56, 0.0]
    pedestrian = [1.5, 1.5, -0.6, 0.6, 0.4, 1.7, 0.0]
    h = head()
    labels, deltas = h.targets(*scene((car, CAR), (pedestrian, PEDESTRIAN)))
    labels, deltas = labels[0], deltas[0]

    exact = anchor_index(5, 5, CAR, 0)
    assert labels[exact] == CAR + 1 and deltas[exact].abs().max() < 1e-6
    # 0.8 m along x: IoU 10.66 / 14.82 = 0.72 > 0.6 -> positive, dx = -0.8 m over the anchor diagonal
    for col, dx in ((4, 0.8), (6, -0.8)):
        i = anchor_index(5, col, CAR, 0)
        assert labels[i] == CAR + 1
        assert deltas[i].tolist() == pytest.approx([dx / CAR_DIAGONAL, 0, 0, 0, 0, 0, 0], abs=1e-6)
    # 0.8 m along y: 4.9 x 1.8 shared, IoU 8.82 / 16.66 = 0.53 -> ignored; the 90-degree anchor of the
    # same cell: 2.6 x 2.6 shared, IoU 6.76 / 18.72 = 0.36 < 0.45 -> negative
    assert labels[anchor_index(4, 5, CAR, 0)] == -1 and labels[anchor_index(6, 5, CAR, 0)] == -1
    assert labels[anchor_index(5, 5, CAR, 1)] == 0
    assert (labels.view(10, 10, 3, 2)[..., CAR, :] > 0).sum() == 3

    # the pedestrian with the +1: [0.7, 2.3] x [0.8, 2.2]. The 90-degree anchor of cell (1, 1),
    # [0.4, 2.0] x [0.3, 2.1], shares 1.3 x 1.3: IoU 1.69 / (2.88 + 2.24 - 1.69) = 0.493, its best
    # but under 0.5, so forced positive; the 0-degree one shares 1.4 x 1.2: 0.488, ignored
    ped_labels = labels.view(10, 10, 3, 2)[..., PEDESTRIAN, :]
    assert (ped_labels > 0).nonzero().tolist() == [[1, 1, 1]]
    assert ped_labels[1, 1, 1] == PEDESTRIAN + 1 and ped_labels[1, 1, 0] == -1
    best = h.anchors[1, 1, PEDESTRIAN, 1]
    assert standup_iou(standup_boxes(best[None]), standup_boxes(torch.tensor([pedestrian]))).item() == pytest.approx(
        1.69 / 3.43, abs=2e-3)  # 1.57 rad is not quite 90 degrees
    assert deltas[anchor_index(1, 1, PEDESTRIAN, 1)].tolist() == pytest.approx(
        [0.3, 0.3, 0.0, math.log(0.6 / 0.8), math.log(0.4 / 0.6), math.log(1.7 / 1.73), -1.57], abs=1e-6)
    # at a cell centre the +1 lets a pedestrian pass 0.5 with both rotations (IoU 2.25 / 2.88 = 0.78)
    centred, _ = h.targets(*scene(([1.3, 1.25, -0.6, 0.5, 0.5, 1.7, 0.0], PEDESTRIAN)))
    assert (centred[0].view(10, 10, 3, 2)[..., PEDESTRIAN, :] > 0).nonzero().tolist() == [[1, 1, 0], [1, 1, 1]]
    # classes match only their own anchors; no truck in the scene, so every truck anchor is negative
    assert (labels.view(10, 10, 3, 2)[..., TRUCK, :] == 0).all()


def test_encode_decode_round_trip():
    anchors = torch.tensor([[4.4, 4.4, -1.78, 3.9, 1.6, 1.56, 0.0], [1.2, 1.2, -0.6, 0.8, 0.6, 1.73, 1.57]])
    boxes = torch.tensor([[4.9, 3.7, -1.5, 4.2, 1.8, 1.5, 0.3], [1.0, 1.5, -0.5, 0.7, 0.5, 1.8, 2.0]])
    assert torch.allclose(decode_boxes(encode_boxes(boxes, anchors), anchors), boxes, atol=1e-5)


def test_loss_of_zero_logits_by_hand_and_perfect_regression():
    h = head()
    boxes, classes, mask = scene(([4.4, 4.4, -1.78, 3.9, 1.6, 1.56, 0.0], CAR))
    labels, target = h.targets(boxes, classes, mask)
    outputs = {"psm": torch.zeros(1, 18, 10, 10), "rm": torch.zeros(1, 42, 10, 10)}
    # regression outputs equal to the targets on the positives (anchors ordered H, W, set, rotation)
    outputs["rm"] = target.view(1, 10, 10, 42).permute(0, 3, 1, 2).contiguous()
    loss = h.loss(outputs, boxes, classes, mask)
    positives = int((labels > 0).sum())
    cared = int((labels >= 0).sum())
    # sigmoid(0) = 0.5: each (anchor, class) term is alpha_t * 0.5^2 * log 2; a positive anchor's own
    # class has alpha 0.25, every other cared term 0.75; all over the positives
    term = 0.25 * math.log(2)
    expected = (positives * 0.25 * term + (3 * cared - positives) * 0.75 * term) / positives
    assert loss["classification"].item() == pytest.approx(expected, rel=1e-5)
    assert loss["regression"].item() == pytest.approx(0.0, abs=1e-6)
    assert loss["total"].item() == pytest.approx(loss["classification"].item(), rel=1e-6)


def test_gradients_reach_both_convs():
    h = head(channels=4)
    bev = torch.randn(2, 4, 10, 10)
    boxes, classes, mask = scene(([4.4, 4.4, -1.78, 3.9, 1.6, 1.56, 0.3], CAR), ([1.2, 6.0, -0.6, 0.6, 0.6, 1.7, 0.0], PEDESTRIAN))
    loss = h.loss(h(bev), boxes.expand(2, -1, -1), classes.expand(2, -1), mask.expand(2, -1))
    loss["total"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in h.parameters())


def test_decode_keeps_the_best_class_and_suppresses_overlaps():
    h = head()
    psm = torch.full((1, 10, 10, 6, 3), -10.0)
    psm[0, 5, 5, CAR * 2 + 0, CAR] = 3.0  # the car anchor of cell (5, 5), scored as a car
    psm[0, 5, 6, CAR * 2 + 0, CAR] = 2.0  # its neighbour, the same box after regression: suppressed
    psm[0, 1, 1, PEDESTRIAN * 2 + 1, PEDESTRIAN] = 1.0
    rm = torch.zeros(1, 10, 10, 6, 7)
    rm[0, 5, 6, CAR * 2 + 0, 0] = -0.8 / CAR_DIAGONAL
    outputs = {"psm": psm.view(1, 10, 10, 18).permute(0, 3, 1, 2), "rm": rm.view(1, 10, 10, 42).permute(0, 3, 1, 2)}
    (det,) = h.decode(outputs, score_threshold=0.2, nms_iou=0.15, max_detections=10)
    assert det["classes"].tolist() == [CAR, PEDESTRIAN]
    assert det["scores"] == pytest.approx(torch.sigmoid(torch.tensor([3.0, 1.0])).numpy())
    assert det["boxes"][0] == pytest.approx(np.array([4.4, 4.4, -1.78, 3.9, 1.6, 1.56, 0.0]), abs=1e-5)
    assert det["boxes"][1] == pytest.approx(np.array([1.2, 1.2, -0.6, 0.8, 0.6, 1.73, 1.57]), abs=1e-5)
    assert det["boxes"].dtype == np.float32 and det["classes"].dtype == np.int64
    (empty,) = h.decode({"psm": torch.full((1, 18, 10, 10), -10.0), "rm": torch.zeros(1, 42, 10, 10)})
    assert empty["boxes"].shape == (0, 7) and empty["scores"].shape == (0,)
