"""Figures for the report (seaborn), each written atomically as a PNG and returned as a Figure.

Inputs:

* Training logs: CSV with one row per logged step and columns ``step``, ``wall_s``, ``lr`` and one
  ``loss/<task>`` column per task (``loss/detection``, ``loss/prediction``, ...).
* Gradient logs: CSV per balancer with ``step``, ``cosine`` (cosine between the task gradients on the
  shared parameters), ``conflict`` (1 when they conflict, i.e. cosine < 0, else 0) and one
  ``gradnorm/<task>`` column per task. The trainer's own ``metrics.csv`` works as it is: its
  ``balancer/``-prefixed diagnostics are recognised and steps without diagnostics are skipped.
* Metrics: the DataFrame of :func:`turbotrain.evaluate.metrics_file.metrics_frame`.

Figures are built on :class:`matplotlib.figure.Figure` directly (no pyplot), so nothing depends on
or changes the global backend, and figures need no closing. Every axes must carry a title and x/y
labels: :func:`save_figure` refuses to write one that does not.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter

from turbotrain.utils.atomic import atomic_path

LogSource = str | os.PathLike | pd.DataFrame
_STYLE = {"style": "whitegrid", "context": "notebook", "font_scale": 1.15}
_METRIC_LABELS = {"map@0.3": "mAP@0.3", "map@0.5": "mAP@0.5", "map@0.7": "mAP@0.7", "epa": "EPA", "ap50": "AP@0.5"}


def unlabelled_axes(fig: Figure) -> list[str]:
    """Descriptions of axes missing a title, x label or y label (empty list when all are labelled)."""
    problems = []
    for index, ax in enumerate(fig.axes):
        if not ax.get_visible() or not ax.has_data():
            continue
        texts = {"title": ax.get_title(), "xlabel": ax.get_xlabel(), "ylabel": ax.get_ylabel()}
        missing = [name for name, text in texts.items() if not text]
        if missing:
            problems.append(f"axes {index}: missing {', '.join(missing)}")
    return problems


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 150) -> Path:
    """Write ``fig`` as a PNG atomically after checking every axes is labelled."""
    problems = unlabelled_axes(fig)
    if problems:
        raise ValueError(f"{path}: refusing to save an unlabelled figure ({'; '.join(problems)})")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    return Path(path)


def learning_curves(logs: Mapping[str, LogSource] | Mapping[str, Mapping[str, LogSource]],
                    path: str | os.PathLike, smooth: int = 1) -> Figure:
    """One panel per ``loss/<task>`` column: loss vs step, one line per run (``logs`` label -> CSV).

    ``logs`` may instead map a row title (a budget) to such a mapping: one row of panels each, a run
    keeping its colour across rows, so runs trained at different budgets are never drawn as one.
    ``smooth`` > 1 draws a centred rolling mean of that many logged steps over the faint raw curve.
    """
    nested = isinstance(next(iter(logs.values()), None), Mapping)
    rows = logs if nested else {"": logs}
    frames = {row: _stack(row_logs, "run") for row, row_logs in rows.items()}
    frame = pd.concat(frames.values(), ignore_index=True)
    tasks = sorted(c for c in frame.columns if c.startswith("loss/"))
    if not tasks:
        raise ValueError(f"{path}: training logs have no 'loss/<task>' column (have {list(frame.columns)})")
    runs = list(dict.fromkeys(frame["run"]))
    palette = dict(zip(runs, sns.color_palette("tab10" if len(runs) <= 10 else "tab20", len(runs))))
    with _theme():
        fig = Figure(figsize=(6.0 * len(tasks), 4.6 * len(rows)), layout="constrained")
        grid = np.atleast_2d(fig.subplots(len(rows), len(tasks), squeeze=False))
        for axes, (row, row_frame) in zip(grid, frames.items()):
            for ax, column in zip(axes, tasks):
                _smoothed_lines(ax, row_frame, "step", column, "run", smooth, palette)
                task = column.split("/", 1)[1]
                title = f"{task.capitalize()} loss" + (f" ({row})" if row else "")
                ax.set(title=title, xlabel="Training step", ylabel=f"{task} loss")
                if (frame[column].dropna() > 0).all() and _spans_decades(frame[column]):
                    ax.set_yscale("log")
        _legend_of_all(fig, list(grid.flat), palette)
        fig.suptitle("Learning curves", fontweight="bold")
    save_figure(fig, path)
    return fig


TRAJECTORY_PANELS = {  # metrics.csv column -> (title, y label)
    "loss/contrastive": ("Trajectory contrast (InfoNCE x 2T)", "contrastive loss"),
    "loss/trajectory_reconstruction": ("Cross-window reconstruction", "SmoothL1 (m)"),
    "log/positive_top1": ("Same agent ranked first", "positive top-1"),
}


def trajectory_pretraining(logs: Mapping[str, LogSource], path: str | os.PathLike, smooth: int = 10) -> Figure:
    """SmartPretrain runs (label -> their ``metrics.csv``): both losses and how often an agent's other
    window is its best match among all candidates (both windows' keys, and the queue where one is kept)."""
    frame = _stack(logs, "pretraining")
    missing = [c for c in TRAJECTORY_PANELS if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: logs lack {missing}: not trajectory pretraining runs?")
    with _theme():
        fig, axes = _panels(len(TRAJECTORY_PANELS))
        for ax, (column, (title, ylabel)) in zip(axes, TRAJECTORY_PANELS.items()):
            _smoothed_lines(ax, frame.dropna(subset=[column]), "step", column, "pretraining", smooth)
            ax.set(title=title, xlabel="Pretraining step", ylabel=ylabel)
        axes[-1].yaxis.set_major_formatter(_percent())
        _single_legend(axes)
        fig.suptitle("Trajectory pretraining (SmartPretrain)", fontweight="bold")
    save_figure(fig, path)
    return fig


def gradient_conflict(logs: Mapping[str, LogSource], path: str | os.PathLike, smooth: int = 20,
                      title_note: str = "") -> Figure:
    """Task-gradient cosine, conflict rate (rolling share of conflicting steps), gradient-norm ratio
    and the balancer's effective task-weight ratio over training, one line per balancer (``logs``
    balancer name -> gradient CSV). The weight panel makes a rule's implicit reweighting visible
    (TurboTrain's magnitude balancing, FAMO, uncertainty weighting); a plain sum stays at 1.
    ``title_note`` (which runs: pretraining, budget, seed) is appended to the title."""
    frame = _gradient_columns(_stack(logs, "balancer"))
    frame["conflict_rate"] = frame.groupby("balancer")["conflict"].transform(
        lambda s: s.astype(float).rolling(max(smooth, 1), min_periods=1).mean()
    )
    norms = sorted(c for c in frame.columns if c.startswith("gradnorm/"))
    weights = sorted(c for c in frame.columns if c.startswith("weight/"))
    with _theme():
        fig, axes = _panels(2 + (len(norms) >= 2) + (len(weights) >= 2))
        _smoothed_lines(axes[0], frame, "step", "cosine", "balancer", smooth)
        axes[0].axhline(0.0, color="0.3", lw=1, ls="--")
        axes[0].set(title="Cosine between task gradients", xlabel="Training step", ylabel="cosine similarity",
                    ylim=(-1.05, 1.05))
        sns.lineplot(data=frame, x="step", y="conflict_rate", hue="balancer", ax=axes[1], lw=2)
        axes[1].yaxis.set_major_formatter(_percent())
        axes[1].set(title=f"Conflict rate (last {smooth} logged steps)", xlabel="Training step",
                    ylabel="steps with cosine < 0", ylim=(-0.02, 1.02))
        if len(norms) >= 2:
            frame["norm_ratio"] = frame[norms[0]] / frame[norms[1]].replace(0, np.nan)
            _smoothed_lines(axes[2], frame, "step", "norm_ratio", "balancer", smooth)
            axes[2].set_yscale("log")
            # Plain numbers (0.3, 2) read faster than the default 3x10^-1 tick labels.
            plain = FuncFormatter(lambda v, _: f"{v:g}")
            axes[2].yaxis.set_major_formatter(plain)
            axes[2].yaxis.set_minor_formatter(plain)
            names = [n.split("/", 1)[1] for n in norms[:2]]
            axes[2].set(title="Task gradient-norm ratio", xlabel="Training step",
                        ylabel=f"|g_{names[0]}| / |g_{names[1]}|")
        if len(weights) >= 2:
            _weight_ratio_panel(axes[-1], frame, weights, smooth)
        _single_legend(axes)
        note = f" ({title_note})" if title_note else ""
        fig.suptitle(f"Task-gradient conflict during training{note}", fontweight="bold")
    save_figure(fig, path)
    return fig


def _weight_ratio_panel(ax, frame: pd.DataFrame, weights: list[str], smooth: int) -> None:
    """Effective weight of the second task relative to the first (log scale; 1 = unweighted)."""
    names = [w.split("/", 1)[1] for w in weights[:2]]
    frame["weight_ratio"] = frame[weights[1]] / frame[weights[0]].replace(0, np.nan)
    _smoothed_lines(ax, frame, "step", "weight_ratio", "balancer", smooth)
    ax.axhline(1.0, color="0.3", lw=1, ls="--")
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.set(title="Effective task weights", xlabel="Training step", ylabel=f"w_{names[1]} / w_{names[0]}")


def ap_vs_time(frame: pd.DataFrame, path: str | os.PathLike, metrics: Sequence[str] = ("ap50", "epa")) -> Figure:
    """Validation AP@0.5 (and EPA) against training wall time, one colour per variant, one line per seed."""
    curves = _curve_points(frame)
    present = [m for m in metrics if m in curves.columns and curves[m].notna().any()]
    if not present:
        raise ValueError(f"{path}: no run has a training curve with any of {list(metrics)}")
    curves["wall_h"] = curves["wall_s"] / 3600.0
    with _theme():
        fig, axes = _panels(len(present))
        for ax, metric in zip(axes, present):
            sns.lineplot(data=curves, x="wall_h", y=metric, hue="variant", units="seed", estimator=None,
                         marker="o", markersize=5, lw=1.8, ax=ax)
            ax.yaxis.set_major_formatter(_percent())
            label = _METRIC_LABELS.get(metric, metric)
            ax.set(title=f"{label} vs training time", xlabel="Training wall time (h)", ylabel=f"Validation {label}")
        _legend_beside(fig, axes)
        fig.suptitle("Accuracy reached per hour of training", fontweight="bold")
    save_figure(fig, path)
    return fig


def data_efficiency(
    frame: pd.DataFrame, path: str | os.PathLike, metrics: Sequence[str] = ("map@0.5", "epa")
) -> Figure:
    """Metric vs label fraction per pretraining type; mean over seeds with ± 1 std bands."""
    present = [m for m in metrics if m in frame.columns and frame[m].notna().any()]
    if not present:
        raise ValueError(f"{path}: the runs report none of {list(metrics)}")
    with _theme():
        fig, axes = _panels(len(present))
        for ax, metric in zip(axes, present):
            sns.lineplot(data=frame, x="label_fraction", y=metric, hue="pretrain", style="pretrain",
                         errorbar="sd", markers=True, markersize=8, lw=2, dashes=False, ax=ax)
            ax.xaxis.set_major_formatter(_percent())
            ax.yaxis.set_major_formatter(_percent())
            ax.set_xticks(sorted(frame["label_fraction"].unique()))
            label = _METRIC_LABELS.get(metric, metric)
            ax.set(title=f"{label} vs labelled data", xlabel="Share of training labels used", ylabel=label)
        _single_legend(axes)
        fig.suptitle("Data efficiency of pretraining", fontweight="bold")
    save_figure(fig, path)
    return fig


_VERDICT_COLOURS = {"reproduced": "#2a9d55", "not reproduced": "#c0392b", "inconclusive": "#7f8c8d"}


def claims(table: pd.DataFrame, path: str | os.PathLike) -> Figure:
    """Forest plot of ``report.claims.measure_claims``: each claim's effect with its 95% interval,
    coloured by verdict; one panel per unit (accuracy, metres, seconds), a line at no effect."""
    if table.empty:
        raise ValueError(f"{path}: no claim has both of its arms with two seeds or more in this grid")
    table = table.assign(unit=[_claim_unit(m) for m in table["metric"]],
                         row=[f"{t}\n({f}, {b})" for t, f, b in zip(table["text"], table["fusion"], table["budget"])])
    units = list(dict.fromkeys(table["unit"]))
    with _theme():
        fig = Figure(figsize=(7.5 * len(units), 0.75 * table.groupby("unit").size().max() + 1.8),
                     layout="constrained")
        axes = list(np.atleast_1d(fig.subplots(1, len(units))))
        for ax, unit in zip(axes, units):
            rows = table[table["unit"] == unit].reset_index(drop=True)
            for y, r in rows.iterrows():
                colour = _VERDICT_COLOURS[r["verdict"]]
                span = [[r["effect"] - r["ci_low"]], [r["ci_high"] - r["effect"]]] if np.isfinite(r["ci_low"]) else None
                ax.errorbar(r["effect"], y, xerr=span, fmt="o", color=colour, ms=8, capsize=4, lw=2,
                            label=r["verdict"])
            ax.axvline(0.0, color="black", lw=1, ls="--")
            ax.set_yticks(range(len(rows)), rows["row"], fontsize=9)
            ax.invert_yaxis()
            ax.set(title=unit, xlabel="treatment - baseline (95% CI, paired by seed)", ylabel="claim (fusion, budget)")
        handles = {h.get_label(): h for ax in axes for h in ax.get_legend_handles_labels()[0]}
        fig.legend(handles.values(), handles.keys(), title="verdict", loc="outside lower center",
                   ncols=len(handles))
        fig.suptitle("The papers' claims measured on our runs", fontweight="bold")
    save_figure(fig, path)
    return fig


def _claim_unit(metric: str) -> str:
    if metric.startswith("time"):
        return "training time (s)"
    return "distance (m, lower is better)" if metric in ("min_ade", "min_fde") else "accuracy (AP, EPA)"


@contextlib.contextmanager
def _theme() -> Iterator[None]:
    """Seaborn style and font scale only while a figure is built; global rcParams are restored."""
    with sns.axes_style(_STYLE["style"]), sns.plotting_context(_STYLE["context"], font_scale=_STYLE["font_scale"]):
        yield


def _panels(n: int) -> tuple[Figure, list]:
    fig = Figure(figsize=(6.0 * n, 4.6), layout="constrained")
    return fig, list(np.atleast_1d(fig.subplots(1, n)))


def _percent() -> FuncFormatter:
    # "42.5%" rather than PercentFormatter's fixed decimals, which would print 42.5 % as "43%".
    # A new formatter per axis: matplotlib binds a formatter to the axis it is set on.
    return FuncFormatter(lambda value, _: f"{100 * value:.4g}%")


def _legend_beside(fig: Figure, axes: list) -> None:
    """One legend to the right of the panels: with a dozen runs a legend inside a panel hides the curves."""
    legend = axes[0].get_legend()
    if legend is None:
        return
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes:
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    fig.legend(handles, labels, title=legend.get_title().get_text(), loc="outside right center")


def _legend_of_all(fig: Figure, axes: list, palette: Mapping[str, tuple]) -> None:
    """One legend beside the panels naming every run of every row (a row may draw only some runs)."""
    title = next((ax.get_legend().get_title().get_text() for ax in axes if ax.get_legend()), "run")
    for ax in axes:
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    handles = [Line2D([], [], color=colour, lw=2) for colour in palette.values()]
    fig.legend(handles, list(palette), title=title, loc="outside right center")


def _single_legend(axes: list) -> None:
    # Every panel uses the same colours per run, so one legend (first panel) is enough.
    for ax in axes[1:]:
        if ax.get_legend() is not None:
            ax.get_legend().remove()


def _stack(logs: Mapping[str, LogSource], label: str) -> pd.DataFrame:
    """Concatenate logs into one long frame with a ``label`` column naming each source."""
    if not logs:
        raise ValueError("no logs given")
    parts = [
        (src if isinstance(src, pd.DataFrame) else pd.read_csv(src)).assign(**{label: name})
        for name, src in logs.items()
    ]
    return pd.concat(parts, ignore_index=True)


def _gradient_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """Accept the trainer's ``balancer/``-prefixed diagnostics; keep only steps that logged them."""
    frame = frame.rename(columns=lambda c: c.removeprefix("balancer/"))
    if "cosine" not in frame.columns:
        pairs = [c for c in frame.columns if c.startswith("cosine/")]
        if not pairs:
            raise ValueError(f"gradient logs have no 'cosine' column (have {list(frame.columns)})")
        # More than two tasks: the mean pairwise cosine summarises how aligned the tasks are.
        frame["cosine"] = frame[pairs].mean(axis=1)
    frame = frame.dropna(subset=["cosine"]).copy()
    if "conflict" not in frame.columns:
        frame["conflict"] = (frame["cosine"] < 0).astype(float)
    return frame


def _smoothed_lines(ax, frame: pd.DataFrame, x: str, y: str, hue: str, smooth: int, palette=None) -> None:
    if smooth > 1:
        sns.lineplot(data=frame, x=x, y=y, hue=hue, ax=ax, lw=0.8, alpha=0.25, legend=False, palette=palette)

        def rolling_mean(values: pd.Series) -> pd.Series:
            # A window wider than a fifth of the line's logged points would flatten it to its mean.
            window = min(smooth, max(1, values.notna().sum() // 5))
            return values.rolling(window, min_periods=1, center=True).mean()

        smoothed = frame.assign(**{y: frame.groupby(hue)[y].transform(rolling_mean)})
        sns.lineplot(data=smoothed, x=x, y=y, hue=hue, ax=ax, lw=2, palette=palette)
    else:
        sns.lineplot(data=frame, x=x, y=y, hue=hue, ax=ax, lw=2, palette=palette)


def _spans_decades(values: pd.Series) -> bool:
    # A log axis only helps when the loss falls by more than an order of magnitude.
    v = values.dropna()
    return len(v) > 1 and v.max() / max(v.min(), 1e-12) > 10


def _curve_points(frame: pd.DataFrame) -> pd.DataFrame:
    """Long frame of training-curve points (step, wall_s, ap50, epa) with the run's variant and seed."""
    rows = [
        {"variant": run["variant"], "seed": run["seed"], **point}
        for _, run in frame.iterrows()
        for point in (run.get("curve") or [])
    ]
    if not rows:
        raise ValueError("no run has a training curve")
    return pd.DataFrame(rows).astype({"wall_s": float}).sort_values(["variant", "seed", "step"])
