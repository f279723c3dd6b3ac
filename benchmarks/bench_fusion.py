"""Fusion-cache throughput and spconv-vs-numpy voxelisation on a smoke-size synthetic set.

    PYTHONPATH=src python benchmarks/bench_fusion.py [--raw DIR] [--repeats 5]

Without ``--raw`` it generates the synthetic ``smoke`` preset into a temporary folder first. Prints a
table and writes ``benchmarks/out/bench_fusion.json``. Both voxelisers run in this one process on the
same clouds, so their time ratio is comparable even on a busy machine; absolute times are not.
"""
from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from turbotrain.data import opencood
from turbotrain.data.cache.builder import build_cache
from turbotrain.data.voxelize import Voxelizer, spconv_available
from turbotrain.grid import Grid
from turbotrain.utils.atomic import write_json

# The project's default cache settings (config/config.yaml).
GRID = Grid((-51.2, -25.6, -3.0, 51.2, 25.6, 3.0), (0.4, 0.4, 0.5), bev_stride=2)
CACHE = dict(history=3, future=10, comm_range=70.0, max_agents=4, sample_stride=2,
             max_points_per_voxel=8, max_voxels=20000, classes=("car", "pedestrian", "truck"))
OUT = Path(__file__).resolve().parent / "out" / "bench_fusion.json"


def synthetic_root(workdir: Path) -> Path:
    from turbotrain.data.synth import generate_dataset

    root = workdir / "raw"
    generate_dataset(root, preset="smoke", seed=0, progress=False)
    return root


def time_fusion(raw: Path, splits: list[str], workdir: Path) -> dict:
    """Fuse every split; the one-off import of torch/spconv happens before the clock starts."""
    Voxelizer(GRID, CACHE["max_points_per_voxel"], CACHE["max_voxels"])(np.zeros((1, 4), np.float32))
    totals = {"seconds": 0.0, "samples": 0, "frames": 0, "points": 0, "voxels": 0}
    for split in splits:
        start = time.perf_counter()
        summary = build_cache(raw, split, workdir / "cache", grid=GRID, progress=False, **CACHE)
        totals["seconds"] += time.perf_counter() - start
        for key in ("samples", "frames", "points", "voxels"):
            totals[key] += summary[key]
    totals["samples_per_s"] = totals["samples"] / totals["seconds"]
    totals["points_per_s"] = totals["points"] / totals["seconds"]
    return {"splits": splits, **totals}


def some_clouds(raw: Path, split: str, limit: int) -> list[np.ndarray]:
    clouds = []
    for index in opencood.index_split(raw, split):
        for agent_id, stamps in index.timestamps.items():
            for stamp in stamps:
                clouds.append(opencood.read_agent_frame(index, agent_id, stamp).points)
                if len(clouds) == limit:
                    return clouds
    return clouds


def time_voxelizer(backend: str, clouds: list[np.ndarray], repeats: int) -> float:
    """Best-of-``repeats`` seconds to voxelise every cloud once (warm-up run excluded)."""
    voxelizer = Voxelizer(GRID, CACHE["max_points_per_voxel"], CACHE["max_voxels"], backend=backend)
    voxelizer(clouds[0])
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for cloud in clouds:
            voxelizer(cloud)
        best = min(best, time.perf_counter() - start)
    return best


def dense_clouds(points: int, count: int) -> list[np.ndarray]:
    """Uniform clouds over the grid at a real sensor's size (~10^5 points), which smoke clouds are not."""
    rng = np.random.default_rng(0)
    low, high = np.array(GRID.point_cloud_range[:3]), np.array(GRID.point_cloud_range[3:])
    return [np.hstack([rng.uniform(low - 5, high + 5, (points, 3)), rng.uniform(0, 1, (points, 1))]).astype(np.float32)
            for _ in range(count)]


def compare_voxelizers(clouds: list[np.ndarray], repeats: int) -> dict:
    row = {"clouds": len(clouds), "points": int(sum(len(c) for c in clouds)), "numpy_s": time_voxelizer("numpy", clouds, repeats)}
    if spconv_available():
        row["spconv_s"] = time_voxelizer("spconv", clouds, repeats)
        row["numpy_over_spconv"] = row["numpy_s"] / row["spconv_s"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw", type=Path, help="an OpenCOOD-layout root (default: generate the smoke preset)")
    parser.add_argument("--splits", nargs="+", default=["train", "val", "test"])
    parser.add_argument("--clouds", type=int, default=40, help="clouds for the voxeliser comparison")
    parser.add_argument("--dense-points", type=int, default=120000, help="points per dense cloud")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_fusion_") as tmp:
        workdir = Path(tmp)
        raw = args.raw or synthetic_root(workdir)
        fusion = time_fusion(raw, args.splits, workdir)
        clouds = some_clouds(raw, args.splits[0], args.clouds)
    voxel = {"smoke": compare_voxelizers(clouds, args.repeats),
             "dense": compare_voxelizers(dense_clouds(args.dense_points, count=5), args.repeats)}
    result = {"machine": platform.processor() or platform.machine(), "grid": GRID.grid_size, "fusion": fusion, "voxelize": voxel}
    write_json(OUT, result)
    print(f"fusion ({' + '.join(args.splits)}): {fusion['samples']} samples, {fusion['frames']} frames, {fusion['points']} points "
          f"in {fusion['seconds']:.2f} s: {fusion['samples_per_s']:.1f} samples/s, {fusion['points_per_s'] / 1e6:.2f} M points/s")
    print(f"{'clouds':<8}{'voxeliser':<10}{'n':>5}{'points':>10}{'seconds':>10}{'M pts/s':>9}{'numpy/spconv':>14}")
    for name, row in voxel.items():
        for backend in ("numpy", "spconv"):
            if f"{backend}_s" in row:
                seconds = row[f"{backend}_s"]
                ratio = f"{row['numpy_over_spconv']:.2f}" if backend == "spconv" else ""
                print(f"{name:<8}{backend:<10}{row['clouds']:>5}{row['points']:>10}{seconds:>10.4f}"
                      f"{row['points'] / seconds / 1e6:>9.2f}{ratio:>14}")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
