"""Figures: files exist, are real PNGs, and every axes has a title and labelled axes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from turbotrain.evaluate.metrics_file import metrics_frame
from turbotrain.report.figures import (
    ap_vs_time,
    data_efficiency,
    gradient_conflict,
    learning_curves,
    save_figure,
    trajectory_pretraining,
    unlabelled_axes,
)

FIXTURES = Path(__file__).parent / "fixtures" / "metrics"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def training_log(seed: int, scale: float) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    step = np.arange(0, 400, 10)
    decay = np.exp(-step / 150)
    return pd.DataFrame({
        "step": step,
        "wall_s": step * 1.5,
        "loss/detection": scale * (0.3 + 2.0 * decay) * rng.uniform(0.9, 1.1, len(step)),
        "loss/prediction": scale * (0.8 + 4.0 * decay) * rng.uniform(0.9, 1.1, len(step)),
        "lr": 2e-3 * np.cos(step / 400 * np.pi / 2),
    })


def gradient_log(seed: int, conflict_bias: float) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    step = np.arange(200)
    cosine = np.clip(conflict_bias + 0.3 * rng.standard_normal(len(step)), -1, 1)
    return pd.DataFrame({
        "step": step,
        "cosine": cosine,
        "conflict": (cosine < 0).astype(int),
        "gradnorm/detection": rng.uniform(0.5, 1.5, len(step)),
        "gradnorm/prediction": rng.uniform(2.0, 4.0, len(step)),
        "weight/detection": np.ones(len(step)),
        "weight/prediction": np.exp(conflict_bias * np.sin(step / 30.0)),
    })


def assert_png(path: Path) -> None:
    assert path.stat().st_size > 10_000
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert not list(path.parent.glob("*.partial"))


def assert_labelled(fig: Figure, panels: int) -> None:
    assert len(fig.axes) == panels
    assert unlabelled_axes(fig) == []
    legend = fig.axes[0].get_legend() or (fig.legends[0] if fig.legends else None)  # in a panel or beside them
    assert legend is not None and legend.get_texts()


def test_learning_curves(tmp_path):
    csv = tmp_path / "log_multistage.csv"
    training_log(1, 1.3).to_csv(csv, index=False)
    fig = learning_curves({"turbotrain": training_log(0, 1.0), "multistage": csv}, tmp_path / "learning.png", smooth=5)
    assert_png(tmp_path / "learning.png")
    assert_labelled(fig, 2)
    assert [ax.get_xlabel() for ax in fig.axes] == ["Training step", "Training step"]
    assert fig.axes[0].get_title() == "Detection loss"
    with pytest.raises(ValueError, match="loss/<task>"):
        learning_curves({"x": pd.DataFrame({"step": [0], "lr": [1.0]})}, tmp_path / "none.png")


def test_gradient_conflict(tmp_path):
    logs = {"sum": gradient_log(0, 0.0), "pcgrad": gradient_log(1, 0.2), "turbotrain": gradient_log(2, 0.35)}
    fig = gradient_conflict(logs, tmp_path / "conflict.png", smooth=20)
    assert_png(tmp_path / "conflict.png")
    assert_labelled(fig, 4)
    assert fig.axes[1].get_ylabel() == "steps with cosine < 0"
    # the effective weights: the plain sum's ratio is 1 throughout, the others move
    assert fig.axes[3].get_title() == "Effective task weights"
    curves = [np.asarray(line.get_ydata(), float) for line in fig.axes[3].get_lines() if len(line.get_ydata()) > 2]
    assert any(np.allclose(y, 1.0) for y in curves) and any(not np.allclose(y, 1.0) for y in curves)


def test_gradient_conflict_reads_trainer_logs_with_sparse_diagnostics(tmp_path):
    # The trainer prefixes diagnostics with "balancer/" and leaves them blank on most steps.
    log = gradient_log(3, 0.1).add_prefix("balancer/").rename(columns={"balancer/step": "step"})
    log.loc[log.index % 2 == 1, [c for c in log.columns if c != "step"]] = np.nan
    csv = tmp_path / "metrics.csv"
    log.assign(**{"loss/detection": 1.0}).to_csv(csv, index=False)
    fig = gradient_conflict({"pcgrad": csv}, tmp_path / "conflict.png", smooth=5)
    assert_png(tmp_path / "conflict.png")
    assert_labelled(fig, 4)
    assert len(fig.axes[1].get_lines()[0].get_xdata()) == 100  # only the logged steps


def test_ap_vs_time_and_data_efficiency(tmp_path):
    frame = metrics_frame(sorted(FIXTURES.glob("main-*/metrics.json")))
    fig = ap_vs_time(frame, tmp_path / "ap_vs_time.png")
    assert_png(tmp_path / "ap_vs_time.png")
    assert_labelled(fig, 2)
    assert fig.axes[0].get_xlabel() == "Training wall time (h)"

    runs = metrics_frame(sorted(FIXTURES.glob("*/metrics.json")))
    fig = data_efficiency(runs, tmp_path / "data_efficiency.png")
    assert_png(tmp_path / "data_efficiency.png")
    assert_labelled(fig, 2)
    assert fig.axes[1].get_ylabel() == "EPA"


def test_save_figure_refuses_unlabelled_axes(tmp_path):
    fig = Figure()
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1])
    ax.set_title("a line")
    assert unlabelled_axes(fig) == ["axes 0: missing xlabel, ylabel"]
    with pytest.raises(ValueError, match="unlabelled"):
        save_figure(fig, tmp_path / "bad.png")
    assert not list(tmp_path.iterdir())


def test_trajectory_pretraining_curves(tmp_path):
    steps = np.arange(1, 201)
    log = pd.DataFrame({"step": steps, "loss/contrastive": 6.0 / np.sqrt(steps),
                        "loss/trajectory_reconstruction": 0.5 / steps ** 0.3,
                        "log/positive_top1": np.where(steps % 5 == 0, np.nan, 1 - 1 / np.sqrt(steps))})
    fig = trajectory_pretraining({"trajectory (A)": log, "trajectory (A+B)": log.assign(**{"loss/contrastive": 5.0})},
                                 tmp_path / "trajectory.png")
    assert_png(tmp_path / "trajectory.png")
    assert_labelled(fig, 3)
    assert fig.axes[2].get_ylabel() == "positive top-1"
    assert fig.axes[0].get_legend() is not None and fig.axes[1].get_legend() is None
    with pytest.raises(ValueError, match="not trajectory pretraining runs"):
        trajectory_pretraining({"x": log.drop(columns=["log/positive_top1"])}, tmp_path / "none.png")


def test_learning_curves_draw_one_row_per_budget_and_keep_each_runs_colour(tmp_path):
    logs = {"matched budget": {"joint": training_log(0, 1.0), "multistage": training_log(1, 1.3)},
            "proportional budget": {"multistage": training_log(1, 1.3), "trajectory": training_log(2, 1.1)}}
    fig = learning_curves(logs, tmp_path / "learning.png")
    assert_labelled(fig, 4)
    assert [ax.get_title() for ax in fig.axes] == ["Detection loss (matched budget)", "Prediction loss (matched budget)",
                                                   "Detection loss (proportional budget)",
                                                   "Prediction loss (proportional budget)"]
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["joint", "multistage", "trajectory"]
    colours = {t.get_text(): h.get_color() for t, h in zip(legend.get_texts(), legend.legend_handles)}
    first_row, second_row = fig.axes[0], fig.axes[2]
    assert first_row.get_lines()[1].get_color() == second_row.get_lines()[0].get_color() == colours["multistage"]


def test_figure_budgets_include_runs_on_their_own_schedule():
    """A group naming no budget trains on ``schedule`` (the smoke config): its figures must still draw."""
    from turbotrain.stages.report import _budgets_in_order
    runs = pd.DataFrame({"budget": ["schedule", "proportional", "matched"]})
    config = {"experiments": {"budgets": {"matched": {}, "proportional": {}}}}
    assert _budgets_in_order(config, runs) == ["matched", "proportional", "schedule"]
    assert _budgets_in_order({"experiments": {}}, runs[runs["budget"] == "schedule"]) == ["schedule"]
