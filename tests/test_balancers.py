"""Multi-task balancers: equivalence with plain backward / torchjd, method behaviour, properties."""
from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset
from torchjd.aggregation import PCGrad as TorchjdPCGrad
from torchjd.scalarization import DWA as TorchjdDWA
from torchjd.scalarization import FAMO as TorchjdFAMO

from turbotrain.train.balancers import BALANCERS, build_balancer
from turbotrain.train.balancers.famo import FAMOBalancer
from turbotrain.train.balancers.features import feature_block_ids
from turbotrain.train.balancers.surgery import cagrad_weights
from turbotrain.train.balancers.turbotrain import TurboTrainBalancer
from turbotrain.train.engine import TrainConfig, fit
from turbotrain.utils.errors import ConfigError

TASKS = ["det", "pred"]


class SharedTrunkModel(nn.Module):
    """Tiny hard-parameter-sharing model: one trunk, one head per task (float64 for tight checks)."""

    def __init__(self, tasks: list[str], seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh())
        self.heads = nn.ModuleDict({t: nn.Linear(8, 2) for t in tasks})
        self.inputs = torch.randn(12, 6)
        self.targets = {t: torch.randn(12, 2) for t in tasks}
        self.double()
        self.inputs = self.inputs.double()
        self.targets = {t: y.double() for t, y in self.targets.items()}

    def losses(self) -> dict[str, torch.Tensor]:
        features = self.trunk(self.inputs)
        return {t: (head(features) - self.targets[t]).pow(2).mean() for t, head in self.heads.items()}

    def shared(self) -> list[torch.Tensor]:
        return list(self.trunk.parameters())

    def task_params(self) -> dict[str, list[torch.Tensor]]:
        return {t: list(h.parameters()) for t, h in self.heads.items()}

    def grads(self) -> list[torch.Tensor]:
        return [p.grad.clone() for p in self.parameters()]

    def task_gradients(self) -> torch.Tensor:
        """``(K, N)`` per-task gradients of the trunk, computed independently of the balancers."""
        rows = []
        for loss in self.losses().values():
            grads = torch.autograd.grad(loss, self.shared(), retain_graph=True)
            rows.append(torch.cat([g.reshape(-1) for g in grads]))
        return torch.stack(rows)


def run_balancer(balancer, model: SharedTrunkModel) -> dict[str, float]:
    model.zero_grad(set_to_none=True)
    return balancer.backward(model.losses(), model.shared(), model.task_params())


def shared_grad(model: SharedTrunkModel) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.shared()])


@pytest.mark.parametrize("diagnostics", [False, True])
def test_sum_equals_plain_backward(diagnostics):
    model = SharedTrunkModel(TASKS)
    model.zero_grad(set_to_none=True)
    sum(model.losses().values()).backward()
    expected = model.grads()
    out = run_balancer(build_balancer("sum", TASKS, diagnostics=diagnostics), model)
    for got, want in zip(model.grads(), expected):
        torch.testing.assert_close(got, want)
    assert out["weight/det"] == 1.0 and out["weight/pred"] == 1.0
    assert ("gradnorm/det" in out) == diagnostics


def test_fixed_equals_weighted_backward():
    model = SharedTrunkModel(TASKS)
    model.zero_grad(set_to_none=True)
    losses = model.losses()
    (0.25 * losses["det"] + 3.0 * losses["pred"]).backward()
    expected = model.grads()
    run_balancer(build_balancer("fixed", TASKS, weights={"det": 0.25, "pred": 3.0}), model)
    for got, want in zip(model.grads(), expected):
        torch.testing.assert_close(got, want)


def test_diagnostics_match_independent_task_gradients():
    model = SharedTrunkModel(TASKS)
    jac = model.task_gradients()
    out = run_balancer(build_balancer("fixed", TASKS, weights={"det": 2.0}, diagnostics=True), model)
    cosine = (jac[0] @ jac[1] / (jac[0].norm() * jac[1].norm())).item()
    assert out["gradnorm/det"] == pytest.approx(jac[0].norm().item())
    assert out["gradnorm/pred"] == pytest.approx(jac[1].norm().item())
    assert out["cosine"] == pytest.approx(cosine) and out["cosine/det-pred"] == pytest.approx(cosine)
    assert out["conflict"] == float(cosine < 0)
    torch.testing.assert_close(shared_grad(model), 2.0 * jac[0] + jac[1])


