"""Training engine: schedule, accumulation, freezing, NaN guard, resume, CSV and data order.

The toy problem (a two-task MLP on random data) also serves tests/test_checkpoint.py and
tests/test_ddp.py, which import it from here.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from turbotrain.train.balancers import build_balancer
from turbotrain.train.checkpoint import load_checkpoint
from turbotrain.train.distributed import DistContext
from turbotrain.train.engine import (
    GlobalBatchSampler,
    NonFiniteGradientError,
    NonFiniteLossError,
    TrainConfig,
    Trainer,
    epoch_permutation,
    fit,
    needs_losses_after,
)
from turbotrain.train.schedule import build_warmup_cosine, linear_weight_decay, warmup_cosine_lr
from turbotrain.utils.errors import ConfigError

TASKS = ("regression", "classification")


# ------------------------------------------------------------------------------------ toy problem
class TwoTaskMLP(nn.Module):
    """Shared trunk, one head per task."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Dropout(dropout))
        self.regression_head = nn.Linear(16, 1)
        self.classification_head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.trunk(x)
        return self.regression_head(features), self.classification_head(features)


def toy_dataset(num_samples: int = 48, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_samples, 4, generator=g)
    y = x[:, :1] * 2.0 - x[:, 1:2] + 0.1 * torch.randn(num_samples, 1, generator=g)
    label = torch.randint(0, 3, (num_samples,), generator=g)
    return TensorDataset(x, y, label)


def two_task_step(model: nn.Module, batch) -> dict:
    """Mean losses over the local batch, plus one detail scalar."""
    x, y, label = batch
    regression, logits = model(x)
    return {"regression": nn.functional.mse_loss(regression, y),
            "classification": nn.functional.cross_entropy(logits, label),
            "log": {"mean_prediction": regression.mean()}}


class SumBalancer(nn.Module):
    """Plain sum of task losses: the reference balancer for engine tests."""

    needs_losses_after = False  # its update() does nothing, so skip the post-step forward

    def __init__(self):
        super().__init__()
        self.register_buffer("epochs_ended", torch.zeros((), dtype=torch.long))
        self.epoch_losses: list[dict[str, float]] = []

    def backward(self, losses, shared_params, task_params=None, step=0) -> dict[str, float]:
        sum(losses.values()).backward()
        return {"weight/regression": 1.0, "weight/classification": 1.0}

    def end_epoch(self, epoch_losses: dict[str, float]) -> None:
        self.epochs_ended += 1
        self.epoch_losses.append(dict(epoch_losses))

    def update(self, losses_after) -> None:
        """Sum weighting does not adapt."""


class NanAtCall:
    """``two_task_step`` that returns a NaN ``task`` loss on call number ``call`` (1-based)."""

    def __init__(self, call: int, task: str):
        self.call, self.task, self.calls = call, task, 0

    def __call__(self, model, batch) -> dict:
        self.calls += 1
        out = two_task_step(model, batch)
        if self.calls == self.call:
            out[self.task] = out[self.task] * float("nan")
        return out


def make_model(seed: int = 0, dropout: float = 0.0) -> TwoTaskMLP:
    torch.manual_seed(seed)
    return TwoTaskMLP(dropout)


def base_config(**overrides) -> TrainConfig:
    values = dict(max_steps=6, batch_size=8, lr=0.05, warmup_steps=2, min_lr=0.005, weight_decay=0.01,
                  grad_clip=1.0, seed=3, checkpoint_every=3, device="cpu", diagnostics_every=2)
    values.update(overrides)
    return TrainConfig(**values)


def train(run_dir: Path, config: TrainConfig, step_fn=two_task_step, model=None, balancer=None, **kwargs):
    model = model if model is not None else make_model()
    balancer = balancer if balancer is not None else SumBalancer()
    summary = fit(model, step_fn, balancer, toy_dataset(), config, run_dir, **kwargs)
    return model, balancer, summary


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# ------------------------------------------------------------------------------------ schedule
def test_schedule_warms_up_linearly_then_follows_cosine_to_min_lr():
    base, floor, warmup, total = 1.0, 0.1, 4, 14
    assert [warmup_cosine_lr(s, base, floor, warmup, total) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    midpoint = warmup + (total - warmup) // 2
    assert warmup_cosine_lr(midpoint, base, floor, warmup, total) == pytest.approx((base + floor) / 2)
    assert warmup_cosine_lr(total, base, floor, warmup, total) == pytest.approx(floor)
    assert warmup_cosine_lr(total + 5, base, floor, warmup, total) == pytest.approx(floor)


def test_scheduler_sets_every_group_lr_from_the_closed_form():
    params = [nn.Parameter(torch.zeros(2, 2)), nn.Parameter(torch.zeros(2))]
    optimizer = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:]}], lr=0.2)
    scheduler = build_warmup_cosine(optimizer, 0.2, 0.02, warmup_steps=3, total_steps=10)
    for step in range(12):
        expected = warmup_cosine_lr(step, 0.2, 0.02, 3, 10)
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([expected, expected])
        optimizer.step()
        scheduler.step()


