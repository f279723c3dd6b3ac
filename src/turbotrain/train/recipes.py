"""Fine-tuning recipes: the stages a run trains, and the step function of a stage's tasks.

``joint`` is one stage with the run's balancer; ``multistage`` is the manual recipe TurboTrain
replaces (``finetune.multistage.stages``), each stage with hand-set loss weights and frozen parts.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from turbotrain import budgets
from turbotrain.contract import MULTISTAGE_BALANCER, TASKS, Run
from turbotrain.train.distributed import unwrap_model


@dataclass
class Stage:
    name: str
    tasks: list[str]
    agents: str  # ego | all
    epochs: float
    max_steps: int | None
    balancer: str
    balancer_options: dict = field(default_factory=dict)
    freeze: list[str] = field(default_factory=list)


def recipe_stages(config: dict, run: Run) -> list[Stage]:
    """Joint = one stage with the run's balancer; multistage = the configured stages, fixed weights.

    Under a named budget each stage trains the optimizer steps the budget gives it (budgets.py)."""
    options = config["finetune"]["balancer_options"]
    if run.recipe == "joint":
        joint = config["finetune"]["joint"]
        stages = [Stage("joint", list(TASKS), "all", joint["epochs"], joint["max_steps"], run.balancer,
                        dict(options.get(run.balancer, {})))]
    else:
        stages = []
        for s in config["finetune"]["multistage"]["stages"]:
            weights = {t: s["loss_weights"].get(t, 1.0) for t in s["tasks"]}
            stages.append(Stage(s["name"], list(s["tasks"]), s["agents"], s["epochs"], s["max_steps"],
                                MULTISTAGE_BALANCER, {"weights": weights}, list(s["freeze"])))
    allocation = budgets.allocate(config, run.pretrain, run.recipe, run.budget)
    for stage in stages if allocation else ():
        stage.max_steps = allocation[stage.name]
    return stages


def task_step(tasks: list[str]):
    """Engine step function returning the stage's task losses, every loss term for the logs and the
    shared maps both heads read (``bev`` from ``step_bev``: heads' side first), for balancers that
    work on the shared representation."""
    def step(model, batch):
        outputs = model(batch)
        losses = unwrap_model(model).losses(outputs, batch)
        logged = {k: v.detach() for k, v in losses.items() if k not in TASKS}
        return {**{t: losses[t] for t in tasks}, "log": logged, "features": [outputs["bev"], outputs["step_bev"]]}
    return step
