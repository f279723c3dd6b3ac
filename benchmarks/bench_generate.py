"""Synthetic dataset generation throughput: frames/s and points/s per preset.

    PYTHONPATH=src python benchmarks/bench_generate.py                   # smoke and mini, 1 worker
    PYTHONPATH=src python benchmarks/bench_generate.py --presets smoke --workers 2

Each preset is generated once into a temporary folder (deleted afterwards). ``frames/s`` counts
scenario frames (one timestamp of a scenario, all its agents); ``agent-frames/s`` counts written
``.pcd`` + ``.yaml`` pairs. Prints a table and writes benchmarks/out/bench_generate.json and .csv.
"""
from __future__ import annotations

import argparse
import csv
import os
import tempfile
import time
from pathlib import Path

from turbotrain.data.synth import generate_dataset, resolve_config
from turbotrain.utils.atomic import atomic_open, write_json

OUT = Path(__file__).parent / "out"
COLUMNS = ("preset", "workers", "scenarios", "frames", "agent_frames", "points", "seconds",
           "frames_per_s", "agent_frames_per_s", "points_per_s", "points_per_agent_frame", "mb_on_disk")


def folder_megabytes(root: Path) -> float:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) / 1e6


def bench_preset(preset: str, workers: int, seed: int) -> dict:
    """Generate ``preset`` once and measure it."""
    with tempfile.TemporaryDirectory(prefix=f"bench_generate_{preset}_") as tmp:
        start = time.perf_counter()
        summary = generate_dataset(tmp, preset, seed=seed, overrides={"workers": workers}, progress=False)
        seconds = time.perf_counter() - start
        size = folder_megabytes(Path(tmp))
    splits = summary["splits"].values()
    frames = sum(s["frames"] for s in splits)
    agent_frames = sum(s["agent_frames"] for s in splits)
    points = sum(s["points"] for s in splits)
    return {
        "preset": preset, "workers": workers, "scenarios": sum(s["scenarios"] for s in splits),
        "frames": frames, "agent_frames": agent_frames, "points": points, "seconds": round(seconds, 2),
        "frames_per_s": round(frames / seconds, 2), "agent_frames_per_s": round(agent_frames / seconds, 2),
        "points_per_s": round(points / seconds), "points_per_agent_frame": round(points / max(agent_frames, 1)),
        "mb_on_disk": round(size, 1),
    }


def print_table(rows: list[dict]) -> None:
    header = ("preset", "workers", "scenarios", "frames", "agent_frames", "seconds", "frames_per_s",
              "agent_frames_per_s", "points_per_s", "points_per_agent_frame", "mb_on_disk")
    widths = [max(len(h), *(len(str(r[h])) for r in rows)) for h in header]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    for row in rows:
        print("  ".join(str(row[h]).rjust(w) for h, w in zip(header, widths)))


def write_outputs(rows: list[dict]) -> None:
    write_json(OUT / "bench_generate.json", {"cpu_count": os.cpu_count(), "results": rows})
    with atomic_open(OUT / "bench_generate.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(COLUMNS))
        writer.writeheader()
        writer.writerows(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["smoke", "mini"])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for preset in args.presets:
        resolve_config(preset)  # fail on a typo before spending minutes on the others
    rows = [bench_preset(preset, args.workers, args.seed) for preset in args.presets]
    print_table(rows)
    write_outputs(rows)
    print(f"wrote {OUT / 'bench_generate.json'} and {OUT / 'bench_generate.csv'}")


if __name__ == "__main__":
    main()
