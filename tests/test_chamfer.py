
import numpy as np
import torch

from turbotrain.pretrain.chamfer import chamfer_distance, chamfer_loss


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
    loss = chamfer_loss(pts + 1.0, None, pts, tmask)
    expected = chamfer_distance(pts + 1.0, None, pts, tmask)[0][[0, 2]].mean()
    assert torch.allclose(loss, expected)


def test_gradient_flows_to_predictions():
    pred = torch.randn(2, 4, 3, requires_grad=True)
    target = torch.randn(2, 6, 3)
    chamfer_loss(pred, None, target, torch.ones(2, 6, dtype=torch.bool)).backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0


def test_all_empty_gives_zero_loss_with_graph():
    pred = torch.randn(2, 4, 3, requires_grad=True)
    loss = chamfer_loss(pred, None, torch.zeros(2, 6, 3), torch.zeros(2, 6, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0
