"""Bird's-eye view of one :class:`~turbotrain.data.sample.Sample` in the ego frame at t.

Points of the current step are coloured by agent, ground-truth boxes by class (with a heading tick),
tracks show history solid and future dashed, agents are marked by type. Optional predictions are drawn
on top in black: dashed boxes with scores and one line per trajectory mode, opacity by mode probability.
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

from turbotrain.data.records import INFRASTRUCTURE
from turbotrain.data.sample import AgentFrame, Sample
from turbotrain.geometry import box_corners_bev, transform_points
from turbotrain.grid import Grid
from turbotrain.utils.atomic import atomic_path

PREDICTION_COLOR = "#222222"
EGO_COLOR = "#d62728"
# Classes take Dark2 hues that stay apart from the colour-blind palette the agents' points use.
CLASS_PALETTE = ("#e7298a", "#7570b3", "#66a61e", "#e6ab02", "#a6761d", "#666666", "#1b9e77")


def plot_sample_bev(
    sample: Sample,
    out_png: str | Path,
    grid: Grid,
    class_names: Sequence[str],
    title: str | None = None,
    predictions: Mapping[str, np.ndarray] | None = None,
) -> Path:
    """Draw ``sample`` (optionally with ``predictions``: ``boxes (N, 7)``, ``scores (N,)``,
    ``trajectories (N, K, F, 2)``, ``mode_probs (N, K)``, all optional) to ``out_png``, atomically."""
    slots = _agent_slots(sample)
    agent_colors = dict(zip(sorted(slots, key=slots.get), sns.color_palette("colorblind", len(slots))))
    class_colors = [tuple(int(h[i : i + 2], 16) / 255 for i in (1, 3, 5)) for h in CLASS_PALETTE]
    x_min, y_min, _, x_max, y_max, _ = grid.point_cloud_range
    width = 13.0
    # The legend sits right of the axes and takes about a fifth of the width.
    height = max(4.0, 0.78 * width * (y_max - y_min) / (x_max - x_min) + 1.0)
    with sns.axes_style("whitegrid"):
        fig = Figure(figsize=(width, height), dpi=110)
        ax = fig.add_subplot()
    _draw_points(ax, sample, agent_colors)
    _draw_tracks(ax, sample, class_colors)
    _draw_boxes(ax, sample.boxes, [class_colors[int(c) % len(class_colors)] for c in sample.classes])
    _draw_agents(ax, sample, agent_colors)
    if predictions:
        _draw_predictions(ax, predictions)
    ax.set(xlim=(x_min, x_max), ylim=(y_min, y_max), xlabel="x (m, ego forward)", ylabel="y (m, ego left)")
    ax.set_aspect("equal")
    ax.set_title(title or sample.sample_id, fontsize=11)
    _legend(ax, sample, slots, agent_colors, class_names, class_colors, predictions)
    fig.tight_layout()
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
    return out_png


def _agent_slots(sample: Sample) -> dict[int, int]:
    ego_id = int(sample.sample_id.split("/")[2])
    others = sorted({f.agent_id for f in sample.frames} - {ego_id})
    return {ego_id: 0, **{a: i + 1 for i, a in enumerate(others)}}


def _current_frames(sample: Sample) -> list[AgentFrame]:
    if not sample.frames:
        return []
    now = max(f.step for f in sample.frames)
    return [f for f in sample.frames if f.step == now]


def _draw_points(ax: Axes, sample: Sample, agent_colors: dict) -> None:
    frames = _current_frames(sample)
    total = sum(int(f.num_points.sum()) for f in frames)
    size = float(np.clip(3e4 / max(total, 1), 0.4, 5.0))  # sparse clouds get bigger dots to stay visible
    for frame in frames:
        xyz = transform_points(frame.points()[:, :3].astype(np.float64), frame.pose_to_ego)
        # Rasterised: vector output of 10^5 dots is slow and no sharper.
        ax.scatter(xyz[:, 0], xyz[:, 1], s=size, color=agent_colors[frame.agent_id], alpha=0.6,
                   linewidths=0, rasterized=True, zorder=1)


def _draw_boxes(ax: Axes, boxes: np.ndarray, colors: Sequence, dashed: bool = False, width: float = 1.6) -> None:
    boxes = np.asarray(boxes, np.float64).reshape(-1, 7)
    for corners, box, color in zip(box_corners_bev(boxes), boxes, colors):
        ax.add_patch(Polygon(corners, closed=True, fill=not dashed, facecolor=(*color[:3], 0.18) if not dashed else "none",
                             edgecolor=color, linewidth=width, linestyle="--" if dashed else "-", zorder=3))
        front = corners[[0, 3]].mean(axis=0)  # the heading tick runs from the centre to the front edge
        ax.plot([box[0], front[0]], [box[1], front[1]], color=color, linewidth=width, zorder=3)


def _draw_tracks(ax: Axes, sample: Sample, class_colors: Sequence) -> None:
    for m, cls in enumerate(sample.classes):
        color = class_colors[int(cls) % len(class_colors)]
        past = sample.history[m][sample.history_valid[m]]
        ax.plot(past[:, 0], past[:, 1], color=color, linewidth=1.8, solid_capstyle="round", zorder=2)
        coming = sample.future[m][sample.future_valid[m]]
        if len(coming):
            start = sample.boxes[m][None, :2]
            path = np.concatenate([start, coming[:, :2]])
            ax.plot(path[:, 0], path[:, 1], color=color, linewidth=1.5, linestyle="--", zorder=2)
            ax.scatter(coming[-1:, 0], coming[-1:, 1], color=color, s=14, marker="o", zorder=2)


def _draw_agents(ax: Axes, sample: Sample, agent_colors: dict) -> None:
    ego_id = int(sample.sample_id.split("/")[2])
    ax.scatter([0], [0], marker=">", s=160, color=EGO_COLOR, edgecolor="white", linewidth=1.2, zorder=5)
    for frame in _current_frames(sample):
        if frame.agent_id == ego_id:
            continue
        x, y = frame.pose_to_ego[0, 3], frame.pose_to_ego[1, 3]
        marker = "s" if frame.agent_type == INFRASTRUCTURE else "^"
        ax.scatter([x], [y], marker=marker, s=110, color=agent_colors[frame.agent_id], edgecolor="black",
                   linewidth=0.8, zorder=5)
        ax.annotate(str(frame.agent_id), (x, y), xytext=(6, 6), textcoords="offset points", fontsize=9,
                    fontweight="bold", zorder=6)


def _draw_predictions(ax: Axes, predictions: Mapping[str, np.ndarray]) -> None:
    boxes = np.asarray(predictions.get("boxes", np.zeros((0, 7))), np.float64).reshape(-1, 7)
    _draw_boxes(ax, boxes, [PREDICTION_COLOR] * len(boxes), dashed=True, width=1.1)
    scores = predictions.get("scores")
    for box, score in zip(boxes, np.asarray(scores) if scores is not None else []):
        ax.annotate(f"{float(score):.2f}", box[:2], xytext=(4, -10), textcoords="offset points", fontsize=7,
                    color=PREDICTION_COLOR, zorder=6)
    trajectories = predictions.get("trajectories")
    if trajectories is None:
        return
    trajectories = np.asarray(trajectories, np.float64)
    probs = np.asarray(predictions.get("mode_probs", np.ones(trajectories.shape[:2])), np.float64)
    for n, modes in enumerate(trajectories):
        start = boxes[n, :2] if n < len(boxes) else modes[0, 0]
        for k, path in enumerate(modes):
            alpha = 0.25 + 0.75 * float(probs[n, k]) / max(float(probs[n].max()), 1e-9)
            line = np.concatenate([start[None], path])
            ax.plot(line[:, 0], line[:, 1], color=PREDICTION_COLOR, linewidth=1.0, alpha=alpha, zorder=4)


def _legend(ax: Axes, sample: Sample, slots: dict, agent_colors: dict, class_names: Sequence[str],
            class_colors: Sequence, predictions) -> None:
    ego_id = int(sample.sample_id.split("/")[2])
    agent_types = {f.agent_id: f.agent_type for f in sample.frames}
    handles = []
    for agent_id in sorted(slots, key=slots.get):
        kind = "infrastructure" if agent_types.get(agent_id) == INFRASTRUCTURE else "vehicle"
        label = f"points: {kind} {agent_id}" + (" (ego)" if agent_id == ego_id else "")
        handles.append(Line2D([], [], marker="o", linestyle="", color=agent_colors[agent_id], label=label))
    present = sorted({int(c) for c in sample.classes})
    handles += [Line2D([], [], color=class_colors[c % len(class_colors)], linewidth=3, label=class_names[c])
                for c in present if c < len(class_names)]
    handles += [Line2D([], [], color="grey", linewidth=1.8, label="history"),
                Line2D([], [], color="grey", linewidth=1.5, linestyle="--", label="future")]
    if predictions:
        handles.append(Line2D([], [], color=PREDICTION_COLOR, linestyle="--", label="prediction"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
