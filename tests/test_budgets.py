"""Compute budgets: steps per phase under `matched` and `proportional`, worked out by hand."""
from __future__ import annotations

import copy
import dataclasses

import pytest

from pipeline_helpers import REPO_ROOT
from turbotrain import budgets, contract as C
from turbotrain.config import check_config, load_config
from turbotrain.utils.errors import ConfigError


@pytest.fixture(scope="module")
def config() -> dict:
    cfg = copy.deepcopy(load_config(REPO_ROOT / "config" / "config.yaml"))
    # the schedule used below: multistage 40/20/20/40 steps, joint 80, LiDAR pretraining 60
    cfg["finetune"]["multistage"]["stages"] = [
        {**s, "max_steps": n} for s, n in zip(cfg["finetune"]["multistage"]["stages"], (40, 20, 20, 40))]
    cfg["finetune"]["joint"]["max_steps"] = 80
    cfg["pretrain"]["train"]["max_steps"] = 60
    cfg["experiments"]["budgets"] = {"m120": {"policy": "matched", "total_steps": 120},
                                     "p240": {"policy": "proportional", "total_steps": 240}}
    return cfg


def test_schedule_is_no_budget(config):
    assert budgets.allocate(config, "spatiotemporal", "joint", budgets.SCHEDULE) is None


def test_matched_gives_every_arm_the_same_total_with_pretraining_counted(config):
    stages = [s["name"] for s in config["finetune"]["multistage"]["stages"]]
    assert budgets.allocate(config, "none", "multistage", "m120") == dict(zip(stages, (40, 20, 20, 40)))
    assert budgets.allocate(config, "none", "joint", "m120") == {"joint": 120}
    # 60 : 80 of 120 -> 51.43 / 68.57 -> largest remainder: 51 + 69
    assert budgets.allocate(config, "spatiotemporal", "joint", "m120") == {"pretraining": 51, "joint": 69}


def test_proportional_scales_every_schedule_by_the_reference_recipe(config):
    # reference multistage is 120 steps, so the factor is 240 / 120 = 2 for every arm
    stages = [s["name"] for s in config["finetune"]["multistage"]["stages"]]
    assert budgets.allocate(config, "none", "multistage", "p240") == dict(zip(stages, (80, 40, 40, 80)))
    assert budgets.allocate(config, "spatiotemporal", "joint", "p240") == {"pretraining": 120, "joint": 160}


def test_a_budget_reaches_the_jobs_and_their_dependencies(config):
    run = C.Run("synthetic", "intermediate", "spatiotemporal", "joint", "turbotrain", 1.0, 0, "m120")
    assert "/m120/seed0" in run.metrics_path
    assert C.pretraining_steps(config, "spatiotemporal", "m120") == 51
    assert C.finetune_depends(config, run) != C.finetune_depends(config, dataclasses.replace(run, budget="schedule"))
    assert C.pretrain_depends(config, "spatiotemporal", "m120") != C.pretrain_depends(config, "spatiotemporal")


def test_unknown_or_mixed_budgets_are_config_errors(config):
    bad = copy.deepcopy(config)
    bad["experiments"]["groups"] = [{"tables": ["main"], "budget": ["nope"]}]
    with pytest.raises(ConfigError, match=r"groups\[0\].budget: 'nope' is not in experiments.budgets"):
        check_config(bad)
    mixed = copy.deepcopy(config)
    mixed["finetune"]["joint"] = {"epochs": 2}
    mixed["finetune"]["joint"].pop("max_steps", None)
    with pytest.raises(ConfigError, match="same unit"):
        budgets.allocate(mixed, "spatiotemporal", "joint", "m120")
