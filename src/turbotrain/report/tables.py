"""Result tables: mean, 95% interval and std over seeds, written as CSV plus a Markdown rendering.

Every builder takes the DataFrame of :func:`turbotrain.evaluate.metrics_file.metrics_frame` (one row
per run). ``std`` is the sample standard deviation over seeds (ddof = 1), ``ci_low`` / ``ci_high``
Student's t 95% interval of the mean (``report/stats.py``), both empty for a single seed; ``<metric>_n``
counts the runs whose value is finite, and ``n_seeds`` the fewest of those over the row's metrics.
Metric values keep the metrics file's units (AP / EPA / MR as fractions, distances in metres, times
in seconds); the Markdown states which AP sort order the runs used.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from turbotrain.budgets import SPENT_COLUMNS
from turbotrain.report.stats import mean_interval
from turbotrain.evaluate.prediction import PREDICTION_METRICS
from turbotrain.utils.atomic import atomic_open, write_text
from turbotrain.utils.errors import ConfigError

MAIN_METRICS = ("map@0.3", "map@0.5", "map@0.7", "epa", "epa_raw", "min_ade", "min_fde", "mr", "wall_s", "gpu_hours", "cpu_hours")
ABLATION_METRICS = ("map@0.5", "map@0.7", "epa", "epa_raw", "min_ade", "min_fde", "mr")
DATA_EFFICIENCY_METRICS = ("map@0.3", "map@0.5", "epa", "min_fde")
# budget accounting: fine-tuning, pretraining and summed (budgets.SPENT_COLUMNS), then time and accuracy
EFFICIENCY_METRICS = (*SPENT_COLUMNS, "epochs", "gpu_hours", "cpu_hours", "time_to_ap50_s", "time_to_epa_s",
                      "map@0.5", "epa")
BENCHMARK_METRICS = ("bench_s", "bench_cpu_s", "bench_max_rss_mb")
STAT_SUFFIXES = ("_mean", "_std", "_n", "_ci_low", "_ci_high")


def build_table(frame: pd.DataFrame, rows: list[str], columns: list[str]) -> pd.DataFrame:
    """Aggregate seeds: one row per distinct ``rows`` key, ``<metric>_mean``, ``<metric>_std``, ``n_seeds``."""
    missing = [c for c in [*rows, *columns] if c not in frame.columns]
    if missing:
        raise ConfigError(f"table needs columns {missing} that the metrics frame lacks (has {sorted(frame.columns)})")
    _check_one_run_per_seed(frame, rows)
    groups = frame.groupby(rows, dropna=False, sort=True)
    table = groups[columns].agg(["mean", "std", "count"])
    table.columns = [f"{metric}_{'n' if stat == 'count' else stat}" for metric, stat in table.columns]
    for metric in columns:
        intervals = groups[metric].agg(lambda v: mean_interval(list(v))[1:])
        table[f"{metric}_ci_low"] = [low for low, _ in intervals]
        table[f"{metric}_ci_high"] = [high for _, high in intervals]
    counts = table[[f"{m}_n" for m in columns]]
    table["n_seeds"] = counts.where(counts > 0).min(axis=1).fillna(0).astype(int)  # metrics a row reports
    return table.reset_index()


def _check_one_run_per_seed(frame: pd.DataFrame, rows: list[str]) -> None:
    # Two runs with the same row key and seed mean the row keys do not identify an experiment, and
    # averaging them would silently mix different settings into one "mean over seeds".
    if "seed" not in frame.columns:
        return
    duplicated = frame.duplicated(subset=[*rows, "seed"], keep=False)
    if duplicated.any():
        clash = frame.loc[duplicated, [*rows, "seed"]].drop_duplicates().to_dict("records")
        raise ConfigError(f"rows {rows} do not identify runs uniquely; repeated (row, seed): {clash[:3]}")


def write_table(df: pd.DataFrame, csv_path: str | os.PathLike, note: str | None = None) -> tuple[Path, Path]:
    """Write ``df`` to ``csv_path`` and a "mean ± std" Markdown table to the ``.md`` beside it."""
    csv_path = Path(csv_path)
    md_path = csv_path.with_suffix(".md")
    with atomic_open(csv_path, "w", newline="") as fh:
        df.to_csv(fh, index=False, float_format="%.6g")
    write_text(md_path, render_markdown(df, note))
    return csv_path, md_path


def render_markdown(df: pd.DataFrame, note: str | None = None) -> str:
    """Markdown pipe table of a :func:`build_table` result; metric cells read "mean ± std"."""
    # Hand-written rather than DataFrame.to_markdown, which needs tabulate, not a project dependency.
    metrics = [c[: -len("_mean")] for c in df.columns if c.endswith("_mean")]
    keys = [c for c in df.columns if not c.endswith(STAT_SUFFIXES) and c != "n_seeds"]
    header = [*keys, *metrics, "seeds"]
    alignment = ["---"] * len(keys) + ["---:"] * (len(metrics) + 1)  # numbers right-aligned
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(alignment) + "|"]
    decimals = {m: _decimals(df[f"{m}_mean"]) for m in metrics}
    for _, record in df.iterrows():
        cells = [_key_cell(record[k]) for k in keys]
        cells += [_metric_cell(record, m, decimals[m]) for m in metrics]
        cells.append(str(int(record["n_seeds"])) if "n_seeds" in record else "")
        lines.append("| " + " | ".join(cells) + " |")
    if note:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def _decimals(column: pd.Series) -> int:
    # Fractions (AP, EPA) need 3 decimals to show seed-to-seed differences; seconds do not.
    values = column.dropna().to_numpy(dtype=float)
    largest = np.max(np.abs(values)) if len(values) else 0.0
    if largest >= 10 and np.all(values == np.round(values)):
        return 0  # counts such as epochs
    return 3 if largest < 10 else 1 if largest < 1000 else 0


def _key_cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _metric_cell(record: pd.Series, metric: str, decimals: int) -> str:
    """``mean ± std [low, high]``, plus ``(n=k)`` where fewer seeds than the row's report it."""
    mean, std = record[f"{metric}_mean"], record.get(f"{metric}_std")
    if mean is None or math.isnan(mean):
        return "–"
    if std is None or math.isnan(std):
        return f"{mean:.{decimals}f}"
    cell = f"{mean:.{decimals}f} ± {std:.{decimals}f}"
    low, high = record.get(f"{metric}_ci_low"), record.get(f"{metric}_ci_high")
    if low is not None and not math.isnan(low):
        cell += f" [{low:.{decimals}f}, {high:.{decimals}f}]"
    n = record.get(f"{metric}_n")
    if n is not None and "n_seeds" in record and n != record["n_seeds"]:
        cell += f" (n={int(n)})"
    return cell


