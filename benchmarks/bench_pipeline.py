"""Pipeline hot spots before/after, measured in one run: generate, fuse, a job's import time, a
training step and evaluation per sample.

    PYTHONPATH=src python benchmarks/bench_pipeline.py --baseline 86e028f
    PYTHONPATH=src python benchmarks/bench_pipeline.py --baseline 86e028f --scenarios 2 --frames 180

The baseline revision is checked out with ``git worktree add --detach`` into a temporary folder and
each measurement runs in a fresh process with ``PYTHONPATH`` pointing at one tree's ``src`` (same
inputs, same seed, one torch thread as Snakemake runs jobs). ``generate`` writes ``--scenarios`` train
scenarios of the default preset (``config/config.yaml``'s ``dataset.preset``) at ``--frames`` frames
with 1 worker into a temporary folder, with the stage's own durability (``stages.data.generate``);
``fuse`` builds that split's cache with the default config's settings; ``import`` is
``import turbotrain.train.engine`` (paid by every train/evaluate job); ``train step`` is the median of
``--steps`` optimizer steps (forward, both task losses summed, backward, AdamW) of the default model
(attfuse) on batches of that cache, after one warm-up step; ``eval / sample`` is inference plus
scoring (``collect`` + ``score_split``, what ``turbotrain evaluate`` does) over the fused samples,
divided by their number. Each tree reads its own ``config/config.yaml`` with the current default's
data sizes (``SIZE_KEYS``) set on top, so an older tree whose schema lacks newer keys runs the same
sizes. Prints a table (seconds per tree and the baseline/current ratio) and writes
benchmarks/out/bench_pipeline.json.
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

# The default's data sizes, read from the current config and set on both trees' configs.
SIZE_KEYS = ("grid.point_cloud_range", "cache.max_agents", "cache.sample_stride", "cache.history", "cache.future")

# Run inside a child process whose PYTHONPATH is one tree's src; prints {"seconds": ...}.
GENERATE = """
import json, sys, time
from turbotrain.config import load_config
from turbotrain.stages.data import generate
config = load_config(sys.argv[1], json.loads(sys.argv[5]))
config["dataset"]["synthetic_overrides"] = {"workers": 1, "splits": {"train": int(sys.argv[3])}, "frames": int(sys.argv[4])}
start = time.perf_counter()
generate(config, sys.argv[2])
print(json.dumps({"seconds": time.perf_counter() - start}))
"""
FUSE = """
import json, sys, time
from turbotrain.config import load_config
from turbotrain.stages.data import fuse
config = load_config(sys.argv[1], json.loads(sys.argv[4]))
start = time.perf_counter()
summary = fuse(config, sys.argv[2], "train", sys.argv[3])
print(json.dumps({"seconds": time.perf_counter() - start, "samples": summary["samples"]}))
"""
TRAIN = """
import json, statistics, sys, time
import torch
from torch.utils.data import DataLoader
from turbotrain.build import build_model, fused_dataset
from turbotrain.config import load_config
from turbotrain.data.sample import collate
config = load_config(sys.argv[1], json.loads(sys.argv[3]))
torch.manual_seed(0)
data = fused_dataset(config, sys.argv[2], "train", "intermediate")
loader = DataLoader(data, batch_size=config["train"]["batch_size"], shuffle=False, collate_fn=collate)
model = build_model(config, "attfuse")
optimizer = torch.optim.AdamW(model.parameters(), lr=config["train"]["lr"])
times = []
for _, batch in zip(range(int(sys.argv[4]) + 1), loader):
    start = time.perf_counter()
    losses = model.losses(model(batch), batch)
    optimizer.zero_grad()
    (losses["detection"] + losses["prediction"]).backward()
    optimizer.step()
    times.append(time.perf_counter() - start)
print(json.dumps({"seconds": statistics.median(times[1:]), "steps": len(times) - 1}))
"""
EVALUATE = """
import json, sys, time
from turbotrain.build import build_model, device_of, evaluation_dataset
from turbotrain.config import load_config
from turbotrain.evaluate.inference import Predictor, collect
from turbotrain.evaluate.scoring import score_split
config = load_config(sys.argv[1], json.loads(sys.argv[3]))
model = build_model(config, "attfuse")
dataset = evaluation_dataset(config, sys.argv[2], "attfuse", split="train")
start = time.perf_counter()
det_frames, pred_frames = collect(Predictor(model, config["evaluation"], device_of(config)), dataset, "attfuse",
                                  config["evaluation"])
score_split(det_frames, pred_frames, config)
print(json.dumps({"seconds": (time.perf_counter() - start) / len(dataset), "samples": len(dataset)}))
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


def size_overrides() -> str:
    """``key=value`` overrides (JSON list) setting the current default's data sizes."""
    import yaml

    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    values = []
    for key in SIZE_KEYS:
        node = config
        for part in key.split("."):
            node = node[part]
        values.append(f"{key}={json.dumps(node)}")
    return json.dumps(values)


def measure(tree: Path, work: Path, scenarios: int, frames: int, steps: int) -> dict[str, float]:
    config, sizes = tree / "config" / "config.yaml", size_overrides()
    raw, cache = work / "raw", work / "cache"
    out = {"generate": run_in(tree, GENERATE, config, raw, scenarios, frames, sizes)["seconds"]}
    fused = run_in(tree, FUSE, config, raw, cache, sizes)
    out["fuse"], out["fuse_samples"] = fused["seconds"], fused["samples"]
    out["import"] = min(run_in(tree, IMPORT)["seconds"] for _ in range(3))
    out["train step"] = run_in(tree, TRAIN, config, cache, sizes, steps)["seconds"]
    out["eval / sample"] = run_in(tree, EVALUATE, config, cache, sizes)["seconds"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="git revision to compare against")
    parser.add_argument("--scenarios", type=int, default=1)
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--steps", type=int, default=8, help="timed training steps (median reported)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base_tree = Path(tmp) / "baseline"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(base_tree), args.baseline], cwd=REPO, check=True)
        try:
            rows = {name: measure(tree, Path(tmp) / name, args.scenarios, args.frames, args.steps)
                    for name, tree in (("baseline", base_tree), ("current", REPO))}
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base_tree)], cwd=REPO, check=True)
    assert rows["baseline"]["fuse_samples"] == rows["current"]["fuse_samples"], "the trees fused different samples"
    print(f"| stage | baseline {args.baseline} (s) | current (s) | speed-up |\n|---|---|---|---|")
    for stage in ("generate", "fuse", "import", "train step", "eval / sample"):
        b, c = rows["baseline"][stage], rows["current"][stage]
        print(f"| {stage} | {b:.2f} | {c:.2f} | {b / c:.2f}x |")
    OUT.mkdir(exist_ok=True)
    (OUT / "bench_pipeline.json").write_text(json.dumps({"args": vars(args), **rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
