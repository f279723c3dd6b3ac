"""Encoder step cost: forward + backward time and peak memory, torch vs spconv sparse backend.

    python benchmarks/bench_encoder.py                       # CPU, tiny, both backends
    python benchmarks/bench_encoder.py --device cuda         # CUDA, torch backend, tiny + paper

Input: ``--frames`` synthetic LiDAR-like agent-frames of ``--points`` points each (ground ring +
box-shaped objects), voxelised on a 51.2 m x 51.2 m x 4 m grid (0.1 x 0.1 x 0.2 m voxels, stride 8).
Prints a table and writes benchmarks/out/bench_encoder.json.
"""
from __future__ import annotations

import argparse
import multiprocessing
import resource
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from turbotrain.data.voxelize import voxelize_numpy
from turbotrain.grid import Grid
from turbotrain.models.encoders import SecondEncoder
from turbotrain.models.encoders.spconv_compat import spconv_available
from turbotrain.utils.atomic import write_json
from turbotrain.utils.seed import seed_everything

GRID = Grid((-25.6, -25.6, -3.0, 25.6, 25.6, 1.0), (0.1, 0.1, 0.2), bev_stride=8)
OUT = Path(__file__).parent / "out" / "bench_encoder.json"


def synthetic_cloud(rng: np.random.Generator, num_points: int) -> np.ndarray:
    """(N, 4) points: 70% on a ground ring around the sensor, 30% on a few box-shaped objects."""
    n_ground = int(0.7 * num_points)
    angle = rng.uniform(0, 2 * np.pi, n_ground)
    radius = rng.uniform(3.0, 25.0, n_ground)
    ground = np.stack([radius * np.cos(angle), radius * np.sin(angle), rng.normal(-1.8, 0.03, n_ground)], 1)
    n_obj = num_points - n_ground
    centres = rng.uniform(-20, 20, (8, 2))
    which = rng.integers(0, len(centres), n_obj)
    objects = np.concatenate([centres[which] + rng.uniform(-2, 2, (n_obj, 2)), rng.uniform(-1.8, -0.3, (n_obj, 1))], 1)
    xyz = np.concatenate([ground, objects]).astype(np.float32)
    return np.concatenate([xyz, rng.uniform(0, 1, (len(xyz), 1)).astype(np.float32)], 1)


def make_batch(num_frames: int, num_points: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Collated (voxels, num_points, coords [frame, z, y, x]) of ``num_frames`` synthetic frames."""
    rng = np.random.default_rng(seed)
    voxels, counts, coords = [], [], []
    for frame in range(num_frames):
        v, c, n = voxelize_numpy(synthetic_cloud(rng, num_points), GRID, max_points_per_voxel=5, max_voxels=40000)
        voxels.append(v)
        counts.append(n)
        coords.append(np.concatenate([np.full((len(c), 1), frame, np.int32), c], 1))
    return (torch.from_numpy(np.concatenate(voxels)), torch.from_numpy(np.concatenate(counts)),
            torch.from_numpy(np.concatenate(coords)))


def train_step(encoder: SecondEncoder, batch: tuple, num_frames: int, device: torch.device) -> None:
    voxels, counts, coords = (t.to(device) for t in batch)
    encoder.zero_grad(set_to_none=True)
    encoder(voxels, counts, coords, num_frames).square().mean().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(encoder: SecondEncoder, batch: tuple, num_frames: int, device: torch.device, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        train_step(encoder, batch, num_frames, device)
        times.append(time.perf_counter() - start)
    return times


def peak_step_memory_mb(encoder: SecondEncoder, batch: tuple, num_frames: int, device: torch.device) -> float:
    """Extra memory at the peak of one step: CUDA allocator stats, else growth of the process's
    peak RSS (tracemalloc cannot see tensor buffers; this runs in a fresh process per measurement,
    so the RSS high-water mark is this encoder's alone)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        train_step(encoder, batch, num_frames, device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    train_step(encoder, batch, num_frames, device)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before_kb) / 1024


def measure(size: str, backend: str, batch: tuple, num_frames: int, device_name: str, repeats: int) -> dict:
    """One (size, backend) measurement; meant to run in its own process (see :func:`measure_isolated`)."""
    device = torch.device(device_name)
    seed_everything(0)
    encoder = SecondEncoder(GRID, size=size, backend=backend).to(device).train()
    memory_mb = peak_step_memory_mb(encoder, batch, num_frames, device)  # first step: also the warm-up
    times = time_steps(encoder, batch, num_frames, device, repeats)
    median = statistics.median(times)
    return {
        "size": size, "backend": backend, "device": device.type, "frames": num_frames,
        "voxels": int(len(batch[0])), "step_ms_median": 1000 * median, "step_ms_min": 1000 * min(times),
        "samples_per_s": num_frames / median, "peak_step_memory_mb": memory_mb,
    }


def measure_isolated(*args) -> dict:
    """:func:`measure` in a fresh spawned process, so peak memory is not polluted by earlier runs."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(measure, *args).result()


def print_table(rows: list[dict]) -> None:
    cols = ["size", "backend", "device", "frames", "voxels",
            "step_ms_median", "step_ms_min", "samples_per_s", "peak_step_memory_mb"]
    print(" | ".join(cols))
    for row in rows:
        print(" | ".join(f"{row[c]:.1f}" if isinstance(row[c], float) else str(row[c]) for c in cols))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--frames", type=int, default=3)
    parser.add_argument("--points", type=int, default=6000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda asked for, but torch sees no CUDA device")
    batch = make_batch(args.frames, args.points, seed=0)
    if args.device == "cpu":
        runs = [("tiny", "torch")] + ([("tiny", "spconv")] if spconv_available() else [])
    else:
        runs = [("tiny", "torch"), ("paper", "torch")]
    rows = [measure_isolated(size, backend, batch, args.frames, args.device, args.repeats) for size, backend in runs]
    print_table(rows)
    by_backend = {r["backend"]: r["step_ms_median"] for r in rows if r["size"] == "tiny"}
    summary = {"rows": rows}
    if {"torch", "spconv"} <= by_backend.keys():
        summary["torch_over_spconv_step_time"] = by_backend["torch"] / by_backend["spconv"]
        print(f"torch / spconv step time (tiny, {args.device}): {summary['torch_over_spconv_step_time']:.2f}x")
    write_json(args.out, summary)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
