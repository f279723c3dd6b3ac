"""The pipeline contract: names written once and used everywhere, paths, and per-product dependencies."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest

from pipeline_helpers import REPO_ROOT
from turbotrain import contract as C
from turbotrain.config import load_config, load_schema


@pytest.fixture(scope="module")
def config() -> dict:
    return load_config(REPO_ROOT / "config" / "config.yaml")


def group_enum(axis: str) -> list[str]:
    return load_schema()["properties"]["experiments"]["properties"]["groups"]["items"]["properties"][axis]["items"]["enum"]


def test_the_schemas_enums_are_the_contracts_names():
    assert group_enum("fusion") == list(C.FUSIONS)
    assert group_enum("recipe") == list(C.RECIPES)
    assert group_enum("balancer") == list(C.BALANCERS)
    options = load_schema()["properties"]["finetune"]["properties"]["balancer_options"]["properties"]
    assert list(options) == list(C.BALANCERS)
    assert group_enum("tables") == list(C.TABLES)
    variants = load_schema()["properties"]["pretrain"]["properties"]["variants"]["additionalProperties"]
    variant_types = variants["properties"]["type"]["enum"]
    assert variant_types == list(C.PRETRAIN_TYPES)
    assert load_schema()["$defs"]["dataset"]["properties"]["source"]["enum"] == list(C.DATA_SOURCES)
    evaluation = load_schema()["properties"]["evaluation"]["properties"]
    assert evaluation["epa_frames_without_gt"]["enum"] == list(C.EPA_FRAMES_WITHOUT_GT)


def test_the_code_registries_are_the_contracts_names():
    from turbotrain.pretrain.objective import VARIANT_INPUT
    from turbotrain.stages.report import FIGURE_BUILDERS, TABLE_BUILDERS
    from turbotrain.train.balancers import BALANCERS

    assert sorted(BALANCERS.names()) == sorted(C.BALANCERS)
    assert list(TABLE_BUILDERS) == list(C.TABLES)
    assert list(FIGURE_BUILDERS) == list(C.FIGURES)
    assert set(VARIANT_INPUT) == set(C.PRETRAIN_TYPES) - {"none"}
    assert set(C.LIDAR_TYPES) | set(C.TRAJECTORY_TYPES) == set(C.PRETRAIN_TYPES) - {"none"}


def test_the_cli_offers_the_contracts_names():
    from turbotrain.cli import build_parser

    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    choices = {a.dest: list(a.choices) for a in train._actions if a.choices}
    assert choices["fusion"] == list(C.FUSIONS) and choices["recipe"] == list(C.RECIPES)
    assert choices["balancer"] == list(C.BALANCERS)


def test_the_committed_dvc_pipeline_is_the_generated_one(config):
    from turbotrain.dvc import render, render_params

    stale = "stale: run `turbotrain dvc-yaml --config config/config.yaml`"
    assert (REPO_ROOT / "dvc.yaml").read_text() == render(config, ["config/config.yaml"]), f"dvc.yaml is {stale}"
    assert (REPO_ROOT / "params.yaml").read_text() == render_params(config, ["config/config.yaml"]), f"params.yaml is {stale}"


def test_a_run_fills_every_path_template_once():
    run = C.Run("v2xpnp", "late", "none", "multistage", "fixed", 0.5, 2)
    assert run.metrics_path == "results/metrics/v2xpnp/late/none/multistage-fixed/lf0.5/schedule/seed2.json"
    # late fusion evaluates the model trained without fusion: its training products are that run's
    assert run.train_dir == "runs/finetune/v2xpnp/none/none/multistage-fixed/lf0.5/schedule/seed2"
    assert run.path("finetune_log") == "logs/finetune/v2xpnp/none/none/multistage-fixed/lf0.5/schedule/seed2.log"
    assert run.run_id == "v2xpnp/late/none/multistage-fixed/lf0.5/schedule/seed2"
    assert C.template("checkpoint", dataset="x") == "runs/finetune/x/{fusion}/{pretrain}/{recipe}-{balancer}/lf{fraction}/{budget}/seed{seed}/final.pt"
    with pytest.raises(KeyError, match="no fields"):
        C.template("table", dataset="x")


def changed(config: dict, dotted: str, value) -> dict:
    new = copy.deepcopy(config)
    node = new
    *parents, last = dotted.split(".")
    for part in parents:
        node = node[part]
    node[last] = value
    return new


def test_each_product_depends_on_exactly_what_changes_it(config):
    run = C.expand_runs(config)[0]
    products = {
        "raw": lambda cfg: C.raw_depends(cfg),
        "cache": lambda cfg: C.cache_depends(cfg),
        "pretrain": lambda cfg: C.pretrain_depends(cfg, "spatiotemporal"),
        "finetune": lambda cfg: C.finetune_depends(cfg, run),
        "evaluate": lambda cfg: C.evaluate_depends(cfg, run),
        "table": lambda cfg: C.table_depends(cfg, "efficiency"),
    }

    def affected(dotted, value):
        new = changed(config, dotted, value)
        return {name for name, f in products.items() if C.depends_hash(f(new)) != C.depends_hash(f(config))}

    # the training curve is scored with the evaluation thresholds: fine-tuning depends on them
    assert affected("evaluation.score_threshold", 0.3) == {"finetune", "evaluate", "table"}
    assert affected("evaluation.miss_threshold", 5.0) == {"evaluate", "table"}
    assert affected("evaluation.range_bins", [[0, 50]]) == {"evaluate", "table"}
    assert affected("evaluation.split", "val") == {"evaluate", "table"}
    assert affected("evaluation.target_ap50", 0.4) == {"table"}
    assert affected("cache.sample_stride", 3) == {"cache"}
    assert affected("cache.history", 2) == {"cache", "pretrain", "finetune", "evaluate"}
    assert affected("extra_datasets.synthetic_b.seed", 9) == set()
    assert affected("pretrain.variants.multi_agent.mask_ratio", 0.5) == set()  # another variant
    assert affected("train.lr", 0.01) == {"finetune"}
    assert affected("dataset.preset", "mini") == {"raw"}


def test_a_run_folders_fingerprint_follows_its_dependencies(config, monkeypatch):
    """A run whose dependencies changed must not resume: its fingerprint (what `claim_run_dir`
    compares) changes exactly when the job's `depends` does."""
    from turbotrain.stages import finetune

    monkeypatch.setattr(finetune, "cache_fingerprint", lambda root: "cache-digest")
    run = C.expand_runs(config)[0]
    fingerprint = lambda cfg: finetune.run_inputs(cfg, run, "data/cache/synthetic", None)  # noqa: E731
    assert fingerprint(changed(config, "evaluation.score_threshold", 0.3)) != fingerprint(config)
    assert fingerprint(changed(config, "evaluation.target_epa", 0.3)) == fingerprint(config)


