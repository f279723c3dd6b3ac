"""Training-step and forward time of the default model with each intermediate fuser, one process.

    PYTHONPATH=src python benchmarks/bench_fusers.py [--cache data/cache/synthetic] [--steps 5] [FUSION ...]

Needs the default's fusion cache (`snakemake -c2 data/cache/synthetic/train`). One torch thread, as
Snakemake runs jobs; every fuser sees the same batches in this one process, so the ratios between
fusers compare even on a busy machine; absolute times do not. Prints one line per fuser.
"""
from __future__ import annotations

import argparse
import time

import torch

from turbotrain.build import build_model, fused_dataset
from turbotrain.config import load_config
from turbotrain.data.sample import collate


def step_and_forward_s(model, batches) -> tuple[float, float]:
    """Mean seconds of a forward + backward (train mode) and of a forward_bev (eval), after one warm-up."""
    def train_step(batch):
        losses = model.losses(model(batch), batch)
        (losses["detection"] + losses["prediction"]).backward()

    model.train()
    train_step(batches[0])
    start = time.perf_counter()
    for batch in batches[1:]:
        train_step(batch)
    train = (time.perf_counter() - start) / (len(batches) - 1)
    model.eval()
    start = time.perf_counter()
    with torch.no_grad():
        for batch in batches[1:]:
            model.forward_bev(batch)
    return train, (time.perf_counter() - start) / (len(batches) - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("fusions", nargs="*", default=["attfuse", "attfuse_mha", "fcooper", "hmsa_lite", "v2xvit"])
    parser.add_argument("--cache", default="data/cache/synthetic")
    parser.add_argument("--config", default="config/config.yaml")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = load_config(args.config)
    data = fused_dataset(config, args.cache, "train", "intermediate")
    size = config["train"]["batch_size"]
    batches = [collate([data[i * size + j] for j in range(size)]) for i in range(args.steps + 1)]
    for fusion in args.fusions:
        torch.manual_seed(0)
        model = build_model(config, fusion)
        train, forward = step_and_forward_s(model, batches)
        params = sum(p.numel() for p in model.parameters())
        print(f"{fusion:12s} train step {train:.3f} s   forward_bev {forward:.3f} s   parameters {params:,}")


if __name__ == "__main__":
    main()
