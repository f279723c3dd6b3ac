"""Bird's-eye view of a model's output for one sample: predicted boxes and their K trajectories.

Grey-to-colour points per agent (ego frame), ground-truth boxes as light outlines with their GT
futures dashed, and every detection as a class-coloured box with its score and one line per
trajectory mode; a mode's opacity is its probability relative to the detection's best mode.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Polygon

from turbotrain.data.sample import CLASS_NAMES_DEFAULT
from turbotrain.geometry import box_corners_bev
from turbotrain.grid import Grid
from turbotrain.utils.atomic import atomic_path

GT_COLOR = "#555555"
MIN_MODE_ALPHA = 0.12  # the least likely mode stays visible


def plot_predictions(
    sample_points_by_agent: Mapping[object, np.ndarray],
    gt_boxes: np.ndarray,
    pred: Mapping[str, np.ndarray],
    gt_future: np.ndarray,
    out_png: str | Path,
    grid: Grid,
    class_names: Sequence[str] = CLASS_NAMES_DEFAULT,
    gt_future_valid: np.ndarray | None = None,
    title: str | None = None,
) -> Path:
    """Draw points ``{agent: (N, >=2) ego-frame}``, GT boxes ``(M, 7)`` and futures ``(M, F, >=2)``, and
    ``pred`` (``boxes (N, 7)``, ``scores``, ``classes``, ``trajectories (N, K, F, 2)``, ``mode_probs``)
    to ``out_png`` (written atomically)."""
    class_colors = sns.color_palette("deep", max(len(class_names), 1))
    x_min, y_min, _, x_max, y_max, _ = grid.point_cloud_range
    width = 10.0
    height = max(4.0, 0.8 * width * (y_max - y_min) / (x_max - x_min) + 0.8)
    with sns.axes_style("whitegrid"):
        fig = Figure(figsize=(width, height), dpi=110)
        ax = fig.add_subplot()
    agent_colors = _draw_points(ax, sample_points_by_agent)
    _draw_ground_truth(ax, np.asarray(gt_boxes).reshape(-1, 7), np.asarray(gt_future), gt_future_valid)
    _draw_detections(ax, pred, class_colors)
    ax.set(xlim=(x_min, x_max), ylim=(y_min, y_max), xlabel="x (m, ego forward)", ylabel="y (m, ego left)")
    ax.set_aspect("equal")
    ax.set_title(title or f"{len(pred.get('boxes', []))} detections, {len(gt_boxes)} ground-truth objects", fontsize=11)
    _legend(ax, agent_colors, pred, class_names, class_colors)
    fig.tight_layout()
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
    return out_png


def _draw_points(ax: Axes, points_by_agent: Mapping[object, np.ndarray]) -> dict:
    colors = dict(zip(points_by_agent, sns.color_palette("pastel", max(len(points_by_agent), 1))))
    total = sum(len(p) for p in points_by_agent.values())
    size = float(np.clip(2e4 / max(total, 1), 0.3, 4.0))  # sparse clouds get bigger dots to stay visible
    for agent, points in points_by_agent.items():
        points = np.asarray(points)
        # Rasterised: vector output of 10^5 dots is slow and no sharper.
        ax.scatter(points[:, 0], points[:, 1], s=size, color=colors[agent], alpha=0.7, linewidths=0, rasterized=True, zorder=1)
    return colors


def _outline(ax: Axes, box: np.ndarray, color, linestyle: str, width: float) -> None:
    corners = box_corners_bev(box[None])[0]
    ax.add_patch(Polygon(corners, closed=True, fill=False, edgecolor=color, linewidth=width, linestyle=linestyle, zorder=3))
    front = corners[[0, 3]].mean(axis=0)  # heading tick from the centre to the front edge
    ax.plot([box[0], front[0]], [box[1], front[1]], color=color, linewidth=width, zorder=3)


def _draw_ground_truth(ax: Axes, boxes: np.ndarray, future: np.ndarray, valid: np.ndarray | None) -> None:
    for m, box in enumerate(boxes):
        _outline(ax, box, GT_COLOR, ":", 1.2)
        if m >= len(future):
            continue
        steps = future[m] if valid is None else future[m][np.asarray(valid[m], bool)]
        path = np.concatenate([box[None, :2], steps[:, :2]])
        ax.plot(path[:, 0], path[:, 1], color=GT_COLOR, linestyle="--", linewidth=1.4, zorder=2)


def _draw_detections(ax: Axes, pred: Mapping[str, np.ndarray], class_colors: Sequence) -> None:
    boxes = np.asarray(pred.get("boxes", np.zeros((0, 7))), np.float64).reshape(-1, 7)
    classes = np.asarray(pred.get("classes", np.zeros(len(boxes), np.int64)))
    scores = np.asarray(pred.get("scores", np.ones(len(boxes))))
    trajectories = np.asarray(pred.get("trajectories", np.zeros((len(boxes), 0, 0, 2))), np.float64)
    probs = np.asarray(pred.get("mode_probs", np.ones(trajectories.shape[:2])), np.float64)
    for n, box in enumerate(boxes):
        color = class_colors[int(classes[n]) % len(class_colors)]
        _outline(ax, box, color, "-", 1.6)
        ax.annotate(f"{float(scores[n]):.2f}", box[:2], xytext=(5, -11), textcoords="offset points", fontsize=7, color=color, zorder=6)
        best = max(float(probs[n].max()), 1e-9) if probs.shape[1] else 1.0
        for k, path in enumerate(trajectories[n]):
            alpha = MIN_MODE_ALPHA + (1 - MIN_MODE_ALPHA) * float(probs[n, k]) / best
            line = np.concatenate([box[None, :2], path[:, :2]])
            ax.plot(line[:, 0], line[:, 1], color=color, alpha=alpha, linewidth=1.3, zorder=4)
            ax.scatter(path[-1:, 0], path[-1:, 1], color=color, alpha=alpha, s=10, zorder=4)


def _legend(ax: Axes, agent_colors: dict, pred: Mapping[str, np.ndarray], class_names: Sequence[str], class_colors) -> None:
    handles = [Line2D([], [], marker="o", linestyle="", color=c, label=f"points: agent {a}") for a, c in agent_colors.items()]
    handles += [Line2D([], [], color=GT_COLOR, linestyle=":", label="GT box"),
                Line2D([], [], color=GT_COLOR, linestyle="--", label="GT future")]
    present = sorted({int(c) for c in np.asarray(pred.get("classes", []))})
    handles += [Line2D([], [], color=class_colors[c % len(class_colors)], linewidth=2.5, label=f"pred {class_names[c]}")
                for c in present if c < len(class_names)]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