def _present(frame: pd.DataFrame, metrics: Sequence[str]) -> list[str]:
    """The requested metrics that at least one run reports (datasets differ in what they score)."""
    present = [m for m in metrics if m in frame.columns and frame[m].notna().any()]
    if not present:
        raise ConfigError(f"none of the metrics {list(metrics)} is reported by the runs")
    return present


def _select(frame: pd.DataFrame, experiment: str | None) -> pd.DataFrame:
    if experiment is None:
        return frame
    selected = frame[frame["experiment"] == experiment]
    if selected.empty:
        raise ConfigError(f"no run of experiment {experiment!r} (have {sorted(frame['experiment'].unique())})")
    return selected


def _sort_note(frame: pd.DataFrame) -> str:
    modes = sorted(frame["ap_sort"].dropna().unique()) if "ap_sort" in frame.columns else []
    shown = "/".join(modes) if modes else "n/a"
    rules = sorted(frame["gt_range_rule"].dropna().unique()) if "gt_range_rule" in frame.columns else []
    ground_truth = f" Ground-truth boxes: {'/'.join(rules)} inside the range (dataset.gt_range_rule)." if rules else ""
    prediction = (" Prediction metrics as ViP3D's scorer computes them, per class (`epa/car`) and their class"
                  " mean (`epa`); EPA = max(EPA_raw, 0) (docs/metrics.md)." if "epa" in frame.columns else "")
    return (f"AP detections sorted: {shown} (global = across the split; local = OpenCOOD per-frame order)."
            f"{ground_truth}{prediction} Mean ± sample std [95% t interval of the mean] over seeds.")


