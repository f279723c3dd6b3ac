"""Pipeline hot spots before/after, measured in one run: generate, fuse and a job's import time.

    PYTHONPATH=src python benchmarks/bench_pipeline.py --baseline 86e028f
    PYTHONPATH=src python benchmarks/bench_pipeline.py --baseline 86e028f --scenarios 2 --frames 180

The baseline revision is checked out with ``git worktree add --detach`` into a temporary folder and
each measurement runs in a fresh process with ``PYTHONPATH`` pointing at one tree's ``src`` (same
inputs, same seed, one torch thread as Snakemake runs jobs). ``generate`` writes ``--scenarios`` train
scenarios of the default preset (``config/config.yaml``'s ``dataset.preset``) at ``--frames`` frames
with 1 worker into a temporary folder, with the stage's own durability (``stages.data.generate``);
``fuse`` builds that split's cache with the default config's settings; ``import`` is
``import turbotrain.train.engine`` (paid by every train/evaluate job). Prints a table (seconds per
tree and the baseline/current ratio) and writes benchmarks/out/bench_pipeline.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "out"

# Run inside a child process whose PYTHONPATH is one tree's src; prints {"seconds": ...}.
GENERATE = """
import json, sys, time
from turbotrain.config import load_config
from turbotrain.stages.data import generate
config = load_config(sys.argv[1])
config["dataset"]["synthetic_overrides"] = {"workers": 1, "splits": {"train": int(sys.argv[3])}, "frames": int(sys.argv[4])}
start = time.perf_counter()
generate(config, sys.argv[2])
print(json.dumps({"seconds": time.perf_counter() - start}))
"""
FUSE = """
import json, sys, time
from turbotrain.config import load_config
from turbotrain.stages.data import fuse
config = load_config(sys.argv[1])
start = time.perf_counter()
summary = fuse(config, sys.argv[2], "train", sys.argv[3])
print(json.dumps({"seconds": time.perf_counter() - start, "samples": summary["samples"]}))
"""
IMPORT = """
import json, time
start = time.perf_counter()
import turbotrain.train.engine
print(json.dumps({"seconds": time.perf_counter() - start}))
"""


def run_in(tree: Path, code: str, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree / "src"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env, cwd=tree, check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(tree: Path, work: Path, scenarios: int, frames: int) -> dict[str, float]:
    config = REPO / "config" / "config.yaml"  # the same inputs for both trees
    raw, cache = work / "raw", work / "cache"
    out = {"generate": run_in(tree, GENERATE, config, raw, scenarios, frames)["seconds"]}
    fused = run_in(tree, FUSE, config, raw, cache)
    out["fuse"], out["fuse_samples"] = fused["seconds"], fused["samples"]
    out["import"] = min(run_in(tree, IMPORT)["seconds"] for _ in range(3))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="git revision to compare against")
    parser.add_argument("--scenarios", type=int, default=1)
    parser.add_argument("--frames", type=int, default=60)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base_tree = Path(tmp) / "baseline"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(base_tree), args.baseline], cwd=REPO, check=True)
        try:
            rows = {name: measure(tree, Path(tmp) / name, args.scenarios, args.frames)
                    for name, tree in (("baseline", base_tree), ("current", REPO))}
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base_tree)], cwd=REPO, check=True)
    assert rows["baseline"]["fuse_samples"] == rows["current"]["fuse_samples"], "the trees fused different samples"
    print(f"| stage | baseline {args.baseline} (s) | current (s) | speed-up |\n|---|---|---|---|")
    for stage in ("generate", "fuse", "import"):
        b, c = rows["baseline"][stage], rows["current"][stage]
        print(f"| {stage} | {b:.2f} | {c:.2f} | {b / c:.2f}x |")
    OUT.mkdir(exist_ok=True)
    (OUT / "bench_pipeline.json").write_text(json.dumps({"args": vars(args), **rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
