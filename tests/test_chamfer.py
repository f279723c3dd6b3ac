
import numpy as np
import torch

import pytest

from turbotrain.pretrain.chamfer import ChamferOptions, chamfer_distance, chamfer_loss

PER_CELL_SQUARED_METRES = ChamferOptions("squared", "metre", "per_cell")


def brute_force(pred, target):
    """Reference: plain Python loops over the two point lists."""
    if len(pred) == 0 or len(target) == 0:
        return None
    def sq(a, b):
        return sum((x - y) ** 2 for x, y in zip(a, b))
    a = sum(min(sq(p, t) for t in target) for p in pred) / len(pred)
    b = sum(min(sq(p, t) for p in pred) for t in target) / len(target)
    return a + b


def test_matches_brute_force_on_random_sets_with_empty_and_single_point_cells():
    rng = np.random.default_rng(0)
    n_pred = [20, 20, 1, 0, 5, 20]
    n_target = [64, 1, 1, 7, 0, 30]
    K, M = 20, 64
    pred = torch.zeros(len(n_pred), K, 3, dtype=torch.float64)
    target = torch.zeros(len(n_pred), M, 3, dtype=torch.float64)
    pmask = torch.zeros(len(n_pred), K, dtype=torch.bool)
    tmask = torch.zeros(len(n_pred), M, dtype=torch.bool)
    refs = []
    for i, (k, m) in enumerate(zip(n_pred, n_target)):
        p, t = rng.normal(size=(k, 3)), rng.normal(size=(m, 3))
        pred[i, :k] = torch.from_numpy(p)
        target[i, :m] = torch.from_numpy(t)
        # padding slots hold garbage that must be ignored
        pred[i, k:] = 1e3
        target[i, m:] = -1e3
        pmask[i, :k] = True
        tmask[i, :m] = True
        refs.append(brute_force(p.tolist(), t.tolist()))
    dist, valid = chamfer_distance(pred, pmask, target, tmask)
    for i, ref in enumerate(refs):
        if ref is None:
            assert not valid[i] and dist[i] == 0
        else:
            assert valid[i]
            assert abs(dist[i].item() - ref) < 1e-9


def test_zero_for_identical_sets_and_loss_ignores_invalid_sets():
    pts = torch.randn(3, 5, 3)
    mask = torch.ones(3, 5, dtype=torch.bool)
    dist, valid = chamfer_distance(pts, None, pts, mask)
    assert torch.allclose(dist, torch.zeros(3), atol=1e-6) and valid.all()
    tmask = mask.clone()
    tmask[1] = False
    loss = chamfer_loss(pts + 1.0, None, pts, tmask, PER_CELL_SQUARED_METRES)
    expected = chamfer_distance(pts + 1.0, None, pts, tmask)[0][[0, 2]].mean()
    assert torch.allclose(loss, expected)


def test_gradient_flows_to_predictions():
    pred = torch.randn(2, 4, 3, requires_grad=True)
    target = torch.randn(2, 6, 3)
    chamfer_loss(pred, None, target, torch.ones(2, 6, dtype=torch.bool), voxel_size=(0.1, 0.1, 0.2)).backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0


def test_all_empty_gives_zero_loss_with_graph():
    pred = torch.randn(2, 4, 3, requires_grad=True)
    loss = chamfer_loss(pred, None, torch.zeros(2, 6, 3), torch.zeros(2, 6, dtype=torch.bool), voxel_size=(1, 1, 1))
    loss.backward()
    assert loss.item() == 0.0


def two_cells():
    """Cell 0: one prediction at the origin, targets (0.1, 0, 0) and (0, 0, 0.2) m.
    Cell 1: one prediction at (0, 0.3, 0), one target at the origin. Voxels 0.1 x 0.1 x 0.2 m."""
    pred = torch.tensor([[[0.0, 0.0, 0.0]], [[0.0, 0.3, 0.0]]])
    target = torch.tensor([[[0.1, 0.0, 0.0], [0.0, 0.0, 0.2]], [[0.0, 0.0, 0.0], [9.0, 9.0, 9.0]]])
    target_mask = torch.tensor([[True, True], [True, False]])
    return pred, target, target_mask


def test_coopre_chamfer_is_manhattan_in_voxel_units_averaged_over_points():
    pred, target, mask = two_cells()
    # voxel units: cell 0 targets (1, 0, 0) and (0, 0, 1); cell 1 prediction (0, 3, 0).
    # pred -> target (L1): cell 0: 1, cell 1: 3; mean over the 2 predictions = 2.
    # target -> pred: cell 0: 1 and 1, cell 1: 3; mean over the 3 valid targets = 5/3.
    loss = chamfer_loss(pred, None, target, mask, ChamferOptions(), voxel_size=(0.1, 0.1, 0.2))
    assert loss.item() == pytest.approx(2 + 5 / 3)


def test_each_chamfer_option_on_the_same_cells():
    pred, target, mask = two_cells()
    voxel = (0.1, 0.1, 0.2)
    # per cell, L1, voxel units: cell 0: 1 + (1 + 1)/2 = 2; cell 1: 3 + 3 = 6; mean 4
    assert chamfer_loss(pred, None, target, mask, ChamferOptions("l1", "voxel", "per_cell"), voxel).item() == \
        pytest.approx(4.0)
    # per point, squared, voxel units: pred -> target (1 + 9)/2 = 5; target -> pred (1 + 1 + 9)/3
    assert chamfer_loss(pred, None, target, mask, ChamferOptions("squared", "voxel", "per_point"), voxel).item() == \
        pytest.approx(5 + 11 / 3)
    # per point, L1, metres: pred -> target (0.1 + 0.3)/2; target -> pred (0.1 + 0.2 + 0.3)/3
    assert chamfer_loss(pred, None, target, mask, ChamferOptions("l1", "metre", "per_point")).item() == \
        pytest.approx(0.2 + 0.2)
    # per cell, squared, metres (the earlier loss): cell 0: 0.01 + (0.01 + 0.04)/2; cell 1: 0.09 + 0.09
    assert chamfer_loss(pred, None, target, mask, PER_CELL_SQUARED_METRES).item() == \
        pytest.approx((0.035 + 0.18) / 2)


def test_voxel_units_need_the_voxel_size_and_options_are_checked():
    pred, target, mask = two_cells()
    with pytest.raises(ValueError, match="voxel size"):
        chamfer_loss(pred, None, target, mask, ChamferOptions())
    with pytest.raises(ValueError, match="distance must be one of"):
        ChamferOptions(distance="l2")
