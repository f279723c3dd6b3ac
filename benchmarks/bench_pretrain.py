"""Cost of a masked-reconstruction pretraining step relative to a fine-tuning step of the same model.

Both steps run on the same toy cooperative batch (:mod:`turbotrain.testing`: 2 agents,
2 history steps) with the same tiny CooperativePnP (SECOND, ResNet-FPN, AttFuse, attention):

* pretrain: :class:`MaskedReconstruction` forward (mask plan, concealment, encode, decode, Chamfer)
  + backward + Adam step, spatio-temporal variant (mask ratio 0.7, shared across steps);
* fine-tune: ``model.losses(model(batch))``, backward of detection + prediction, Adam step.

The two kinds of step alternate (pretrain, fine-tune, pretrain, ...) so load from other processes on
a shared machine hits both alike; the ratio of medians is measured in this one run.

Run: ``PYTHONPATH=src python benchmarks/bench_pretrain.py [--device cuda] [--steps 10] [--batch-size 2]``
Writes ``benchmarks/out/bench_pretrain.json``.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from bench_cli import parse_device_args

from turbotrain.grid import Grid
from turbotrain.models.joint import CooperativePnP
from turbotrain.testing import ToySceneConfig, toy_batch
from turbotrain.pretrain.objective import MaskedReconstruction
from turbotrain.utils.atomic import write_json
from turbotrain.utils.seed import seed_everything

OUT = Path(__file__).parent / "out"
CLASSES = ["car", "pedestrian", "truck"]
HISTORY, FUTURE = 2, 4
GRID = Grid((-12.8, -12.8, -3.0, 12.8, 12.8, 1.0), (0.4, 0.4, 0.5), 2)  # 32 x 32 BEV, 0.8 m cells
MODEL_CFG = {"size": "tiny", "encoder": {"name": "second", "backend": "auto"}, "bev_backbone": {"name": "resnet_fpn"},
             "fusion": {"name": "attfuse"}, "temporal": {"name": "attention"},
             "detection_head": {"name": "center"}, "prediction_head": {"name": "multimodal"}}


def pretrain_step(objective: MaskedReconstruction, optimizer: torch.optim.Optimizer, batch) -> None:
    loss = objective(batch)["reconstruction"]
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def finetune_step(model: CooperativePnP, optimizer: torch.optim.Optimizer, batch) -> None:
    losses = model.losses(model(batch), batch)
    optimizer.zero_grad()
    (losses["detection"] + losses["prediction"]).backward()
    optimizer.step()


def timed(step: Callable[[], None], device: torch.device) -> float:
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def measure(device: torch.device, batch_size: int, steps: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per step of each kind, ``steps`` alternating pairs after ``warmup`` pairs."""
    seed_everything(0)
    scenes = [ToySceneConfig(history=HISTORY, future=FUTURE, num_objects=6, points_per_box=600, ground_points=4000)] * batch_size
    batch = toy_batch(GRID, scenes, seed=0).to(device)
    model = CooperativePnP(MODEL_CFG, GRID, CLASSES, HISTORY, FUTURE)
    objective = MaskedReconstruction(model, GRID, {"mask_ratio": 0.7, "temporal_masking": "shared"}, HISTORY,
                                     model.encoder.vfe.out_channels, model.bev_backbone.out_channels).to(device)
    # Separate optimizers, as in the pipeline: pretraining and fine-tuning are separate runs.
    pre_opt = torch.optim.Adam(objective.parameters(), lr=1e-3)
    fine_opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    times: dict[str, list[float]] = {"pretrain": [], "finetune": []}
    for i in range(warmup + steps):
        pre = timed(lambda: pretrain_step(objective, pre_opt, batch), device)
        fine = timed(lambda: finetune_step(model, fine_opt, batch), device)
        if i >= warmup:
            times["pretrain"].append(pre)
            times["finetune"].append(fine)
    return times


def summarise(times: dict[str, list[float]], batch_size: int) -> list[dict]:
    rows = []
    for kind, values in times.items():
        q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
        median = statistics.median(values)
        rows.append({"step": kind, "median_ms": round(median * 1e3, 1), "p25_ms": round(q[0] * 1e3, 1),
                     "p75_ms": round(q[2] * 1e3, 1), "samples_per_s": round(batch_size / median, 2)})
    return rows


def main(argv: list[str] | None = None) -> dict:
    args, device = parse_device_args(__doc__.splitlines()[0], argv)
    rows = summarise(measure(device, args.batch_size, args.steps, args.warmup), args.batch_size)
    ratio = rows[0]["median_ms"] / rows[1]["median_ms"]
    columns = ("step", "median_ms", "p25_ms", "p75_ms", "samples_per_s")
    print(" | ".join(f"{c:>13}" for c in columns))
    for row in rows:
        print(" | ".join(f"{str(row[c]):>13}" for c in columns))
    print(f"pretrain / finetune step time: {ratio:.2f}x")
    result = {"device": device.type, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "batch_size": args.batch_size, "bev_shape": list(GRID.bev_shape), "history": HISTORY,
              "steps": args.steps, "rows": rows, "pretrain_over_finetune": round(ratio, 3)}
    write_json(OUT / "bench_pretrain.json", result)
    return result


if __name__ == "__main__":
    main()
