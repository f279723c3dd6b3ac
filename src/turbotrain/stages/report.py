"""``turbotrain tables`` / ``turbotrain figures``: results/tables/*.csv (+ .md) and results/figures/*.png."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from turbotrain.budgets import SCHEDULE
from turbotrain.evaluate.metrics_file import metrics_frame
from turbotrain.contract import TRAJECTORY_TYPES, Run, expand_runs, pretraining_sources, template, training_run
from turbotrain.report import claims, figures, tables
from turbotrain.utils.errors import ConfigError


def _trained_run(config: dict, row: pd.Series) -> Run:
    """The run of a metrics row as trained: its training products (logs, benchmarks, weights) may be an
    earlier budget's of the same steps (``contract.training_run``)."""
    run = Run.from_fields(row["dataset"], row["fusion"], row["pretrain"], row["recipe"], row["balancer"],
                          row["label_fraction"], row["seed"], row["budget"])
    return training_run(config, run)


def _benchmarks(config: dict, frame: pd.DataFrame) -> dict[str, list[str]]:
    """Snakemake benchmark TSVs of each run: its fine-tuning job and, if any, its pretraining job."""
    out = {}
    for _, row in frame.iterrows():
        run = _trained_run(config, row)
        paths = [Path(run.path("finetune_benchmark"))]
        fields = {"dataset": run.dataset, "fusion": run.trained_fusion, "pretrain": run.pretrain, "budget": run.budget}
        if Path(template("pretrained", **fields)).exists():
            paths.append(Path(template("pretrain_benchmark", **fields)))
        out[row["run_id"]] = [str(p) for p in paths if p.exists()]
    return out


def _efficiency(config: dict, frame: pd.DataFrame, out_csv: str) -> pd.DataFrame:
    ev = config["evaluation"]
    return tables.efficiency_table(frame, out_csv, rows=("fusion", "variant"), target_ap50=ev["target_ap50"],
                                   target_epa=ev["target_epa"], benchmarks=_benchmarks(config, frame), caption=_caption(config, frame))


def _caption(config: dict, frame: pd.DataFrame) -> str:
    return tables.model_caption(config["model"], sorted(frame["fusion"].unique()))


# One builder per name of contract.TABLES (tests/test_contract.py checks they agree).
TABLE_BUILDERS = {
    "main": lambda config, frame, out: tables.main_table(frame, out, caption=_caption(config, frame)),
    "ablation": lambda config, frame, out: tables.ablation_table(frame, out, caption=_caption(config, frame)),
    "efficiency": _efficiency,
    "data_efficiency": lambda config, frame, out: tables.data_efficiency_table(frame, out, caption=_caption(config, frame)),
    "transfer": lambda config, frame, out: tables.transfer_table(frame, out, caption=_caption(config, frame)),
    "claims": lambda config, frame, out: claims.claims_table(frame, out),
}


def write_tables(config: dict, table: str, metrics_paths: list[str], out_csv: str) -> pd.DataFrame:
    if table not in TABLE_BUILDERS:
        raise ConfigError(f"unknown table {table!r}; expected one of {', '.join(TABLE_BUILDERS)}")
    return TABLE_BUILDERS[table](config, metrics_frame(metrics_paths), out_csv)


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
    ids = {r.run_id for r in expand_runs(config, table)}
    return frame[frame["run_id"].isin(ids)]


def _budgets_in_order(config, runs: pd.DataFrame) -> list[str]:
    """The budgets ``runs`` were trained at, in ``experiments.budgets`` order (the first is the headline),
    then ``schedule`` (a group that names no budget trains on its own schedule)."""
    order = [*config["experiments"].get("budgets", {}), SCHEDULE]
    return [b for b in order if b in set(runs["budget"])]


def _learning_curves(config, frame, out_png, cache_root):
    full = frame["label_fraction"] == 1.0
    runs = _select(frame, full & (frame["fusion"] == frame["fusion"].mode().iloc[0]), "learning_curves", "full-label runs")
    # One row per budget: a variant trained at two budgets is two runs, never one line.
    figures.learning_curves({
        f"{budget} budget": {row["variant"]: _stage_logs(_trained_run(config, row))
                             for _, row in runs[runs["budget"] == budget].iterrows()}
        for budget in _budgets_in_order(config, runs)}, out_png)