# Aggregators whose weights depend on their own history (the second call differs by design), and
# the ones that need solvers outside the core install.
STATEFUL = {"gradvac", "excess_mtl", "nash_mtl"}
SOLVER_MODULES = {"nash_mtl": "ecos"}


def parameter_space_balancer(name: str, tasks=TASKS, **options):
    """``name`` on the shared parameters (TurboTrain's default is the features space)."""
    if name in SOLVER_MODULES:
        pytest.importorskip(SOLVER_MODULES[name], reason=f"torchjd's {name} needs torchjd[{name}]")
    if name == "turbotrain":
        options = {"space": "parameters", **options}
    return build_balancer(name, tasks, **options)


@pytest.mark.parametrize("name", sorted(set(BALANCERS.names()) - STATEFUL))
def test_gradient_accumulation_adds(name):
    model = SharedTrunkModel(TASKS)
    torch.manual_seed(0)  # GradDrop draws from the global generator
    run_balancer(parameter_space_balancer(name), model)
    once = model.grads()
    balancer = parameter_space_balancer(name)
    model.zero_grad(set_to_none=True)
    for _ in range(2):
        torch.manual_seed(0)
        balancer.backward(model.losses(), model.shared(), model.task_params())
    for got, single in zip(model.grads(), once):
        torch.testing.assert_close(got, 2 * single)


@pytest.mark.parametrize("name", ["pcgrad", "cagrad", "turbotrain", "fixed"])
def test_head_params_get_only_their_own_task_gradient(name):
    model = SharedTrunkModel(TASKS)
    options = {"weights": {"det": 0.5, "pred": 2.0}} if name == "fixed" else {}
    head_weight = {"det": 0.5, "pred": 2.0} if name == "fixed" else {"det": 1.0, "pred": 1.0}
    run_balancer(parameter_space_balancer(name, **options), model)
    losses = model.losses()
    for task, head in model.heads.items():
        own = torch.autograd.grad(losses[task], list(head.parameters()))
        for param, g in zip(head.parameters(), own):
            torch.testing.assert_close(param.grad, head_weight[task] * g)


@pytest.mark.parametrize("num_tasks", [2, 3])
def test_pcgrad_matches_torchjd(num_tasks):
    tasks = TASKS[:num_tasks] if num_tasks == 2 else ["a", "b", "c"]
    model = SharedTrunkModel(tasks, seed=3)
    jac = model.task_gradients()
    for seed in range(4):
        run_balancer(build_balancer("pcgrad", tasks, seed=seed), model)
        # torchjd draws its orders from the global generator; seeding it the same aligns the orders.
        torch.manual_seed(seed)
        torch.testing.assert_close(shared_grad(model), TorchjdPCGrad()(jac))


def test_pcgrad_removes_conflict_for_two_tasks():
    model = SharedTrunkModel(TASKS, seed=1)
    jac = model.task_gradients()
    out = run_balancer(build_balancer("pcgrad", TASKS), model)
    update = shared_grad(model)
    assert out["conflict"] == float((jac[0] @ jac[1]).item() < 0)
    assert torch.all(jac @ update >= -1e-12)


def brute_force_cagrad(jac: torch.Tensor, c: float) -> torch.Tensor:
    """CAGrad for 2 tasks by a dense grid over the simplex (independent of the SLSQP solver)."""
    g0 = jac.mean(dim=0)
    sqrt_phi = c * g0.norm()
    ws = torch.linspace(0, 1, 200001, dtype=jac.dtype)
    gw = ws[:, None] * jac[0] + (1 - ws[:, None]) * jac[1]
    best = (gw @ g0 + sqrt_phi * gw.norm(dim=1)).argmin()
    return (g0 + sqrt_phi / gw[best].norm() * gw[best]) / (1 + c**2)


