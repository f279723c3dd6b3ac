"""Step time of every multi-task balancer relative to the plain sum, K = 2 tasks.

One step = forward + task losses + ``balancer.backward`` + optimiser step (+ for FAMO the extra
forward on the same batch and ``balancer.update``, which is part of its cost). TurboTrain is timed
in both spaces: on the shared parameters and on the shared features (``bev``, ``step_bev``). The model is the real
tiny ``CooperativePnP`` on a toy cooperative batch when it is importable, else a conv stand-in of
similar size; the output says which. Balancers are timed round-robin (one step each per round) and
the median is reported, so load from other processes hits all of them alike.

Run: ``PYTHONPATH=src python benchmarks/bench_balancers.py [--rounds 25] [--device cpu]``
Writes ``benchmarks/out/bench_balancers.json``.
"""
from __future__ import annotations

import argparse
import statistics
import time
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
# (label, registry name, options): every registered balancer with defaults, TurboTrain in each
# space, and TurboTrain on the parameters restricted to the layers after the encoder / to fusion +
# temporal (see turbotrain.py).
VARIANTS = [(name, name, {}) for name in BALANCERS.names() if name != "turbotrain"] + [
    ("turbotrain (parameters)", "turbotrain", {"space": "parameters"}),
    ("turbotrain (features)", "turbotrain", {"space": "features"}),
    ("turbotrain@0.69", "turbotrain", {"space": "parameters", "trailing_fraction": 0.69}),
    ("turbotrain@0.1", "turbotrain", {"space": "parameters", "trailing_fraction": 0.1}),
]


class StandInModel(nn.Module):
    """Conv trunk + two heads, about the size of the tiny CooperativePnP BEV path."""

    def __init__(self, channels: int = 32):
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(16, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
        )
        self.detection = nn.Conv2d(channels, 8, 1)
        self.prediction = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(channels * 16, 24))

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.trunk.parameters())

    def task_parameters(self) -> dict[str, list[nn.Parameter]]:
        return {"detection": list(self.detection.parameters()), "prediction": list(self.prediction.parameters())}


def stand_in_problem(device: torch.device):
    model = StandInModel().to(device)
    inputs = torch.randn(4, 16, 32, 32, device=device)
    det_target, pred_target = torch.randn(4, 8, 32, 32, device=device), torch.randn(4, 24, device=device)

    def forward() -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        features = model.trunk(inputs)
        return {
            "detection": (model.detection(features) - det_target).pow(2).mean(),
            "prediction": (model.prediction(features) - pred_target).pow(2).mean(),
        }, [features]

    return model, forward, "conv stand-in (3x conv32 trunk, 32x32 BEV, batch 4)"


def joint_model_problem(device: torch.device):
    """The real tiny CooperativePnP on a two-sample toy batch (as in tests/test_joint_model.py)."""
    from turbotrain.grid import Grid
    from turbotrain.models.joint import CooperativePnP
    from turbotrain.testing import ToySceneConfig, toy_batch

    grid = Grid((-12.8, -12.8, -3.0, 12.8, 12.8, 1.0), (0.4, 0.4, 0.5), 2)
    scenes = (ToySceneConfig(history=2, future=4), ToySceneConfig(history=2, future=4, ego_is_infrastructure=True))
    cfg = {
        "size": "tiny",
        "encoder": {"name": "second", "backend": "auto"},
        "bev_backbone": {"name": "resnet_fpn"},
        "fusion": {"name": "attfuse"},
        "temporal": {"name": "attention"},
        "detection_head": {"name": "center"},
        "prediction_head": {"name": "multimodal"},
    }
    model = CooperativePnP(cfg, grid, ["car", "pedestrian", "truck"], history=2, future=4).to(device)
    batch = toy_batch(grid, scenes, seed=3).to(device)

    def forward() -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        outputs = model(batch)
        all_losses = model.losses(outputs, batch)
        return {task: all_losses[task] for task in TASKS}, [outputs["bev"], outputs["step_bev"]]

    n_shared = sum(p.numel() for p in model.shared_parameters())
    return model, forward, f"CooperativePnP tiny (SECOND encoder, 32x32 BEV, 2 samples), {n_shared} shared params"


def build_problem(device: torch.device):
    try:
        return joint_model_problem(device)
    except ImportError as err:  # the joint model is written in parallel; fall back until it lands
        print(f"CooperativePnP unavailable ({err}); using the stand-in")
        return stand_in_problem(device)


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


def measure(rounds: int, warmup: int, device: torch.device) -> tuple[str, dict[str, list[float]]]:
    seed_everything(0)
    model, forward, description = build_problem(device)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    trainers = [Trainer(variant, model, forward, state) for variant in VARIANTS]
    times: dict[str, list[float]] = {t.label: [] for t in trainers}
    for round_index in range(warmup + rounds):
        for trainer in trainers:
            elapsed = trainer.step()
            if round_index >= warmup:
                times[trainer.label].append(elapsed)
    return description, times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    description, times = measure(args.rounds, args.warmup, torch.device(args.device))
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
    print(f"{'balancer':<24} {'median ms':>10} {'x sum':>7} {'min ms':>8} {'x sum':>7}")
    for row in sorted(rows, key=lambda r: r["relative_to_sum"]):
        print(
            f"{row['balancer']:<24} {row['median_ms']:>10.1f} {row['relative_to_sum']:>7.2f}"
            f" {row['min_ms']:>8.1f} {row['min_relative_to_sum']:>7.2f}"
        )
    summary = {"model": description, "device": args.device, "clock": clock_name, "rounds": args.rounds,
               "turbotrain_default_space": default_space, "rows": rows}
    write_json(OUT, summary)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
