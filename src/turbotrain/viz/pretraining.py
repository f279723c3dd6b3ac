"""Bird's-eye view of masked reconstruction for one sample at the present step, in the ego frame.

Visible points (those of unmasked voxels, every agent), the masked BEV cells shaded, and inside them
the real points the Chamfer loss compares against next to the points the decoder reconstructed.
The top panel shows the whole grid; the bottom one zooms on the masked cells with the most points,
with the cell lattice drawn, because 20 predicted points per 0.8 m cell are invisible at full scale.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import seaborn as sns
import torch
from matplotlib.axes import Axes
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle

from turbotrain.data.sample import Batch, Sample, collate
from turbotrain.grid import Grid
from turbotrain.pretrain.chamfer import chamfer_distance
from turbotrain.pretrain.masking import BevCellIndexer, MaskPlan
from turbotrain.utils.atomic import atomic_path
from turbotrain.utils.errors import ConfigError

VISIBLE_COLOR = "#4c72b0"
MASKED_CELL_COLOR = "#f2b134"
REAL_COLOR = "#c0392b"
RECONSTRUCTED_COLOR = "#1b7837"
EGO_COLOR = "#222222"
ZOOM_SIZE = (16.0, 8.0)  # metres (x, y) of the zoomed window


@dataclass
class MaskingView:
    """Everything :func:`plot_masking` draws, in ego-frame metres, for one sample at the present step."""

    visible: np.ndarray  # (N, 2) xy of points in unmasked voxels
    masked_cells: np.ndarray  # (C, 2) int row, col of masked cells
    real: list[np.ndarray]  # per masked cell, (n_c, 2) xy of its target points
    reconstructed: list[np.ndarray]  # per masked cell, (K, 2) xy of its predicted points
    chamfer: float  # mean squared-L2 Chamfer over the cells shown (m^2; a diagnostic, not pretrain.chamfer), nan if none
    nonempty_cells: int  # non-empty cells of this sample at the present step


def masking_view(batch: Batch, plan: MaskPlan, predicted: torch.Tensor | np.ndarray, grid: Grid,
                 sample_index: int = 0) -> MaskingView:
    """Select sample ``sample_index`` at the present step from a plan and ``predicted`` (N, K, 3) offsets."""
    predicted = torch.as_tensor(predicted, dtype=torch.float32).detach().cpu()
    indexer = BevCellIndexer(grid, plan.num_steps)
    now = plan.num_steps - 1
    shown = (plan.cells[:, 0] == sample_index) & (plan.cells[:, 1] == now)
    centres = indexer.cell_centres(plan.cells[shown])
    targets, target_mask = plan.target[shown], plan.target_mask[shown]
    pred = predicted[shown]
    real = [(t[m] + c)[:, :2].numpy() for t, m, c in zip(targets, target_mask, centres)]
    reconstructed = [(p + c)[:, :2].numpy() for p, c in zip(pred, centres)]
    distance, valid = chamfer_distance(pred, None, targets, target_mask)
    chamfer = float(distance[valid].mean()) if bool(valid.any()) else float("nan")
    visible_xy, nonempty = _present_points(batch, plan, indexer, sample_index)
    return MaskingView(visible_xy, plan.cells[shown][:, 2:].numpy(), real, reconstructed, chamfer, nonempty)


def _present_points(batch: Batch, plan: MaskPlan, indexer: BevCellIndexer, sample_index: int) -> tuple[np.ndarray, int]:
    """xy of visible points of the sample's present frames, and how many of its present cells hold voxels."""
    frame = batch.coords[:, 0].long()
    present = (batch.frame_sample[frame] == sample_index) & (batch.frame_step[frame] == batch.frame_step.max())
    P = batch.voxels.shape[1]
    slots = torch.arange(P)[None, :] < batch.num_points[:, None]
    keep = slots & (present & ~plan.voxel_masked)[:, None]
    points = batch.voxels[keep][:, :3]
    pose = batch.frame_pose_to_ego[frame[:, None].expand(-1, P)[keep]]
    ego = torch.einsum("nij,nj->ni", pose[:, :3, :3], points) + pose[:, :3, 3]
    keys = indexer.keys(indexer.voxel_centres(batch.coords[present]), frame[present], batch)
    return ego[:, :2].numpy(), int(torch.unique(keys[keys >= 0]).numel())


