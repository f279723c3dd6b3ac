"""torchjd aggregators and scalarizers by name: our wiring gives torchjd's own result on fixed gradients,
in the parameters and the features space; gradnorm_scaling; TurboTrain's magnitude-balancing switch."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from torchjd import aggregation, scalarization
from torchjd._linalg._gramian import normalize, regularize

from test_balancers import TASKS, SharedTrunkModel, run_balancer, shared_grad
from turbotrain.train.balancers import AGGREGATORS, SCALARIZERS, build_balancer
from turbotrain.train.balancers.aggregators import NNLSProjector

# The torchjd aggregator each name must equal, built with the same (default) options.
REFERENCE = {
    "upgrad": lambda: aggregation.UPGrad(projector=NNLSProjector()),
    "dualproj": lambda: aggregation.DualProj(projector=NNLSProjector()),
    "config": aggregation.ConFIG,
    "aligned_mtl": aggregation.AlignedMTL,
    "nash_mtl": lambda: aggregation.NashMTL(n_tasks=2),
    "fairgrad": lambda: aggregation.FairGrad(alpha=1.0),
    "imtl_g": aggregation.IMTLG,
    "gradvac": aggregation.GradVac,
    "mgda": aggregation.MGDA,
    "graddrop": aggregation.GradDrop,
    "excess_mtl": aggregation.ExcessMTL,
    "mean": aggregation.Mean,
}
NEEDS = {"nash_mtl": "ecos"}


def needs_solver(name: str) -> None:
    if name in NEEDS and importlib.util.find_spec(NEEDS[name]) is None:
        pytest.skip(f"torchjd's {name} needs torchjd[{name}] ({NEEDS[name]})")


def test_every_aggregator_has_a_reference():
    assert set(REFERENCE) == set(AGGREGATORS)


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_parameters_space_gives_torchjds_aggregate(name):
    needs_solver(name)
    model = SharedTrunkModel(TASKS, seed=4)
    jac = model.task_gradients()
    torch.manual_seed(0)  # GradDrop's masks come from the global generator
    out = run_balancer(build_balancer(name, TASKS), model)
    torch.manual_seed(0)
    expected = REFERENCE[name]()(jac)
    torch.testing.assert_close(shared_grad(model), expected, rtol=1e-6, atol=1e-9)
    weights = torch.tensor([out["weight/det"], out["weight/pred"]], dtype=jac.dtype)
    if name != "graddrop":  # GradDrop masks elementwise: its update leaves the span of the task gradients
        torch.testing.assert_close(weights @ jac, expected, rtol=1e-5, atol=1e-8)  # logged weights explain it
    for task, head in model.heads.items():  # heads keep their own plain gradient
        own = torch.autograd.grad(model.losses()[task], list(head.parameters()))
        for param, g in zip(head.parameters(), own):
            torch.testing.assert_close(param.grad, g)


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_features_space_sends_torchjds_feature_aggregate_through_the_trunk(name):
    needs_solver(name)
    model = SharedTrunkModel(TASKS, seed=6)

    def losses_and_features():
        features = model.trunk(model.inputs)
        return {t: (h(features) - model.targets[t]).pow(2).mean() for t, h in model.heads.items()}, features

    losses, features = losses_and_features()
    feature_jac = torch.stack([torch.autograd.grad(losses[t], features, retain_graph=True)[0].reshape(-1)
                               for t in TASKS])
    torch.manual_seed(0)
    total = REFERENCE[name]()(feature_jac).view_as(features)
    expected = torch.autograd.grad(features, model.shared(), grad_outputs=total)
    model.zero_grad(set_to_none=True)
    losses, features = losses_and_features()
    torch.manual_seed(0)
    balancer = build_balancer(name, TASKS, space="features")
    assert balancer.needs_features
    balancer.backward(losses, model.shared(), model.task_params(), features=[features])
    torch.testing.assert_close(shared_grad(model), torch.cat([g.reshape(-1) for g in expected]),
                               rtol=1e-6, atol=1e-9)


def test_aggregator_options_are_passed_through():
    model = SharedTrunkModel(TASKS, seed=4)
    jac = model.task_gradients()
    run_balancer(build_balancer("upgrad", TASKS, pref_vector=[0.2, 0.8]), model)
    expected = aggregation.UPGrad(pref_vector=torch.tensor([0.2, 0.8]), projector=NNLSProjector())(jac)
    torch.testing.assert_close(shared_grad(model), expected)
    run_balancer(build_balancer("aligned_mtl", TASKS, scale_mode="median"), model)
    torch.testing.assert_close(shared_grad(model), aggregation.AlignedMTL(scale_mode="median")(jac))


def test_nnls_projector_solves_the_dual_cone_program():
    # KKT of min v^T G v s.t. v >= u: v >= u, lambda = G v >= 0, lambda_i (v_i - u_i) = 0, on the
    # gramian torchjd's projector uses (normalised, regularised).
    torch.manual_seed(1)
    jac = torch.randn(3, 7, dtype=torch.float64)
    jac[1] = -0.8 * jac[0] + 0.1 * jac[1]
    G = jac @ jac.T
    U = torch.eye(3, dtype=torch.float64)
    V = NNLSProjector()(U, G)
    Gn = regularize(normalize(G, 1e-4), 1e-4)
    multipliers = V @ Gn
    assert torch.all(V >= U - 1e-10) and torch.all(multipliers >= -1e-10)
    torch.testing.assert_close(multipliers * (V - U), torch.zeros_like(V), atol=1e-10, rtol=0)
    if importlib.util.find_spec("quadprog") and importlib.util.find_spec("qpsolvers"):
        from torchjd.linalg import QuadprogProjector

        torch.testing.assert_close(V, QuadprogProjector()(U, G), atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(SCALARIZERS))
def test_scalarizers_give_torchjds_objective_gradient(name):
    model = SharedTrunkModel(TASKS, seed=2)
    reference = {"stch": lambda: scalarization.STCH(1.0), "imtl_l": lambda: scalarization.IMTLL(2),
                 "geometric_mean": scalarization.GeometricMean}[name]()
    losses = model.losses()
    expected = torch.autograd.grad(reference(torch.stack([losses[t] for t in TASKS])), model.shared())
    out = run_balancer(build_balancer(name, TASKS), model)
    torch.testing.assert_close(shared_grad(model), torch.cat([g.reshape(-1) for g in expected]))
    jac = model.task_gradients()
    weights = torch.tensor([out["weight/det"], out["weight/pred"]], dtype=jac.dtype)
    torch.testing.assert_close(weights @ jac, shared_grad(model))


def test_gradnorm_scaling_gives_every_task_a_unit_shared_gradient():
    model = SharedTrunkModel(TASKS, seed=3)
    jac = model.task_gradients()
    norms = jac.norm(dim=1)
    out = run_balancer(build_balancer("gradnorm_scaling", TASKS), model)
    torch.testing.assert_close(shared_grad(model), (jac / norms[:, None]).sum(dim=0))
    assert out["weight/det"] == pytest.approx(1 / norms[0].item())
    for i, (task, head) in enumerate(model.heads.items()):
        own = torch.autograd.grad(model.losses()[task], list(head.parameters()))
        for param, g in zip(head.parameters(), own):
            torch.testing.assert_close(param.grad, g / norms[i])


def test_turbotrain_without_magnitude_balancing_is_pcgrad_per_block():
    model = SharedTrunkModel(TASKS, seed=0)
    jac = model.task_gradients()
    assert (jac[0] @ jac[1]) < 0  # this seed's tasks conflict, so the switch matters
    out = run_balancer(build_balancer("turbotrain", TASKS, space="parameters", granularity="global",
                                      magnitude_balancing=False), model)
    torch.testing.assert_close(shared_grad(model), aggregation.PCGrad()(jac))  # order-free for K = 2
    balanced = run_balancer(build_balancer("turbotrain", TASKS, space="parameters", granularity="global"), model)
    assert balanced["weight/det"] != pytest.approx(out["weight/det"])


def test_turbotrain_defaults_to_the_features_space():
    assert build_balancer("turbotrain", TASKS).space == "features"


def test_schema_rejects_unknown_balancer_options():
    from turbotrain.config import load_config
    from turbotrain.utils.errors import ConfigError

    config = load_config("config/smoke.yaml", ["finetune.balancer_options={'upgrad': {'space': 'features'}}"])
    assert config["finetune"]["balancer_options"]["upgrad"] == {"space": "features"}
    with pytest.raises(ConfigError):
        load_config("config/smoke.yaml", ["finetune.balancer_options={'upgrad': {'spaces': 'features'}}"])
    with pytest.raises(ConfigError):
        load_config("config/smoke.yaml", ["finetune.balancer_options={'aligned_mtl': {'scale_mode': 'max'}}"])


def test_cli_trains_the_default_model_with_upgrad(tmp_path):
    from turbotrain.cli import main
    from turbotrain.data.synth import generate_dataset
    from turbotrain.stages.data import fuse
    from turbotrain.config import load_config

    overrides = ["finetune.joint.max_steps=2", "evaluation.curve_samples=0", "train.batch_size=2",
                 "train.warmup_steps=0", "finetune.balancer_options={'upgrad': {'space': 'features'}}"]
    config = load_config("config/smoke.yaml", overrides)
    generate_dataset(tmp_path / "raw", preset="smoke", seed=0, progress=False,
                     overrides={"splits": {"train": 1, "val": 0, "test": 0}, "frames": 10})
    fuse(config, tmp_path / "raw", "train", tmp_path / "cache")
    sets = [arg for o in overrides for arg in ("--set", o)]
    code = main(["train", "--config", "config/smoke.yaml", *sets, "--fusion", "attfuse", "--pretrain", "none",
                 "--recipe", "joint", "--balancer", "upgrad", "--cache", str(tmp_path / "cache"),
                 "--out", str(tmp_path / "run")])
    assert code == 0 and (tmp_path / "run" / "final.pt").exists()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["run"]["balancer"] == "upgrad" and summary["training"]["steps"] == 2
    assert summary["stages"][0]["balancer_options"] == {"space": "features"}
