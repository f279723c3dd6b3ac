"""Step time of multi-task balancers relative to the plain sum on the default model and grid, K = 2.

One step = forward + task losses + ``balancer.backward`` + optimiser step (+ for FAMO the extra
forward on the same batch and ``balancer.update``, which is part of its cost). The model is the real
``CooperativePnP`` built from ``config/config.yaml`` (its model sizes, grid and history/future) with
attfuse, on a toy cooperative batch of 4 samples on that grid (``turbotrain.testing.toy_batch``).
Gradient-combining methods are timed in the parameters space (as published) and, where it matters,
in the features space (``bev``, ``step_bev``). Balancers are timed round-robin (one step each per
round) and the median is reported, so load from other processes hits all of them alike.

Run: ``PYTHONPATH=src python benchmarks/bench_balancers.py [--rounds 10] [--all] [--device cpu]``
Writes ``benchmarks/out/bench_balancers.json``.
"""
from __future__ import annotations

import argparse
import statistics
import time
from importlib.util import find_spec
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from turbotrain.train.balancers import BALANCERS, build_balancer
from turbotrain.utils.atomic import write_json
from turbotrain.utils.seed import seed_everything

OUT = Path(__file__).parent / "out" / "bench_balancers.json"
TASKS = ["detection", "prediction"]
# One forward: the task losses and the shared features the heads read (heads' side first).
ForwardFn = Callable[[], tuple[dict[str, torch.Tensor], list[torch.Tensor]]]
# (label, registry name, options): the default grid's balancers, the modern aggregators of the
# paper grid, and TurboTrain in each space and setting (see turbotrain.py). ``--all``: every name.
VARIANTS = [
    ("sum", "sum", {}),
    ("pcgrad", "pcgrad", {}),
    ("cagrad", "cagrad", {}),
    ("famo", "famo", {}),
    ("gradnorm_scaling", "gradnorm_scaling", {}),
    ("upgrad (parameters)", "upgrad", {}),
    ("upgrad (features)", "upgrad", {"space": "features"}),
    ("config", "config", {}),
    ("aligned_mtl", "aligned_mtl", {}),
    ("fairgrad", "fairgrad", {}),
    ("turbotrain (features, default)", "turbotrain", {}),
    ("turbotrain (features, no magnitude)", "turbotrain", {"magnitude_balancing": False}),
    ("turbotrain (parameters)", "turbotrain", {"space": "parameters"}),
    ("turbotrain (parameters)@0.1", "turbotrain", {"space": "parameters", "trailing_fraction": 0.1}),
]


def all_variants() -> list[tuple[str, str, dict]]:
    listed = {name for _, name, _ in VARIANTS}
    installed = [n for n in BALANCERS.names() if n != "nash_mtl" or find_spec("ecos")]  # ecos: Nash-MTL's solver
    return VARIANTS + [(name, name, {}) for name in installed if name not in listed]


def default_problem(device: torch.device, batch_size: int = 4):
    """The default-config CooperativePnP (attfuse) on a toy batch of ``batch_size`` samples on its grid."""
    from turbotrain.build import build_model, grid_of
    from turbotrain.config import load_config
    from turbotrain.testing import ToySceneConfig, toy_batch

    config = load_config("config/config.yaml", [])
    history, future = config["cache"]["history"], config["cache"]["future"]
    scenes = tuple(ToySceneConfig(history=history, future=future, ego_is_infrastructure=i % 2 == 1)
                   for i in range(batch_size))
    model = build_model(config, "attfuse").to(device)
    batch = toy_batch(grid_of(config), scenes, seed=3).to(device)

    def forward() -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        outputs = model(batch)
        all_losses = model.losses(outputs, batch)
        return {task: all_losses[task] for task in TASKS}, [outputs["bev"], outputs["step_bev"]]

    n_shared = sum(p.numel() for p in model.shared_parameters())
    bev = tuple(forward()[1][0].shape[-2:])
    return model, forward, (f"CooperativePnP {config['model']['size']} from config/config.yaml (attfuse), BEV {bev}, "
                            f"batch {batch_size}, {n_shared} shared params")


class Trainer:
    """One balancer, its optimiser and one timed step."""

    def __init__(self, variant: tuple[str, str, dict], model: nn.Module, forward: ForwardFn, state: dict):
        self.label, self.name, options = variant
        self.model, self.forward = model, forward
        self.balancer = build_balancer(self.name, TASKS, **options).to(next(model.parameters()).device)
        self.initial_state = state
        params = list(model.parameters()) + list(self.balancer.parameters())
        self.optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step(self) -> float:
        # Every balancer starts each step from the same weights, so all time the same work.
        self.model.load_state_dict(self.initial_state)
        synchronize()
        start = clock()
        self.optimizer.zero_grad(set_to_none=True)
        losses, features = self.forward()
        extra = {"features": features} if self.balancer.needs_features else {}
        self.balancer.backward(losses, self.model.shared_parameters(), self.model.task_parameters(), **extra)
        self.optimizer.step()
        if self.name == "famo":
            with torch.no_grad():
                self.balancer.update(self.forward()[0])
        synchronize()
        return clock() - start


def clock() -> float:
    """Wall time on GPU; on CPU the process's CPU time, which other jobs on a shared machine barely
    disturb (the benchmark runs single-threaded, so CPU time is the step's compute time)."""
    return time.perf_counter() if torch.cuda.is_available() else time.process_time()


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure(rounds: int, warmup: int, device: torch.device, variants) -> tuple[str, dict[str, list[float]]]:
    seed_everything(0)
    model, forward, description = default_problem(device)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    trainers = [Trainer(variant, model, forward, state) for variant in variants]
    times: dict[str, list[float]] = {t.label: [] for t in trainers}
    for round_index in range(warmup + rounds):
        for trainer in trainers:
            elapsed = trainer.step()
            if round_index >= warmup:
                times[trainer.label].append(elapsed)
    return description, times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--all", action="store_true", help="every registered balancer, not only VARIANTS")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    variants = all_variants() if args.all else VARIANTS
    description, times = measure(args.rounds, args.warmup, torch.device(args.device), variants)
    base = statistics.median(times["sum"])
    base_min = min(times["sum"])
    # The minimum is the least disturbed by other processes on a shared machine; both are reported.
    rows = [
        {
            "balancer": name,
            "median_ms": 1e3 * statistics.median(t),
            "min_ms": 1e3 * min(t),
            "relative_to_sum": statistics.median(t) / base,
            "min_relative_to_sum": min(t) / base_min,
        }
        for name, t in times.items()
    ]
    clock_name = "wall" if torch.cuda.is_available() else "process CPU"
    default_space = build_balancer("turbotrain", TASKS).space
    print(f"model: {description}; device {args.device}; {clock_name} time; {args.rounds} rounds; K=2; "
          f"turbotrain default space: {default_space}")
    print(f"{'balancer':<36} {'median ms':>10} {'x sum':>7} {'min ms':>8} {'x sum':>7}")
    for row in sorted(rows, key=lambda r: r["relative_to_sum"]):
        print(
            f"{row['balancer']:<36} {row['median_ms']:>10.1f} {row['relative_to_sum']:>7.2f}"
            f" {row['min_ms']:>8.1f} {row['min_relative_to_sum']:>7.2f}"
        )
    summary = {"model": description, "device": args.device, "clock": clock_name, "rounds": args.rounds,
               "turbotrain_default_space": default_space, "rows": rows}
    write_json(OUT, summary)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