def _gradient_conflict(config, frame, out_png, cache_root):
    full = frame["label_fraction"] == 1.0
    joint = _select(frame, full & (frame["recipe"] == "joint"), "gradient_conflict", "joint (balanced) runs")
    joint = joint[joint["pretrain"] == joint["pretrain"].mode().iloc[0]]
    budget = _budgets_in_order(config, joint)[0]  # one budget: balancers compared over the same steps
    joint = joint[joint["budget"] == budget]
    figures.gradient_conflict({row["balancer"]: _stage_logs(_trained_run(config, row)) for _, row in joint.iterrows()},
                              out_png, title_note=f"{joint['pretrain'].iloc[0]} pretraining, {budget} budget, seed {joint['seed'].iloc[0]}")


def _ap_vs_time(config, frame, out_png, cache_root):
    runs = _of_table(frame, config, "efficiency").copy()
    runs["variant"] = runs["fusion"] + " " + runs["variant"]  # one line per configuration and seed
    figures.ap_vs_time(runs, out_png)


# One builder per name of contract.FIGURES (tests/test_contract.py checks they agree).
FIGURE_BUILDERS = {
    "learning_curves": _learning_curves,
    "gradient_conflict": _gradient_conflict,
    "ap_vs_time": _ap_vs_time,
    "data_efficiency": lambda config, frame, out_png, cache_root: figures.data_efficiency(
        _of_table(frame, config, "data_efficiency"), out_png),
    "qualitative_bev": lambda config, frame, out_png, cache_root: _qualitative(config, frame, out_png, cache_root),
    "trajectory_pretraining": lambda config, frame, out_png, cache_root: figures.trajectory_pretraining(
        _trajectory_pretraining_logs(config, frame), out_png),
    "claims": lambda config, frame, out_png, cache_root: figures.claims(
        claims.measure_claims(_of_table(frame, config, "claims")), out_png),
}


def write_figure(config: dict, figure: str, metrics_paths: list[str], out_png: str, cache_root: str) -> None:
    if figure not in FIGURE_BUILDERS:
        raise ConfigError(f"unknown figure {figure!r}; expected one of {', '.join(FIGURE_BUILDERS)}")
    FIGURE_BUILDERS[figure](config, metrics_frame(metrics_paths), out_png, cache_root)


def _trajectory_pretraining_logs(config: dict, frame: pd.DataFrame) -> dict[str, Path]:
    """``metrics.csv`` of every pretraining run of the grid with a trajectory objective, by variant."""
    variants = config["pretrain"]["variants"]
    runs = {r for r in (_trained_run(config, row) for _, row in frame.iterrows())
            if variants[r.pretrain]["type"] in TRAJECTORY_TYPES}
    if not runs:
        raise ConfigError("figure trajectory_pretraining: the experiment grid has no trajectory pretraining")
    # A variant may be pretrained at several budgets (schedule / matched / proportional): one curve each.
    budgets = {}
    for r in runs:
        budgets.setdefault((r.trained_fusion, r.pretrain), set()).add(r.budget)
    logs = {}
    for r in sorted(runs):
        name = (f"{r.pretrain} ({pretraining_sources(config, r.pretrain)})" if r.trained_fusion == "attfuse"
                else f"{r.trained_fusion}/{r.pretrain}")
        if len(budgets[(r.trained_fusion, r.pretrain)]) > 1:
            name += f", {r.budget}"
        logs[name] = Path(r.pretrained_path).parent / "metrics.csv"
    return logs


def _qualitative(config: dict, frame: pd.DataFrame, out_png: str, cache_root: str) -> None:
    """Predicted boxes and trajectories of the best run (by mAP@0.5) over one test sample."""
    from turbotrain.build import build_model, device_of, evaluation_dataset, grid_of
    from turbotrain.evaluate.inference import Predictor
    from turbotrain.train.checkpoint import load_checkpoint
    from turbotrain.viz.bev import plot_sample_bev

    candidates = frame[frame["fusion"] != "late"]
    best = _trained_run(config, candidates.sort_values("map@0.5", ascending=False, na_position="last").iloc[0])
    model = build_model(config, best.fusion)
    model.load_state_dict(load_checkpoint(f"{best.train_dir}/final.pt")["model"])
    data = evaluation_dataset(config, cache_root, best.fusion)
    index = max(range(min(len(data), 32)), key=lambda i: len(data[i].boxes))  # a busy scene
    sample = data[index]
    pred = Predictor(model, config["evaluation"], device_of(config))([sample])[0]
    title = f"{best.fusion} / {best.pretrain} / {best.recipe}-{best.balancer}: {sample.sample_id}"
    plot_sample_bev(sample, out_png, grid_of(config), config["classes"], title=title, predictions=pred)
