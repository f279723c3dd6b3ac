"""Compute budgets: how many optimizer steps each training phase of an arm gets.

An arm is a run's recipe with its pretraining: ``[pretraining,] stage 1, stage 2, ...``. Each phase has
a *schedule length*, the ``max_steps`` (or ``epochs``) the config gives it; a budget rescales them:

* ``schedule`` (no budget): every phase trains as configured.
* ``matched`` with ``total_steps: T``: every arm trains T optimizer steps in all, pretraining
  counted, split over its phases in the proportions of its own schedule.
* ``proportional`` with ``total_steps: T``: every arm keeps its own schedule scaled by one common
  factor, ``T / (length of the reference recipe's schedule)`` (default reference: multistage, without
  pretraining), so the reference arm trains T steps and the others as much more or less as their
  published schedules say.

Schedule lengths are the configured numbers themselves (not dataset-dependent step counts), so a
budget is a pure function of the config: the same in the Snakemake DAG, the job and the tables. All
phases of a budgeted comparison must therefore state their length in one unit (all ``max_steps`` or
all ``epochs``). Budgets count optimizer steps; pretraining and fine-tuning may use different batch
sizes, so the accounting (``train/budget_accounting.py``) also records samples and trunk passes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from turbotrain.utils.errors import ConfigError

SCHEDULE = "schedule"
POLICIES = ("matched", "proportional")

# What a run spent (train/accounting.py records it): the engine summary's keys. In metrics files
# the fine-tuning values keep these names, the pretraining's are ``pretrain_<key>`` and the sums
# ``total_<key>``; distinct samples do not add up (a union over stages; pretraining reads
# unlabelled samples), so they have no total.
SPENT_KEYS = ("steps", "samples_seen", "unique_samples_seen", "trunk_forwards", "trunk_backwards", "wall_s")
SPENT_COLUMNS = (*SPENT_KEYS, *(f"pretrain_{k}" for k in SPENT_KEYS),
                 *(f"total_{k}" for k in SPENT_KEYS if k != "unique_samples_seen"))


@dataclass(frozen=True)
class Phase:
    name: str  # "pretraining" or a fine-tuning stage's name
    length: float  # configured max_steps or epochs
    unit: str  # "steps" | "epochs"


def _length(section: dict, where: str, defaults: dict) -> tuple[float, str]:
    if section.get("max_steps"):
        return float(section["max_steps"]), "steps"
    if defaults.get("max_steps") and section.get("epochs") is None:
        return float(defaults["max_steps"]), "steps"
    epochs = section.get("epochs") or defaults.get("epochs")
    if not epochs:
        raise ConfigError(f"{where}: a budgeted phase needs max_steps or epochs")
    return float(epochs), "epochs"


def finetune_phases(config: dict, recipe: str) -> list[Phase]:
    """The fine-tuning stages of ``recipe`` with their schedule lengths (``train`` gives defaults)."""
    defaults = config["train"]
    if recipe == "joint":
        return [Phase("joint", *_length(config["finetune"]["joint"], "finetune.joint", defaults))]
    return [Phase(s["name"], *_length(s, f"finetune.multistage.stages[{i}]", defaults))
            for i, s in enumerate(config["finetune"]["multistage"]["stages"])]


def pretraining_phase(config: dict, variant: str) -> Phase | None:
    """The pretraining phase of ``variant`` (None for no pretraining)."""
    spec = config["pretrain"]["variants"][variant]
    if spec["type"] == "none":
        return None
    section = {**config["pretrain"]["train"], **spec.get("train", {})}
    return Phase("pretraining", *_length(section, f"pretrain.variants.{variant}.train", config["pretrain"]["train"]))


def budget_spec(config: dict, budget: str) -> dict:
    budgets = config["experiments"].get("budgets", {})
    if budget not in budgets:
        raise ConfigError(f"budget {budget!r}: not in experiments.budgets (have {sorted(budgets)} and {SCHEDULE!r})")
    return budgets[budget]


def allocate(config: dict, variant: str, recipe: str, budget: str) -> dict[str, int] | None:
    """Optimizer steps per phase (``{"pretraining": n, "<stage>": n, ...}``); None for ``schedule``."""
    if budget == SCHEDULE:
        return None
    spec = budget_spec(config, budget)
    phases = [p for p in (pretraining_phase(config, variant), *finetune_phases(config, recipe)) if p is not None]
    units = {p.unit for p in phases}
    if spec["policy"] == "proportional":
        reference = finetune_phases(config, spec.get("reference_recipe", "multistage"))
        units |= {p.unit for p in reference}
        scale = spec["total_steps"] / sum(p.length for p in reference)
        total = sum(p.length for p in phases) * scale
    else:
        total = spec["total_steps"]
    if len(units) > 1:
        raise ConfigError(f"experiments.budgets.{budget}: the phases {[p.name for p in phases]} state their "
                          "lengths in both max_steps and epochs; give every phase of a budgeted comparison the "
                          "same unit (budgets.py)")
    return dict(zip([p.name for p in phases], _split(round(total), [p.length for p in phases])))


def _split(total: int, weights: list[float]) -> list[int]:
    """``total`` steps over the weights by largest remainder (they sum to ``total``), at least 1 each."""
    exact = [total * w / sum(weights) for w in weights]
    steps = [math.floor(x) for x in exact]
    for i in sorted(range(len(exact)), key=lambda i: exact[i] - steps[i], reverse=True)[: total - sum(steps)]:
        steps[i] += 1
    return [max(s, 1) for s in steps]