def plot_masking(sample_or_batch: Sample | Batch, plan: MaskPlan, predicted: torch.Tensor | np.ndarray,
                 out_png: str | Path, grid: Grid, sample_index: int = 0, title: str | None = None) -> Path:
    """Draw visible points, masked cells, real and reconstructed points of one sample to ``out_png`` (atomic).

    ``title`` (optional) heads the figure above the masking statistics.
    ``plan`` must come from the collated batch; ``predicted`` holds ``(N, K, 3)`` offsets from the
    centre of each of ``plan.cells``, as :meth:`MaskedReconstruction.reconstruct` returns them.
    """
    batch = collate([sample_or_batch]) if isinstance(sample_or_batch, Sample) else sample_or_batch
    view = masking_view(batch, plan, predicted, grid, sample_index)
    x_min, y_min, _, x_max, y_max, _ = grid.point_cloud_range
    width = 12.0
    panel_h = 0.8 * width * (y_max - y_min) / (x_max - x_min)
    zoom_h = 0.8 * width * ZOOM_SIZE[1] / ZOOM_SIZE[0]
    with sns.axes_style("white"):
        fig = Figure(figsize=(width, panel_h + zoom_h + 1.4), dpi=110)
        overview, zoom = fig.subplots(2, 1, height_ratios=[panel_h, zoom_h])
    window = _zoom_window(view, grid)
    _draw_panel(overview, view, grid, point_size=1.5, marker_size=2.0)
    _draw_panel(zoom, view, grid, point_size=9.0, marker_size=12.0)
    _draw_cell_lattice(zoom, grid, window)
    overview.add_patch(Rectangle(window[:2], window[2] - window[0], window[3] - window[1], fill=False,
                                 edgecolor=EGO_COLOR, linestyle="--", linewidth=1.2, zorder=6))
    overview.set(xlim=(x_min, x_max), ylim=(y_min, y_max), ylabel="y (m, ego left)")
    zoom.set(xlim=(window[0], window[2]), ylim=(window[1], window[3]), xlabel="x (m, ego forward)",
             ylabel="y (m, ego left)")
    for ax in (overview, zoom):
        ax.set_aspect("equal")
    zoom.set_title("zoom (dashed box above); thin lines: BEV cells", fontsize=9)
    share = len(view.masked_cells) / max(view.nonempty_cells, 1)
    stats = (f"present step: {len(view.masked_cells)} of {view.nonempty_cells} non-empty cells masked ({share:.0%}), "
             f"Chamfer (squared L2, per cell) {view.chamfer:.3f} m\u00b2")
    overview.set_title(f"{title}\n{stats}" if title else stats, fontsize=11)
    _legend(overview)
    fig.tight_layout()
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")  # keeps the outside legend in the image
    return out_png


def _draw_panel(ax: Axes, view: MaskingView, grid: Grid, point_size: float, marker_size: float) -> None:
    ax.imshow(_masked_raster(view.masked_cells, grid), origin="lower", interpolation="nearest", zorder=0,
              extent=(grid.point_cloud_range[0], grid.point_cloud_range[3],
                      grid.point_cloud_range[1], grid.point_cloud_range[4]))
    # Rasterised: vector output of 10^4-10^5 dots is slow and no sharper.
    ax.scatter(view.visible[:, 0], view.visible[:, 1], s=point_size, color=VISIBLE_COLOR, alpha=0.7,
               linewidths=0, rasterized=True, zorder=1)
    real = np.concatenate(view.real) if view.real else np.zeros((0, 2))
    recon = np.concatenate(view.reconstructed) if view.reconstructed else np.zeros((0, 2))
    # Real points on top: the reconstruction is judged against them, so they must stay visible.
    ax.scatter(recon[:, 0], recon[:, 1], s=marker_size, marker="x", color=RECONSTRUCTED_COLOR, alpha=0.75,
               linewidths=0.8, rasterized=True, zorder=2)
    ax.scatter(real[:, 0], real[:, 1], s=point_size, color=REAL_COLOR, linewidths=0, rasterized=True, zorder=3)
    ax.scatter([0], [0], marker=">", s=120, color=EGO_COLOR, edgecolor="white", linewidth=1.0, zorder=5)


def _masked_raster(cells: np.ndarray, grid: Grid) -> np.ndarray:
    """(rows, cols, 4) RGBA image: masked cells tinted, the rest transparent (row 0 = y_min)."""
    rows, cols = grid.bev_shape
    image = np.zeros((rows, cols, 4))
    image[cells[:, 0], cells[:, 1]] = to_rgba(MASKED_CELL_COLOR, 0.45)
    return image


