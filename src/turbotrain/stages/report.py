"""``turbotrain tables`` / ``turbotrain figures``: results/tables/*.csv (+ .md) and results/figures/*.png."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from turbotrain.evaluate.metrics_file import metrics_frame
from turbotrain.experiments import TRAJECTORY_TYPES, Run, expand_runs, pretrain_path, pretraining_sources
from turbotrain.report import figures, tables
from turbotrain.utils.errors import ConfigError


def _run_of(row: pd.Series) -> Run:
    return Run(row["dataset"], row["fusion"], row["pretrain"], row["recipe"], row["balancer"],
               float(row["label_fraction"]), int(row["seed"]))


def _benchmarks(frame: pd.DataFrame) -> dict[str, list[str]]:
    """Snakemake benchmark TSVs of each run: its fine-tuning job and, if any, its pretraining job."""
    out = {}
    for _, row in frame.iterrows():
        run = _run_of(row)
        paths = [Path(f"benchmarks/finetune/{run.dataset}/{run.trained_fusion}/{run.pretrain}/"
                      f"{run.recipe}-{run.balancer}/lf{run.label_fraction:g}/seed{run.seed}.tsv")]
        pre = Path(f"benchmarks/pretrain/{run.dataset}_{run.trained_fusion}_{run.pretrain}.tsv")
        if Path(pretrain_path(run.dataset, run.trained_fusion, run.pretrain)).exists() and pre.exists():
            paths.append(pre)
        out[row["run_id"]] = [str(p) for p in paths if p.exists()]
    return out


def write_tables(config: dict, table: str, metrics_paths: list[str], out_csv: str) -> pd.DataFrame:
    frame = metrics_frame(metrics_paths)
    ev = config["evaluation"]
    if table == "main":
        return tables.main_table(frame, out_csv)
    if table == "ablation":
        return tables.ablation_table(frame, out_csv)
    if table == "data_efficiency":
        return tables.data_efficiency_table(frame, out_csv)
    if table == "transfer":
        return tables.transfer_table(frame, out_csv)
    if table == "efficiency":
        return tables.efficiency_table(frame, out_csv, rows=("fusion", "variant"), target_ap50=ev["target_ap50"],
                                       target_epa=ev["target_epa"], benchmarks=_benchmarks(frame))
    raise ConfigError(f"unknown table {table!r}; expected main, ablation, efficiency, data_efficiency or transfer")


def _stage_logs(run: Run) -> pd.DataFrame:
    """The run's per-step training CSVs, stage after stage on one step axis."""
    stages_dir = Path(run.train_dir, "stages")
    if not stages_dir.is_dir():
        raise ConfigError(f"{stages_dir}: no training logs for run {run.train_dir} (was it trained here?)")
    parts, offset = [], 0
    for stage_dir in sorted(stages_dir.iterdir(), key=lambda d: int(d.name.split("-", 1)[0])):
        log = pd.read_csv(stage_dir / "metrics.csv")
        log["step"] += offset
        offset = int(log["step"].max()) if len(log) else offset
        parts.append(log)
    return pd.concat(parts, ignore_index=True)


def _select(frame: pd.DataFrame, mask, figure: str, what: str) -> pd.DataFrame:
    chosen = frame[mask]
    if chosen.empty:
        raise ConfigError(f"figure {figure}: the experiment grid has no {what} (experiments.groups)")
    return chosen[chosen["seed"] == chosen["seed"].min()]


def _of_table(frame: pd.DataFrame, config: dict, table: str) -> pd.DataFrame:
    """The rows of the runs the groups of ``table`` name (other runs share fusion/variant labels)."""
    ids = {r.metrics_path.removeprefix("results/metrics/").removesuffix(".json") for r in expand_runs(config, table)}
    return frame[frame["run_id"].isin(ids)]


def write_figure(config: dict, figure: str, metrics_paths: list[str], out_png: str, cache_root: str) -> None:
    frame = metrics_frame(metrics_paths)
    full = frame["label_fraction"] == 1.0
    if figure == "learning_curves":
        runs = _select(frame, full & (frame["fusion"] == frame["fusion"].mode().iloc[0]), figure, "full-label runs")
        figures.learning_curves({row["variant"]: _stage_logs(_run_of(row)) for _, row in runs.iterrows()}, out_png)
    elif figure == "gradient_conflict":
        joint = _select(frame, full & (frame["recipe"] == "joint"), figure, "joint (balanced) runs")
        joint = joint[joint["pretrain"] == joint["pretrain"].mode().iloc[0]]
        figures.gradient_conflict({row["balancer"]: _stage_logs(_run_of(row)) for _, row in joint.iterrows()}, out_png)
    elif figure == "ap_vs_time":
        runs = _of_table(frame, config, "efficiency").copy()
        runs["variant"] = runs["fusion"] + " " + runs["variant"]  # one line per configuration and seed
        figures.ap_vs_time(runs, out_png)
    elif figure == "data_efficiency":
        figures.data_efficiency(_of_table(frame, config, "data_efficiency"), out_png)
    elif figure == "trajectory_pretraining":
        figures.trajectory_pretraining(_trajectory_pretraining_logs(config, frame), out_png)
    elif figure == "qualitative_bev":
        _qualitative(config, frame, out_png, cache_root)
    else:
        raise ConfigError(f"unknown figure {figure!r}")


def _trajectory_pretraining_logs(config: dict, frame: pd.DataFrame) -> dict[str, Path]:
    """``metrics.csv`` of every pretraining run of the grid with a trajectory objective, by variant."""
    variants = config["pretrain"]["variants"]
    runs = {(r.dataset, r.trained_fusion, r.pretrain) for r in map(_run_of, (row for _, row in frame.iterrows()))
            if variants[r.pretrain]["type"] in TRAJECTORY_TYPES}
    if not runs:
        raise ConfigError("figure trajectory_pretraining: the experiment grid has no trajectory pretraining")
    return {f"{pretrain} ({pretraining_sources(config, pretrain)})" if fusion == "attfuse" else f"{fusion}/{pretrain}":
            Path(pretrain_path(dataset, fusion, pretrain)).parent / "metrics.csv"
            for dataset, fusion, pretrain in sorted(runs)}


def _qualitative(config: dict, frame: pd.DataFrame, out_png: str, cache_root: str) -> None:
    """Predicted boxes and trajectories of the best run (by mAP@0.5) over one test sample."""
    from turbotrain.build import build_model, device_of, evaluation_dataset, grid_of
    from turbotrain.evaluate.inference import Predictor
    from turbotrain.train.checkpoint import load_checkpoint
    from turbotrain.viz.bev import plot_sample_bev

    candidates = frame[frame["fusion"] != "late"]
    best = _run_of(candidates.sort_values("map@0.5", ascending=False, na_position="last").iloc[0])
    model = build_model(config, best.fusion)
    model.load_state_dict(load_checkpoint(f"{best.train_dir}/final.pt")["model"])
    data = evaluation_dataset(config, cache_root, best.fusion)
    index = max(range(min(len(data), 32)), key=lambda i: len(data[i].boxes))  # a busy scene
    sample = data[index]
    pred = Predictor(model, config["evaluation"], device_of(config))([sample])[0]
    title = f"{best.fusion} / {best.pretrain} / {best.recipe}-{best.balancer}: {sample.sample_id}"
    plot_sample_bev(sample, out_png, grid_of(config), config["classes"], title=title, predictions=pred)