def test_frozen_configs_are_named_by_content_and_never_rewritten(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = C.frozen_config_path(config)
    again = C.frozen_config_path(copy.deepcopy(config))
    other = C.frozen_config_path(changed(config, "evaluation.miss_threshold", 5.0))
    assert first == again != other
    before = Path(first).stat().st_mtime_ns
    C.frozen_config_path(config)
    assert Path(first).stat().st_mtime_ns == before
    assert load_config(first) == config


def test_the_trajectory_figure_reads_only_pretraining_logs_the_grid_writes(config):
    """The figure reads each trajectory-pretraining run's own log, at the budget it was pretrained at
    (the default pretrains `lidar_trajectory` only at `proportional`: a `schedule` path never exists)."""
    import pandas as pd

    from turbotrain.stages.report import _trajectory_pretraining_logs

    runs = C.expand_runs(config)
    frame = pd.DataFrame([{"dataset": r.dataset, "fusion": r.fusion, "pretrain": r.pretrain, "recipe": r.recipe,
                           "balancer": r.balancer, "label_fraction": r.label_fraction, "seed": r.seed,
                           "budget": r.budget} for r in runs])
    written = {Path(C.pretrained_path(config["dataset"]["name"], f, p, b)).parent / "metrics.csv"
               for f, p, b in C.pretraining_jobs(config)}
    logs = _trajectory_pretraining_logs(config, frame)
    assert logs and set(logs.values()) <= written
    assert len(logs) == len({(f, p, b) for f, p, b in C.pretraining_jobs(config)
                             if C.variant_type(config, p) in C.TRAJECTORY_TYPES})


def test_a_budget_that_repeats_another_budgets_steps_reuses_its_training(config):
    """Multistage is the proportional budget's reference recipe, so both budgets give it the same 60
    steps: one training, evaluated under both names. Joint runs get other steps and train twice."""
    multistage = [r for r in C.expand_runs(config) if r.recipe == "multistage" and r.fusion == "attfuse"]
    proportional = next(r for r in multistage if r.budget == "proportional")
    twin = C.training_run(config, proportional)
    assert twin == C.Run(**{**proportional.as_dict(), "budget": "matched"})
    assert twin.path("checkpoint") != proportional.path("checkpoint") and twin.metrics_path != proportional.metrics_path
    assert C.training_run(config, twin) == twin
    joint = next(r for r in C.expand_runs(config) if r.recipe == "joint" and r.budget == "proportional")
    assert C.training_run(config, joint) == joint
    # the two budgets' allocations are what decides, not the recipe's name
    changed = copy.deepcopy(config)
    changed["experiments"]["budgets"]["proportional"]["total_steps"] = 90
    assert C.training_run(changed, proportional) == proportional