def test_logged_learning_rate_follows_the_schedule(tmp_path):
    cfg = base_config()
    train(tmp_path, cfg)
    rows = read_rows(tmp_path / "metrics.csv")
    logged = [float(r["lr"]) for r in rows]
    expected = [warmup_cosine_lr(s, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps) for s in range(6)]
    assert logged == pytest.approx(expected)


def test_weight_decay_rises_linearly_from_its_start_and_only_on_the_decayed_group(tmp_path, monkeypatch):
    # SmartPretrain: 0.01 -> 0.1 over training; biases keep none. Recorded as each update is applied.
    assert [linear_weight_decay(s, 6, 0.01, 0.1) for s in (0, 3, 6, 9)] == pytest.approx([0.01, 0.055, 0.1, 0.1])
    seen, optimizer_step = [], torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        seen.append(tuple(g["weight_decay"] for g in self.param_groups))
        return optimizer_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    train(tmp_path, base_config(weight_decay=0.1, weight_decay_start=0.01))
    assert [decayed for decayed, _ in seen] == pytest.approx([linear_weight_decay(s, 6, 0.01, 0.1) for s in range(6)])
    assert {bias for _, bias in seen} == {0.0}
    with pytest.raises(ConfigError, match="weight_decay_start"):
        base_config(weight_decay_start=-1.0).validate()


# ------------------------------------------------------------------------------------ data order
def test_epoch_permutation_is_a_pure_function_of_seed_and_epoch():
    assert torch.equal(epoch_permutation(20, 1, 2), epoch_permutation(20, 1, 2))
    assert not torch.equal(epoch_permutation(20, 1, 2), epoch_permutation(20, 1, 3))
    assert sorted(epoch_permutation(20, 1, 2).tolist()) == list(range(20))


def test_ranks_split_each_global_batch_without_overlap():
    def shards(rank: int, world: int) -> list[list[int]]:
        ctx = DistContext(rank, world, rank, torch.device("cpu"))
        return list(GlobalBatchSampler(22, batch_size=4, accum_steps=2, ctx=ctx, seed=0, epoch=1))

    single = shards(0, 1)
    rank0, rank1 = shards(0, 2), shards(1, 2)
    assert len(single) == 4  # 22 // (4*2) = 2 steps x 2 micro-batches; the partial batch is dropped
    assert [a + b for a, b in zip(rank0, rank1)] == single


def test_sampler_resumes_mid_epoch_at_the_same_samples():
    ctx = DistContext(0, 1, 0, torch.device("cpu"))
    full = list(GlobalBatchSampler(30, 3, 2, ctx, seed=5, epoch=0))
    resumed = list(GlobalBatchSampler(30, 3, 2, ctx, seed=5, epoch=0, start_step=2))
    assert resumed == full[4:]


def test_worker_processes_do_not_change_the_result(tmp_path):
    in_process, _, _ = train(tmp_path / "w0", base_config(max_steps=3, num_workers=0))
    with_workers, _, _ = train(tmp_path / "w2", base_config(max_steps=3, num_workers=2))
    for (name, a), b in zip(in_process.state_dict().items(), with_workers.state_dict().values()):
        assert torch.equal(a, b), name