def _with_budget(frame: pd.DataFrame, rows: Sequence[str]) -> list[str]:
    """Row keys plus the compute budget: runs of one arm at two budgets are different experiments."""
    return [*rows, "budget"] if "budget" in frame.columns and "budget" not in rows else list(rows)


def model_caption(model_cfg: dict, fusions: Sequence[str]) -> str:
    """Which model parts a table's runs used: the caption that makes its numbers comparable or not."""
    from turbotrain.contract import FUSION_IMPLEMENTATIONS

    parts = ", ".join(f"{part.replace('_', ' ')} `{model_cfg[part]['name']}`"
                      for part in ("encoder", "bev_backbone", "temporal", "detection_head", "prediction_head"))
    used = "; ".join(f"`{f}` = {FUSION_IMPLEMENTATIONS[f]}" for f in fusions)
    return (f" Model ({model_cfg['size']}): {parts}; cooperators aligned by `{model_cfg['cooperator_alignment']}`."
            f" Fusion: {used} (docs/faithfulness.md).")


def _build_and_write(frame, rows, metrics, csv_path, caption: str = "") -> pd.DataFrame:
    table = build_table(frame, _with_budget(frame, rows), _present(frame, metrics))
    write_table(table, csv_path, _sort_note(frame) + caption)
    return table


def per_class_ap_columns(frame: pd.DataFrame) -> list[str]:
    """``ap@<iou>/<class>`` columns (not the per-range ones), in IoU then class order."""
    return sorted(c for c in frame.columns if c.startswith("ap@") and c.count("/") == 1)


def per_class_prediction_columns(frame: pd.DataFrame) -> list[str]:
    """``epa/<class>``, ``epa_raw/<class>``, ``min_ade/<class>``, ... columns, metric then class order."""
    return [c for metric in PREDICTION_METRICS for c in sorted(frame.columns) if c.startswith(f"{metric}/")]


def main_table(frame: pd.DataFrame, csv_path: str | os.PathLike, experiment: str | None = None,
               rows: Sequence[str] = ("dataset", "fusion", "variant"),
               metrics: Sequence[str] | None = None, caption: str = "") -> pd.DataFrame:
    """Variants compared on AP per class and IoU, mAP, prediction metrics per class and their class
    means, and training cost."""
    if metrics is None:
        metrics = [*per_class_ap_columns(frame), *per_class_prediction_columns(frame), *MAIN_METRICS]
    return _build_and_write(_select(frame, experiment), list(rows), metrics, csv_path, caption)


def ablation_table(frame: pd.DataFrame, csv_path: str | os.PathLike, experiment: str | None = None,
                   metrics: Sequence[str] = ABLATION_METRICS, caption: str = "") -> pd.DataFrame:
    """Pretrain x balancer rows plus the mask-ratio sweep rows (``mask_ratio`` "–" where not masked);
    a label-fraction column where the runs were trained on more than one."""
    frame = _select(frame, experiment)
    rows = ["pretrain", "balancer", "mask_ratio"]
    if "label_fraction" in frame.columns and frame["label_fraction"].nunique() > 1:
        rows.append("label_fraction")
    return _build_and_write(frame, rows, metrics, csv_path, caption)


def transfer_table(frame: pd.DataFrame, csv_path: str | os.PathLike, experiment: str | None = None,
                   metrics: Sequence[str] = ABLATION_METRICS, caption: str = "") -> pd.DataFrame:
    """Pretraining objective x pretraining data (A, B, A+B, ...) for runs fine-tuned on one dataset."""
    frame = _select(frame, experiment)
    tuned_on = "/".join(sorted(frame["dataset"].unique()))
    table = build_table(frame, _with_budget(frame, ["pretrain_type", "pretrain_data"]), _present(frame, metrics))
    write_table(table, csv_path, f"Fine-tuned and evaluated on {tuned_on}. " + _sort_note(frame) + caption)
    return table


def data_efficiency_table(frame: pd.DataFrame, csv_path: str | os.PathLike, experiment: str | None = None,
                          metrics: Sequence[str] = DATA_EFFICIENCY_METRICS, caption: str = "") -> pd.DataFrame:
    """Label fraction x pretraining type; writes CSV + Markdown."""
    return _build_and_write(_select(frame, experiment), ["pretrain", "label_fraction"], metrics, csv_path, caption)