def _zoom_window(view: MaskingView, grid: Grid) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) of the ZOOM_SIZE window, centred on a masked cell, holding the most real points."""
    x_min, y_min, _, x_max, y_max, _ = grid.point_cloud_range
    w, h = min(ZOOM_SIZE[0], x_max - x_min), min(ZOOM_SIZE[1], y_max - y_min)
    real = np.concatenate(view.real) if view.real else np.zeros((0, 2))
    if len(real):
        centres = np.stack([r.mean(axis=0) for r in view.real if len(r)])
        offsets = np.abs(real[None, :, :] - centres[:, None, :])  # (cells, points, 2)
        inside = ((offsets[..., 0] <= w / 2) & (offsets[..., 1] <= h / 2)).sum(axis=1)
        centre = centres[int(np.argmax(inside))]
    else:
        centre = np.array([(x_min + x_max) / 2, (y_min + y_max) / 2])
    x0 = float(np.clip(centre[0] - w / 2, x_min, x_max - w))
    y0 = float(np.clip(centre[1] - h / 2, y_min, y_max - h))
    return x0, y0, x0 + w, y0 + h


def _draw_cell_lattice(ax: Axes, grid: Grid, window: tuple[float, float, float, float]) -> None:
    cx, cy = grid.bev_cell
    x_min, y_min = grid.point_cloud_range[:2]
    xs = x_min + cx * np.arange(np.ceil((window[0] - x_min) / cx), np.floor((window[2] - x_min) / cx) + 1)
    ys = y_min + cy * np.arange(np.ceil((window[1] - y_min) / cy), np.floor((window[3] - y_min) / cy) + 1)
    for x in xs:
        ax.axvline(x, color="#999999", linewidth=0.3, zorder=0.5)
    for y in ys:
        ax.axhline(y, color="#999999", linewidth=0.3, zorder=0.5)


def _legend(ax: Axes) -> None:
    handles = [
        Line2D([], [], marker="o", linestyle="", color=VISIBLE_COLOR, label="visible points (all agents)"),
        Patch(facecolor=to_rgba(MASKED_CELL_COLOR, 0.45), edgecolor="none", label="masked BEV cell"),
        Line2D([], [], marker="o", linestyle="", color=REAL_COLOR, label="real points of masked cells"),
        Line2D([], [], marker="x", linestyle="", color=RECONSTRUCTED_COLOR, label="reconstructed points"),
        Line2D([], [], marker=">", linestyle="", color=EGO_COLOR, label="ego"),
    ]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)


def render_masking_example(config: dict, cache_root: str | Path, variant_name: str,
                           checkpoint: str | Path | None, out_png: str | Path, fusion: str = "attfuse",
                           index: int = 0, split: str = "train") -> Path:
    """Mask sample ``index`` of the cache as ``variant_name`` would and draw the reconstruction.

    ``checkpoint`` is a pretraining run's ``objective.pt`` (or ``last.pt``): the decoder lives there,
    not in ``pretrained.pt``. ``None`` draws an untrained model, which shows the masking only.
    """
    from turbotrain.pretrain.objective import MaskedReconstruction
    from turbotrain.pretrain.setup import build_objective  # imports the model: keep plotting light
    from turbotrain.train.checkpoint import load_checkpoint

    setup = build_objective(config, variant_name, fusion, [str(cache_root)], split=split)
    if checkpoint is not None:
        setup.objective.load_state_dict(load_checkpoint(checkpoint)["model"])
    lidar = [o for o in getattr(setup.objective, "objectives", [setup.objective]) if isinstance(o, MaskedReconstruction)]
    if not lidar:
        raise ConfigError(f"pretrain.variants.{variant_name}: a {config['pretrain']['variants'][variant_name]['type']} "
                          "variant masks no LiDAR: there is no masking to draw")
    objective = lidar[0]
    sample = setup.data[index]
    batch = collate([sample])
    plan = objective.draw_plan(batch, torch.Generator().manual_seed(config["seed"]))
    # Training-mode BatchNorm (batch statistics): after short runs the running averages (momentum
    # 0.01) are still near their initial values, and the picture should show what the loss saw.
    objective.train()
    with torch.no_grad():
        predicted = objective.reconstruct(batch, plan)
    label = "untrained" if checkpoint is None else Path(checkpoint).name
    return plot_masking(batch, plan, predicted, out_png, objective.grid,
                        title=f"{variant_name} ({label}) on {sample.sample_id}")
