"""Training-step cost of the joint CooperativePnP model.

One step = forward + both task losses + backward + Adam step on a toy cooperative batch
(:mod:`turbotrain.testing`: 2 agents, 2 history steps). Reported per configuration: median
step time, samples/s, and peak memory (CUDA: ``max_memory_allocated``; CPU: each configuration runs in
a fresh process and reports its peak RSS minus its RSS once model and batch are built, i.e. what the
training steps add, allocator caching included).

CPU (default): the tiny model on a 25.6 m x 25.6 m grid (32 x 32 BEV), for each fusion choice.
``--device cuda``: the paper-size model on the V2XPnP evaluation range (x +-70.4 m, y +-40 m,
0.1 x 0.1 x 0.2 m voxels, SECOND stride 8 -> 100 x 176 BEV).

Run: ``PYTHONPATH=src python benchmarks/bench_model.py [--device cuda] [--steps 10] [--batch-size 2]``
Writes ``benchmarks/out/bench_model.json`` and ``.csv``.
"""
from __future__ import annotations

import csv
import io
import multiprocessing
import resource
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench_cli import parse_device_args

from turbotrain.grid import Grid
from turbotrain.models.joint import CooperativePnP
from turbotrain.testing import ToySceneConfig, toy_batch
from turbotrain.utils.atomic import write_json, write_text
from turbotrain.utils.seed import seed_everything

OUT = Path(__file__).parent / "out"
CLASSES = ["car", "pedestrian", "truck"]
HISTORY, FUTURE = 2, 4
TINY_GRID = Grid((-12.8, -12.8, -3.0, 12.8, 12.8, 1.0), (0.4, 0.4, 0.5), 2)
PAPER_GRID = Grid((-70.4, -40.0, -3.0, 70.4, 40.0, 1.0), (0.1, 0.1, 0.2), 8)


@dataclass
class Case:
    size: str
    fusion: str
    temporal: str
    grid: Grid


def model_cfg(case: Case) -> dict:
    return {
        "size": case.size,
        "encoder": {"name": "second", "backend": "auto"},
        "bev_backbone": {"name": "resnet_fpn"},
        "fusion": {"name": case.fusion},
        "temporal": {"name": case.temporal},
        "detection_head": {"name": "center"},
        "prediction_head": {"name": "multimodal"},
    }


def cases(device: str) -> list[Case]:
    if device == "cuda":
        return [Case("paper", f, "attention", PAPER_GRID) for f in ("fcooper", "attfuse", "v2xvit")]
    return [Case("tiny", f, "attention", TINY_GRID) for f in ("ego", "fcooper", "attfuse", "v2xvit")] + [
        Case("tiny", "v2xvit", "conv_gru", TINY_GRID)
    ]


def peak_rss_mib() -> float:
    # ru_maxrss is KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def measure_in_fresh_process(case: Case, device: torch.device, batch_size: int, steps: int, warmup: int) -> dict:
    """:func:`measure` in a spawned process, so peak RSS belongs to this configuration alone."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(measure, (case, device, batch_size, steps, warmup))


def measure(case: Case, device: torch.device, batch_size: int, steps: int, warmup: int) -> dict:
    """Median step time, samples/s and peak memory of ``steps`` training steps after ``warmup``."""
    seed_everything(0)
    scenes = [ToySceneConfig(history=HISTORY, future=FUTURE, num_objects=6, points_per_box=600, ground_points=4000)] * batch_size
    batch = toy_batch(case.grid, scenes, seed=0).to(device)
    model = CooperativePnP(model_cfg(case), case.grid, CLASSES, HISTORY, FUTURE).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = current_rss_mib()
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        losses = model.losses(model(batch), batch)
        optimizer.zero_grad()
        (losses["detection"] + losses["prediction"]).backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    step = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else peak_rss_mib() - rss_before
    return {
        "size": case.size, "fusion": case.fusion, "temporal": case.temporal, "device": device.type,
        "bev_shape": "x".join(map(str, case.grid.bev_shape)), "batch_size": batch_size, "frames": len(batch.frame_sample),
        "voxels": len(batch.voxels), "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
        "step_ms": round(step * 1e3, 1), "samples_per_s": round(batch_size / step, 2), "peak_mem_mib": round(peak, 1),
    }


def to_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> list[dict]:
    args, device = parse_device_args(__doc__.splitlines()[0], argv)
    run = measure if device.type == "cuda" else measure_in_fresh_process
    rows = [run(case, device, args.batch_size, args.steps, args.warmup) for case in cases(args.device)]
    columns = ("size", "fusion", "temporal", "bev_shape", "params_m", "step_ms", "samples_per_s", "peak_mem_mib")
    print(" | ".join(f"{c:>13}" for c in columns))
    for row in rows:
        print(" | ".join(f"{str(row[c]):>13}" for c in columns))
    name = f"bench_model_{args.device}"
    write_json(OUT / f"{name}.json", {"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows})
    write_text(OUT / f"{name}.csv", to_csv(rows))
    return rows


if __name__ == "__main__":
    main()