def efficiency_table(frame: pd.DataFrame, csv_path: str | os.PathLike, experiment: str | None = None,
                     rows: Sequence[str] = ("variant",), target_ap50: float | None = None,
                     target_epa: float | None = None,
                     benchmarks: Mapping[str, Sequence[str | os.PathLike]] | None = None,
                     caption: str = "") -> pd.DataFrame:
    """Training cost and time-to-target per variant; writes CSV + Markdown.

    ``time_to_ap50_s`` / ``time_to_epa_s`` is the first curve point's ``wall_s`` at which the run
    reaches the target. Default target: the lowest over runs of each run's best curve value, i.e. the
    accuracy every run reaches, so times compare like with like (NaN where a run has no curve).
    ``benchmarks`` maps ``run_id`` to Snakemake benchmark TSVs (e.g. pretrain and fine-tune jobs),
    summed per run into ``bench_s`` / ``bench_cpu_s`` and the peak ``bench_max_rss_mb``.
    """
    frame = _select(frame, experiment).copy()
    targets = {
        metric: target if target is not None else common_target(frame["curve"], metric)
        for metric, target in (("ap50", target_ap50), ("epa", target_epa))
    }
    for metric, target in targets.items():
        frame[f"time_to_{metric}_s"] = [time_to_target(curve, metric, target) for curve in frame["curve"]]
    if benchmarks:
        totals = [benchmark_totals(benchmarks.get(run_id, ())) for run_id in frame["run_id"]]
        frame = frame.join(pd.DataFrame(totals, index=frame.index))
    table = build_table(frame, _with_budget(frame, rows), _present(frame, [*EFFICIENCY_METRICS, *BENCHMARK_METRICS]))
    write_table(table, csv_path, _sort_note(frame) + " " + _target_note(targets) + caption)
    return table


def _target_note(targets: Mapping[str, float]) -> str:
    shown = [
        f"{metric}: no curve" if math.isnan(value) else f"{metric} >= {value:.3f}" for metric, value in targets.items()
    ]
    return "Time-to-target thresholds: " + ", ".join(shown) + "."


def common_target(curves: Sequence[list[dict]], metric: str) -> float:
    """Lowest over runs of each run's best ``metric`` on its curve (NaN if no run has that curve)."""
    best = [max(v for v in (p.get(metric) for p in curve) if v is not None) for curve in curves if _has(curve, metric)]
    return float(min(best)) if best else math.nan


def time_to_target(curve: list[dict], metric: str, target: float) -> float:
    """``wall_s`` of the first curve point (in step order) with ``metric >= target``; NaN if never."""
    if math.isnan(target):
        return math.nan
    for point in sorted(curve, key=lambda p: p["step"]):
        value = point.get(metric)
        if value is not None and value >= target:
            return float(point["wall_s"])
    return math.nan


def _has(curve: list[dict], metric: str) -> bool:
    return any(p.get(metric) is not None for p in curve)


def read_benchmark_tsv(path: str | os.PathLike) -> pd.DataFrame:
    """A Snakemake ``benchmark:`` TSV (columns s, h:m:s, max_rss, ..., cpu_time; one row per repeat)."""
    table = pd.read_csv(path, sep="\t", na_values=["-", "NA"])
    if "s" not in table.columns:
        raise ConfigError(f"{path}: not a Snakemake benchmark TSV (no 's' column; has {list(table.columns)})")
    return table


def benchmark_totals(paths: Sequence[str | os.PathLike]) -> dict[str, float]:
    """Sum over a run's benchmark files of the mean over repeats; peak RSS in MB."""
    tables = [read_benchmark_tsv(p) for p in paths]
    if not tables:
        return {name: math.nan for name in BENCHMARK_METRICS}
    mean_of = lambda t, col: float(t[col].mean()) if col in t.columns else math.nan  # noqa: E731
    return {
        "bench_s": sum(mean_of(t, "s") for t in tables),
        "bench_cpu_s": sum(mean_of(t, "cpu_time") for t in tables),
        "bench_max_rss_mb": float(np.nanmax([t["max_rss"].max() if "max_rss" in t.columns else math.nan
                                             for t in tables])),
    }