# ------------------------------------------------------------------------------------ updates
def test_gradient_accumulation_matches_the_larger_batch(tmp_path):
    big, _, _ = train(tmp_path / "big", base_config(batch_size=8, grad_accum_steps=1))
    accum, _, _ = train(tmp_path / "accum", base_config(batch_size=4, grad_accum_steps=2))
    for (name, a), b in zip(big.state_dict().items(), accum.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


def test_frozen_prefixes_receive_no_updates(tmp_path):
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train(tmp_path, base_config(freeze_prefixes=("trunk.",)), model=model)
    after = model.state_dict()
    for name in before:
        if name.startswith("trunk."):
            assert torch.equal(before[name], after[name]), name
        else:
            assert not torch.equal(before[name], after[name]), name


def test_a_freeze_prefix_matching_nothing_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="encoder"):
        train(tmp_path, base_config(freeze_prefixes=("encoder.",)))


def test_epoch_means_reach_the_balancer(tmp_path):
    # 48 samples / 8 per step = 6 steps per epoch; 12 steps = 2 epochs.
    _, balancer, summary = train(tmp_path, base_config(max_steps=None, epochs=2))
    assert summary["steps"] == 12 and summary["epochs"] == 2
    assert int(balancer.epochs_ended) == 2
    rows = read_rows(tmp_path / "metrics.csv")
    first_epoch = [float(r["loss/regression"]) for r in rows if r["epoch"] == "0"]
    assert balancer.epoch_losses[0]["regression"] == pytest.approx(sum(first_epoch) / 6)


# ------------------------------------------------------------------------------------ NaN guard
def test_nan_loss_stops_naming_step_and_task_and_keeps_the_good_checkpoint(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"'classification' at step 5\b") as err:
        train(tmp_path, base_config(checkpoint_every=2), step_fn=NanAtCall(5, "classification"))
    assert (err.value.step, err.value.task) == (5, "classification")
    last = load_checkpoint(tmp_path / "last.pt")
    assert last["progress"]["step"] == 4
    assert all(torch.isfinite(v).all() for v in last["model"].values())
    assert not (tmp_path / "final.pt").exists()


def nan_gradient_step(model: nn.Module, batch) -> dict:
    """Finite losses whose gradient is NaN: d sqrt(|u|)/du at u = 0 is inf * 0."""
    out = two_task_step(model, batch)
    regression, _ = model(batch[0])
    out["regression"] = out["regression"] + torch.sqrt((regression - regression.detach()).abs()).sum()
    return out


