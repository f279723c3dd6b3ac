"""How far the prediction head's backcast tracks are from the true history (what sets the default
``pretrain.variants.<v>.trajectory.input_noise_m``: SmartPretrain's windows are made to look like them).

    PYTHONPATH=src python benchmarks/measure_backcast_error.py --config .turbotrain/configs/<hash>.yaml \
        [--cache data/cache/synthetic] [--fusion attfuse] [--samples 48] runs/finetune/.../final.pt ...

Reads fine-tuned checkpoints of a finished run of the pipeline; GT boxes are the queries (as in
training), so detections at test time would do worse. Prints per checkpoint the RMS and the mean
absolute error per coordinate (m) over the valid past steps of the val split.
"""
from __future__ import annotations

import argparse

import torch

from turbotrain.build import build_model, evaluation_dataset
from turbotrain.config import load_config
from turbotrain.data.sample import collate
from turbotrain.models.motion import to_anchor_frame
from turbotrain.train.checkpoint import load_checkpoint


def backcast_errors(model, data, samples: int, batch_size: int = 4) -> torch.Tensor:
    """Per-coordinate errors (N,) of the backcast against the history, in each box's heading frame."""
    errors = []
    with torch.no_grad():
        for start in range(0, min(len(data), samples), batch_size):
            batch = collate([data[i] for i in range(start, min(start + batch_size, len(data), samples))])
            backcast = model(batch)["prediction"]["backcast"]
            past = backcast.shape[2]
            target = to_anchor_frame(batch.history[..., -past - 1:-1, :2], batch.boxes[..., (0, 1, 6)])
            valid = batch.history_valid[..., -past - 1:-1] & batch.box_mask[..., None]
            errors.append((backcast - target)[valid].flatten())
    return torch.cat(errors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--cache", default="data/cache/synthetic")
    parser.add_argument("--fusion", default="attfuse")
    parser.add_argument("--samples", type=int, default=48)
    parser.add_argument("checkpoints", nargs="+")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = load_config(args.config)
    data = evaluation_dataset(config, args.cache, args.fusion, split="val")
    for checkpoint in args.checkpoints:
        model = build_model(config, args.fusion)
        model.load_state_dict(load_checkpoint(checkpoint)["model"])
        e = backcast_errors(model.eval(), data, args.samples)
        print(f"{checkpoint}: {len(e)} coordinates, RMS {float(e.pow(2).mean().sqrt()):.3f} m, "
              f"mean |e| {float(e.abs().mean()):.3f} m")


if __name__ == "__main__":
    main()