@pytest.mark.parametrize("c", [0.4, 0.8])
def test_cagrad_matches_brute_force_minimiser(c):
    model = SharedTrunkModel(TASKS, seed=2)
    jac = model.task_gradients()
    run_balancer(build_balancer("cagrad", TASKS, c=c), model)
    torch.testing.assert_close(shared_grad(model), brute_force_cagrad(jac, c), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("num_tasks", [2, 3])
def test_cagrad_matches_torchjd(num_tasks):
    pytest.importorskip("cvxpy", reason="torchjd's CAGrad needs the torchjd[cagrad] extra (cvxpy)")
    from torchjd.aggregation import CAGrad as TorchjdCAGrad

    tasks = TASKS if num_tasks == 2 else ["a", "b", "c"]
    model = SharedTrunkModel(tasks, seed=5)
    jac = model.task_gradients()
    run_balancer(build_balancer("cagrad", tasks, c=0.4), model)
    # torchjd omits the official implementation's 1 / (1 + c^2) rescaling.
    expected = TorchjdCAGrad(c=0.4)(jac) / (1 + 0.4**2)
    torch.testing.assert_close(shared_grad(model), expected, rtol=1e-4, atol=1e-6)


def test_cagrad_zero_gradients_give_zero_update():
    assert torch.equal(cagrad_weights(torch.zeros(2, 2), 0.4), torch.zeros(2))


def test_uncertainty_log_variances_move_towards_loss_scale():
    balancer = build_balancer("uncertainty", TASKS)
    optimizer = torch.optim.SGD(balancer.parameters(), lr=0.1)
    theta = torch.zeros(1, requires_grad=True)
    for _ in range(20):
        optimizer.zero_grad()
        # A large loss should be down-weighted (s grows), a small one up-weighted (s shrinks).
        losses = {"det": 4.0 + theta.sum(), "pred": 0.25 + theta.sum()}
        s_used = balancer.log_variances.tolist()
        out = balancer.backward(losses, [theta])
        optimizer.step()
    s_det, s_pred = balancer.log_variances.tolist()
    assert s_det > 0 > s_pred
    assert out["weight/det"] == pytest.approx(0.5 * math.exp(-s_used[0]))
    assert "uw.log_var" in balancer.state_dict()


def test_dwa_weights_from_known_epoch_losses():
    balancer = build_balancer("dwa", TASKS)
    theta = torch.zeros(1, requires_grad=True)
    losses = {"det": 1.0 + theta.sum(), "pred": 2.0 + theta.sum()}
    assert balancer.backward(losses, [theta])["weight/det"] == 1.0  # uniform before two epochs
    balancer.end_epoch({"det": 1.0, "pred": 2.0})
    balancer.end_epoch({"det": 0.5, "pred": 1.8})
    theta.grad = None
    out = balancer.backward({"det": 1.0 + theta.sum(), "pred": 2.0 + theta.sum()}, [theta])
    # r = (0.5, 0.9); w_i = 2 exp(r_i / 2) / (exp(0.25) + exp(0.45))
    denom = math.exp(0.25) + math.exp(0.45)
    assert out["weight/det"] == pytest.approx(2 * math.exp(0.25) / denom)
    assert out["weight/pred"] == pytest.approx(2 * math.exp(0.45) / denom)
    assert theta.grad.item() == pytest.approx(2.0)  # the weights always sum to K


def test_dwa_matches_torchjd_and_survives_state_dict():
    balancer = build_balancer("dwa", TASKS)
    reference = TorchjdDWA()
    history = [(1.0, 2.0), (0.7, 1.9), (0.6, 1.2)]
    for det, pred in history:
        reference(torch.tensor([det, pred]))
        reference.step()
        balancer.end_epoch({"det": det, "pred": pred})
    restored = build_balancer("dwa", TASKS)
    restored.load_state_dict(balancer.state_dict())
    # torchjd's DWA returns sum_i w_i L_i, so a one-hot loss vector reads off w_i.
    expected = torch.stack([reference(torch.eye(2)[i]) for i in range(2)])
    torch.testing.assert_close(restored.loss_weights(torch.ones(2)), expected)


def toy_famo_losses(theta: torch.Tensor) -> dict[str, torch.Tensor]:
    """``det`` is steep (falls fast under SGD), ``pred`` is shallow (falls slowly)."""
    return {"det": 5.0 * theta[0] ** 2 + 0.01, "pred": 0.05 * theta[1] ** 2 + 0.01}


def test_famo_shifts_weight_to_slower_task_and_matches_torchjd():
    balancer = build_balancer("famo", TASKS)
    reference = TorchjdFAMO(2)
    theta = torch.tensor([1.0, 1.0], requires_grad=True)
    optimizer = torch.optim.SGD([theta], lr=0.05)
    for _ in range(15):
        optimizer.zero_grad()
        losses = toy_famo_losses(theta)
        scalarized = reference(torch.stack(list(losses.values())))
        expected_grad = torch.autograd.grad(scalarized, theta, retain_graph=True)[0]
        balancer.backward(losses, [theta])
        torch.testing.assert_close(theta.grad, expected_grad)
        optimizer.step()
        with torch.no_grad():
            after = toy_famo_losses(theta)
        balancer.update(after)
        reference.update(torch.stack(list(after.values())))
    z_det, z_pred = balancer.task_weights().tolist()
    assert z_pred > z_det
    torch.testing.assert_close(balancer.logits.value, reference._w.detach(), rtol=1e-5, atol=1e-6)


def test_famo_state_is_checkpointed_and_not_a_parameter():
    balancer = build_balancer("famo", TASKS)
    theta = torch.tensor([1.0, 1.0], requires_grad=True)
    balancer.backward(toy_famo_losses(theta), [theta])
    balancer.update({"det": torch.tensor(1.0), "pred": torch.tensor(0.05)})
    restored = FAMOBalancer(TASKS)
    restored.load_state_dict(balancer.state_dict())
    assert list(balancer.parameters()) == []
    torch.testing.assert_close(restored.task_weights(), balancer.task_weights())
    assert int(restored.logits.steps) == 1


def test_famo_update_requires_backward_first():
    with pytest.raises(RuntimeError):
        build_balancer("famo", TASKS).update({"det": torch.tensor(1.0), "pred": torch.tensor(1.0)})


def turbotrain_reference(blocks: list[torch.Tensor]) -> torch.Tensor:
    """The rule of turbotrain.py's docstring, written directly on vectors, block by block."""
    out = []
    for g in blocks:  # g: (K, n)
        norms = g.norm(dim=1)
        cos = [(g[i] @ g[j] / (norms[i] * norms[j])).item() for i in range(len(g)) for j in range(len(g)) if i != j]
        severity = max(0.0, -min(cos))
        h = [((1 - severity) + severity * norms.mean() / norms[i]) * g[i] for i in range(len(g))]
        projected = []
        for i in range(len(h)):
            hi = h[i].clone()
            for j in range(len(h)):
                if j != i and hi @ h[j] < 0:
                    hi = hi - (hi @ h[j]) / (h[j] @ h[j]) * h[j]
            projected.append(hi)
        out.append(torch.stack(projected).sum(dim=0))
    return torch.cat(out)


def block_split(jac: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    return list(torch.split(jac, sizes, dim=1))


def combine_turbotrain(jac: torch.Tensor, sizes: list[int], granularity: str = "tensor"):
    balancer = TurboTrainBalancer(["a", "b", "c"][: jac.shape[0]], space="parameters", granularity=granularity)
    return balancer.combine(jac, jac @ jac.T, sizes)


@pytest.mark.parametrize("num_tasks", [2, 3])
def test_turbotrain_matches_reference_rule(num_tasks):
    torch.manual_seed(7)
    sizes = [5, 3, 8, 1, 6]
    magnitudes = torch.tensor([1.0, 3.0, 0.2][:num_tasks], dtype=torch.float64)
    jac = torch.randn(num_tasks, sum(sizes), dtype=torch.float64) * magnitudes[:, None]
    combined, _, _ = combine_turbotrain(jac, sizes)
    torch.testing.assert_close(combined, turbotrain_reference(block_split(jac, sizes)))
    global_combined, _, _ = combine_turbotrain(jac, sizes, granularity="global")
    torch.testing.assert_close(global_combined, turbotrain_reference([jac]))


def test_turbotrain_without_conflict_equals_sum():
    torch.manual_seed(0)
    base = torch.rand(2, 12, dtype=torch.float64)  # non-negative entries: every block agrees
    jac = base * torch.tensor([[1.0], [7.0]], dtype=torch.float64)  # very unequal magnitudes
    combined, weights, extra = combine_turbotrain(jac, [4, 4, 4])
    torch.testing.assert_close(combined, jac.sum(dim=0))
    assert weights.tolist() == [1.0, 1.0] and extra["conflict_fraction"] == 0.0


def test_turbotrain_opposite_block_cancels_and_other_blocks_untouched():
    agree = torch.tensor([[1.0, 2.0], [3.0, 1.0]], dtype=torch.float64)
    opposite = torch.tensor([[2.0, -1.0, 0.5], [-4.0, 2.0, -1.0]], dtype=torch.float64)  # g2 = -2 g1
    jac = torch.cat([agree, opposite], dim=1)
    combined, _, extra = combine_turbotrain(jac, [2, 3])
    torch.testing.assert_close(combined[:2], agree.sum(dim=0))
    torch.testing.assert_close(combined[2:], torch.zeros(3, dtype=torch.float64))
    assert extra["conflict_fraction"] == pytest.approx(3 / 5)


def test_turbotrain_partial_conflict_hand_computed():
    # g1 = (2, 0), g2 = (-1, 1): cos = -1/sqrt2 = -s; mean norm m = (2 + sqrt2) / 2.
    jac = torch.tensor([[2.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    s, m = 1 / math.sqrt(2), (2 + math.sqrt(2)) / 2
    a1, a2 = (1 - s) + s * m / 2, (1 - s) + s * m / math.sqrt(2)
    h1, h2 = torch.tensor([2 * a1, 0.0]), torch.tensor([-a2, a2])
    h1_proj = h1 - (h1 @ h2) / (h2 @ h2) * h2
    h2_proj = h2 - (h1 @ h2) / (h1 @ h1) * h1  # = (0, a2): the component along g1 is removed
    combined, _, _ = combine_turbotrain(jac, [2])
    torch.testing.assert_close(combined, (h1_proj + h2_proj).double())
    assert h2_proj[0].item() == pytest.approx(0.0, abs=1e-12)


def test_turbotrain_update_never_opposes_a_task_in_any_block():
    torch.manual_seed(3)
    sizes = [7, 2, 9, 4, 3, 11]
    for _ in range(20):
        jac = torch.randn(2, sum(sizes), dtype=torch.float64) * torch.rand(2, 1, dtype=torch.float64) * 5
        combined, _, _ = combine_turbotrain(jac, sizes)
        for g_block, d_block in zip(block_split(jac, sizes), torch.split(combined, sizes)):
            assert torch.all(g_block @ d_block >= -1e-10)


def test_turbotrain_on_model_reports_conflict_diagnostics():
    model = SharedTrunkModel(TASKS, seed=4)
    jac = model.task_gradients()
    out = run_balancer(parameter_space_balancer("turbotrain"), model)
    sizes = [p.numel() for p in model.shared()]
    torch.testing.assert_close(shared_grad(model), turbotrain_reference(block_split(jac, sizes)))
    assert 0.0 <= out["conflict_fraction"] <= 1.0
    assert {"gradnorm/det", "gradnorm/pred", "cosine", "conflict", "weight/det"} <= set(out)


def test_turbotrain_trailing_fraction_balances_only_the_last_layers():
    model = SharedTrunkModel(TASKS, seed=4)
    jac = model.task_gradients()
    sizes = [p.numel() for p in model.shared()]  # [96, 16, 128, 8]: last Linear = 136 of 248
    run_balancer(parameter_space_balancer("turbotrain", trailing_fraction=0.5), model)
    update = shared_grad(model)
    torch.testing.assert_close(update[:112], jac[:, :112].sum(dim=0))
    torch.testing.assert_close(update[112:], turbotrain_reference(block_split(jac[:, 112:], sizes[2:])))


def test_pcgrad_orders_resume_from_state_dict():
    model = SharedTrunkModel(["a", "b", "c"], seed=3)
    balancer = build_balancer("pcgrad", ["a", "b", "c"], seed=11)
    run_balancer(balancer, model)
    resumed = build_balancer("pcgrad", ["a", "b", "c"], seed=0)
    resumed.load_state_dict(balancer.state_dict())
    assert resumed.random_orders() == balancer.random_orders()


def test_build_balancer_rejects_unknown_names_and_options():
    with pytest.raises(KeyError):
        build_balancer("gradnorm", TASKS)
    with pytest.raises(ConfigError):
        build_balancer("upgrad", TASKS, projector="cvx")
    with pytest.raises(ConfigError):
        build_balancer("aligned_mtl", TASKS, scale="min")
    with pytest.raises(ConfigError):
        build_balancer("cagrad", TASKS, alpha=0.5)
    with pytest.raises(ConfigError):
        build_balancer("fixed", TASKS, weights={"seg": 1.0})
    with pytest.raises(ConfigError):
        parameter_space_balancer("turbotrain", trailing_fraction=0.0)
    with pytest.raises(KeyError):
        build_balancer("sum", TASKS).backward({"det": torch.tensor(1.0)}, [])


# ------------------------------------------------------------------ TurboTrain on the shared features
class TwoHeadBEVModel(nn.Module):
    """CooperativePnP's layout in miniature (float64): a per-step conv trunk gives ``step_bev``
    (B, T, C, H, W), a learned temporal mix gives ``bev`` (B, C, H, W); detection reads ``bev``,
    prediction reads the last step map and ``bev``. Losses are linear in the head outputs, so
    ``agreeing=True`` (positive head weights and targets) makes every feature gradient non-negative:
    no block can conflict."""

    def __init__(self, agreeing: bool = False, seed: int = 0, batch: int = 3, steps: int = 2):
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = nn.Conv2d(2, 4, 3, padding=1)
        self.temporal = nn.Parameter(torch.rand(steps, 4, 1, 1) + 0.1)
        self.detection = nn.Conv2d(4, 1, 1)
        self.prediction_step = nn.Conv2d(4, 1, 1)
        self.prediction_fused = nn.Conv2d(4, 1, 1)
        self.inputs = torch.randn(batch, steps, 2, 5, 6)
        self.targets = {t: torch.randn(batch, 1, 5, 6) for t in TASKS}
        if agreeing:
            with torch.no_grad():
                for head in (self.detection, self.prediction_step, self.prediction_fused):
                    head.weight.abs_().add_(0.1)
            self.targets = {t: y.abs() + 0.1 for t, y in self.targets.items()}
        self.double()
        self.inputs = self.inputs.double()
        self.targets = {t: y.double() for t, y in self.targets.items()}

    def forward(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        batch, steps = inputs.shape[:2]
        step_bev = torch.tanh(self.trunk(inputs.flatten(0, 1))).view(batch, steps, 4, *inputs.shape[-2:])
        bev = (step_bev * self.temporal).sum(dim=1)
        prediction = self.prediction_step(step_bev[:, -1]) + self.prediction_fused(bev)
        return {"step_bev": step_bev, "bev": bev, "det": self.detection(bev), "pred": prediction}

    def losses_and_features(self, inputs=None, targets=None) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        inputs = self.inputs if inputs is None else inputs
        targets = self.targets if targets is None else targets
        out = self(inputs)
        losses = {t: (targets[t] * out[t]).mean() for t in TASKS}
        return losses, [out["bev"], out["step_bev"]]

    def shared(self) -> list[torch.Tensor]:
        return list(self.trunk.parameters()) + [self.temporal]

    def task_params(self) -> dict[str, list[torch.Tensor]]:
        prediction = list(self.prediction_step.parameters()) + list(self.prediction_fused.parameters())
        return {"det": list(self.detection.parameters()), "pred": prediction}

    def grads(self) -> list[torch.Tensor]:
        return [p.grad.clone() for p in self.parameters()]


def run_features_balancer(balancer, model: TwoHeadBEVModel) -> dict[str, float]:
    model.zero_grad(set_to_none=True)
    losses, features = model.losses_and_features()
    return balancer.backward(losses, model.shared(), model.task_params(), features=features)


def features_balancer(**options) -> TurboTrainBalancer:
    return build_balancer("turbotrain", TASKS, space="features", **options)


def independent_feature_totals(model: TwoHeadBEVModel) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(K, N)`` total gradients of each task w.r.t. ``[bev, step_bev]``, outside the balancer."""
    losses, features = model.losses_and_features()
    rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses[t], features, retain_graph=True)])
            for t in TASKS]
    return torch.stack(rows), features


def test_features_space_without_conflict_equals_sum():
    model = TwoHeadBEVModel(agreeing=True)
    model.zero_grad(set_to_none=True)
    sum(model.losses_and_features()[0].values()).backward()
    expected = model.grads()
    out = run_features_balancer(features_balancer(), model)
    for got, want in zip(model.grads(), expected):
        torch.testing.assert_close(got, want)
    assert out["conflict_fraction"] == 0.0 and out["conflict"] == 0.0


@pytest.mark.parametrize("granularity", ["cell", "sample"])
def test_features_space_sends_the_block_rule_into_the_trunk(granularity):
    model = TwoHeadBEVModel(seed=1)
    jac, features = independent_feature_totals(model)
    ids, sizes = feature_block_ids([f.shape for f in features], granularity, jac.device)
    blocks = [jac[:, ids == b] for b in range(len(sizes))]
    reference = turbotrain_reference(blocks)
    combined = torch.empty_like(reference)
    for b, block_update in enumerate(torch.split(reference, sizes.tolist())):
        combined[ids == b] = block_update
    for b, g_block in enumerate(blocks):  # no task is opposed in any block
        assert torch.all(g_block @ combined[ids == b] >= -1e-12)
    out = run_features_balancer(features_balancer(granularity=granularity), model)
    # The trunk below step_bev must receive exactly the combined step_bev gradient and the temporal
    # mix the combined bev gradient (both are TOTAL gradients of the features).
    bev_part, step_part = torch.split(combined, [features[0].numel(), features[1].numel()])
    trunk = list(model.trunk.parameters())
    expected = torch.autograd.grad(features[1], trunk, step_part.view_as(features[1]), retain_graph=True)
    expected += torch.autograd.grad(features[0], [model.temporal], bev_part.view_as(features[0]))
    for param, want in zip(trunk + [model.temporal], expected):
        torch.testing.assert_close(param.grad, want)
    assert out["conflict_fraction"] > 0  # the seed gives real conflicts, so the rule was exercised
    assert out["gradnorm/det"] == pytest.approx(jac[0].norm().item())
    assert out["cosine"] == pytest.approx((jac[0] @ jac[1] / (jac[0].norm() * jac[1].norm())).item())


def test_features_space_heads_get_only_their_own_task_gradient():
    model = TwoHeadBEVModel(seed=2)
    run_features_balancer(features_balancer(), model)
    losses, _ = model.losses_and_features()
    for task, params in model.task_params().items():
        own = torch.autograd.grad(losses[task], params, retain_graph=True)
        for param, want in zip(params, own):
            torch.testing.assert_close(param.grad, want)


def test_features_space_gradient_accumulation_adds():
    model = TwoHeadBEVModel(seed=3)
    run_features_balancer(features_balancer(), model)
    once = model.grads()
    balancer = features_balancer()
    model.zero_grad(set_to_none=True)
    for _ in range(2):
        losses, features = model.losses_and_features()
        balancer.backward(losses, model.shared(), model.task_params(), features=features)
    for got, single in zip(model.grads(), once):
        torch.testing.assert_close(got, 2 * single)


def test_features_space_rejects_missing_misordered_or_bypassed_features():
    model = TwoHeadBEVModel(seed=4)
    balancer = features_balancer()
    losses, features = model.losses_and_features()
    with pytest.raises(ConfigError, match="'features' key"):
        balancer.backward(losses, model.shared(), model.task_params())
    with pytest.raises(ConfigError, match="listed after it"):
        balancer.backward(losses, model.shared(), model.task_params(), features=features[::-1])
    # The detection head read as "shared" would lose its gradient: it sits after the features.
    heads = model.task_params()
    with pytest.raises(ConfigError, match="without passing through"):
        balancer.backward(losses, model.shared() + heads["det"], {"pred": heads["pred"]}, features=features)


def test_feature_block_layout():
    shapes = [torch.Size([2, 3, 2, 2]), torch.Size([2, 4, 3, 2, 2])]  # bev (B,C,H,W), step_bev (B,T,C,H,W)
    ids, sizes = feature_block_ids(shapes, "cell", torch.device("cpu"))
    bev_ids, step_ids = ids[:24].view(shapes[0]), ids[24:].view(shapes[1])
    assert torch.equal(bev_ids[:, 0].flatten(), torch.arange(8))  # one block per sample and cell ...
    assert torch.equal(bev_ids[:, 0], bev_ids[:, 2])  # ... holding all channels
    assert torch.equal(step_ids[:, 3, 2], step_ids[:, 0, 0])  # and all steps of a step map
    assert step_ids.min() == 8 and sizes.tolist() == [3] * 8 + [12] * 8  # blocks never span two features
    ids, sizes = feature_block_ids(shapes, "sample", torch.device("cpu"))
    assert torch.equal(ids[:24], torch.arange(2).repeat_interleave(12)) and sizes.tolist() == [12, 12, 48, 48]


def test_turbotrain_space_options_are_validated():
    with pytest.raises(ConfigError):
        build_balancer("turbotrain", TASKS, space="representation")
    with pytest.raises(ConfigError):
        features_balancer(granularity="tensor")
    with pytest.raises(ConfigError):
        build_balancer("turbotrain", TASKS, space="parameters", granularity="cell")
    with pytest.raises(ConfigError):
        features_balancer(trailing_fraction=0.5)
    assert features_balancer().needs_features
    assert not build_balancer("turbotrain", TASKS, space="parameters").needs_features
    installed = [n for n in BALANCERS.names() if importlib.util.find_spec(SOLVER_MODULES.get(n, "torch"))]
    assert not any(parameter_space_balancer(n).needs_features for n in installed)


def bev_dataset(num_samples: int = 8) -> TensorDataset:
    data = TwoHeadBEVModel(agreeing=True, batch=num_samples)
    return TensorDataset(data.inputs, data.targets["det"], data.targets["pred"])


def bev_step(model: TwoHeadBEVModel, batch) -> dict:
    inputs, det_target, pred_target = batch
    losses, features = model.losses_and_features(inputs, {"det": det_target, "pred": pred_target})
    return {**losses, "features": features}


def fit_bev_model(balancer, run_dir, step_fn=bev_step) -> tuple[TwoHeadBEVModel, dict]:
    model = TwoHeadBEVModel(agreeing=True)
    config = TrainConfig(max_steps=2, batch_size=2, grad_accum_steps=2, lr=1e-3, seed=0, device="cpu")
    summary = fit(model, step_fn, balancer, bev_dataset(), config, run_dir,
                  shared_params=model.shared(), task_params=model.task_params())
    return model, summary


def test_engine_passes_features_to_a_features_balancer(tmp_path):
    # Agreeing tasks: TurboTrain on the features must train exactly like the plain sum.
    reference, _ = fit_bev_model(build_balancer("sum", TASKS), tmp_path / "sum")
    model, summary = fit_bev_model(features_balancer(), tmp_path / "features")
    assert sorted(summary["final_losses"]) == TASKS  # "features" is not mistaken for a task loss
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value)
    def without_features(model: TwoHeadBEVModel, batch) -> dict:
        return {k: v for k, v in bev_step(model, batch).items() if k != "features"}

    with pytest.raises(ConfigError, match="'features' key"):
        fit_bev_model(features_balancer(), tmp_path / "missing", without_features)