def test_finite_loss_with_nan_gradient_stops_before_the_update(tmp_path):
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NonFiniteGradientError, match="step 1"):
        train(tmp_path, base_config(), step_fn=nan_gradient_step, model=model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------------ resume + CSV
def test_resume_after_a_crash_matches_an_uninterrupted_run_and_logs_each_step_once(tmp_path):
    reference, _, _ = train(tmp_path / "reference", base_config())
    crashed = tmp_path / "crashed"
    with pytest.raises(NonFiniteLossError):
        train(crashed, base_config(), step_fn=NanAtCall(6, "regression"))
    assert [r["step"] for r in read_rows(crashed / "metrics.csv")] == ["1", "2", "3", "4", "5"]
    resumed, _, summary = train(crashed, base_config())
    assert summary["resumed_from_step"] == 3 and summary["steps"] == 6
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    rows = read_rows(crashed / "metrics.csv")
    assert [r["step"] for r in rows] == [str(s) for s in range(1, 7)]
    assert _without_timing(rows) == _without_timing(read_rows(tmp_path / "reference" / "metrics.csv"))


def _without_timing(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{k: v for k, v in r.items() if k not in ("wall_s", "samples_per_s")} for r in rows]


def test_metrics_csv_has_the_documented_columns(tmp_path):
    train(tmp_path, base_config(max_steps=2, diagnostics_every=2))
    rows = read_rows(tmp_path / "metrics.csv")
    expected = {"step", "epoch", "wall_s", "lr", "loss/regression", "loss/classification", "grad_norm",
                "samples_per_s", "log/mean_prediction", "balancer/weight/regression"}
    assert expected <= set(rows[0])
    assert all(math.isfinite(float(rows[-1][k])) for k in ("grad_norm", "loss/regression", "lr"))
    assert (tmp_path / "tensorboard").is_dir()


def test_completed_run_is_not_retrained_and_a_changed_config_is_refused(tmp_path):
    _, _, first = train(tmp_path, base_config())
    model, _, again = train(tmp_path, base_config())
    assert again["steps"] == first["steps"] == 6 and again["resumed_from_step"] == 6
    final = load_checkpoint(tmp_path / "final.pt")["model"]
    assert all(torch.equal(final[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ConfigError, match="lr"):
        train(tmp_path, base_config(lr=0.01))


def test_checkpoint_hook_sees_each_checkpoint_and_the_final_one(tmp_path):
    seen: list[tuple[int, bool]] = []
    hook = lambda step, model: seen.append((step, model.training))  # noqa: E731
    _, _, summary = train(tmp_path, base_config(checkpoint_every=2), on_checkpoint=hook)
    assert [s for s, _ in seen] == [2, 4, 6]
    assert set(summary) >= {"steps", "epochs", "wall_s", "final_losses", "device", "world_size"}
    assert summary["device"] == "cpu" and summary["world_size"] == 1
    assert set(summary["final_losses"]) == set(TASKS)


def test_config_from_dict_rejects_unknown_keys():
    assert TrainConfig.from_dict({"max_steps": 3, "betas": [0.9, 0.95]}).betas == (0.9, 0.95)
    with pytest.raises(ConfigError, match="learning_rate"):
        TrainConfig.from_dict({"max_steps": 3, "learning_rate": 0.1})
    with pytest.raises(ConfigError, match="epochs or max_steps"):
        TrainConfig().validate()


# ------------------------------------------------------------------------------------ real balancers
def test_learnable_balancer_weights_are_optimised_and_checkpointed(tmp_path):
    balancer = build_balancer("uncertainty", list(TASKS))
    train(tmp_path, base_config(), balancer=balancer)
    assert not torch.equal(balancer.log_variances.detach(), torch.zeros(2))
    saved = load_checkpoint(tmp_path / "final.pt")["balancer"]
    assert torch.equal(saved["uw.log_var"], balancer.log_variances.detach())


def test_famo_gets_one_post_step_update_per_step(tmp_path):
    balancer = build_balancer("famo", list(TASKS))
    assert needs_losses_after(balancer) and not needs_losses_after(SumBalancer())
    assert not needs_losses_after(build_balancer("sum", list(TASKS)))
    train(tmp_path, base_config(grad_accum_steps=2, batch_size=4), balancer=balancer)
    assert int(balancer.logits.steps) == 6
    assert not torch.equal(balancer.task_weights(), torch.full((2,), 0.5))


def test_per_task_gradient_diagnostics_are_requested_every_n_steps(tmp_path):
    train(tmp_path, base_config(diagnostics_every=3), balancer=build_balancer("sum", list(TASKS)))
    rows = read_rows(tmp_path / "metrics.csv")
    assert [r["step"] for r in rows if r.get("balancer/cosine")] == ["1", "3", "6"]


def test_gradient_surgery_on_the_shared_trunk_trains_and_logs_every_step(tmp_path):
    model = make_model()
    heads = {"regression": list(model.regression_head.parameters()),
             "classification": list(model.classification_head.parameters())}
    balancer = build_balancer("pcgrad", list(TASKS))
    _, _, summary = train(tmp_path, base_config(), model=model, balancer=balancer,
                          shared_params=list(model.trunk.parameters()), task_params=heads)
    rows = read_rows(tmp_path / "metrics.csv")
    assert all(r["balancer/cosine"] for r in rows) and summary["steps"] == 6


def _one_step_with_scaler(tmp_path: Path, scaler: torch.amp.GradScaler | None) -> list[torch.Tensor]:
    model, balancer = make_model(), build_balancer("uncertainty", list(TASKS))
    ctx = DistContext(0, 1, 0, torch.device("cpu"))
    trainer = Trainer(model, two_task_step, balancer, toy_dataset(), None, base_config(grad_accum_steps=2),
                      tmp_path, ctx, None, None, None)
    if scaler is not None:
        trainer.scaler = scaler  # the engine enables fp16 scaling on CUDA only; exercise it on CPU
    x, y, label = toy_dataset()[:8]
    trainer.train_step([(x[:4], y[:4], label[:4]), (x[4:], y[4:], label[4:])])
    return [p.detach().clone() for p in trainer.params]


def test_fp16_loss_scaling_path_gives_the_unscaled_update(tmp_path):
    # Uncertainty weighting is not linear in the losses, so scaling loss values would change it.
    plain = _one_step_with_scaler(tmp_path / "plain", None)
    scaled = _one_step_with_scaler(tmp_path / "scaled", torch.amp.GradScaler("cpu", init_scale=2.0**12))
    for a, b in zip(plain, scaled):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
