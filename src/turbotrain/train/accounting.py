"""Budget accounting: what a training run spent, in units that compare across recipes.

A run records its optimizer steps, samples seen (steps x global batch), the distinct samples it
saw (replayed from the engine's per-epoch permutations, so nothing is stored per step), and its
passes through the trunk: forward passes of the model, and backward passes that reached the
shared parameters. Balancers differ in the last: a parameter-space balancer backpropagates once
per task, a feature-space one or a plain sum once per micro-batch; a frozen trunk gets none.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from turbotrain.budgets import SPENT_KEYS
from turbotrain.train.sampling import epoch_permutation


def seen_indices(num_samples: int, samples_per_step: int, seed: int, steps: int) -> np.ndarray:
    """Sorted distinct sample indices the first ``steps`` optimizer steps of a run read.

    Mirrors the engine's order: step ``s`` of an epoch reads ``perm[s*B : (s+1)*B]`` of that epoch's
    permutation, and an epoch's final partial global batch is dropped.
    """
    per_epoch = num_samples // samples_per_step
    if per_epoch == 0 or steps == 0:
        return np.empty(0, dtype=np.int64)
    seen = np.zeros(num_samples, dtype=bool)
    epoch = 0
    while steps > 0 and not seen.all():
        taken = min(steps, per_epoch)
        seen[epoch_permutation(num_samples, seed, epoch)[: taken * samples_per_step].numpy()] = True
        steps -= taken
        epoch += 1
    return np.flatnonzero(seen)


class TrunkBackwardCounter:
    """Counts gradients computed for the trunk's first trainable parameter: one per backward pass
    (``loss.backward()`` or ``autograd.grad``) that reached the start of the shared network."""

    def __init__(self, shared_params: Sequence[torch.Tensor]):
        self.count = 0
        first = next((p for p in shared_params if p.requires_grad), None)
        self._handle = None if first is None else first.register_hook(self._seen)

    def _seen(self, grad: torch.Tensor) -> None:
        self.count += 1

    def close(self) -> None:
        if self._handle is not None:
            self._handle.remove()


def combine_stages(summaries: Sequence[dict], seen: Sequence[np.ndarray]) -> dict:
    """Totals over the stages of one recipe; distinct samples are the union of each stage's."""
    totals = {key: sum(s[key] for s in summaries) for key in SPENT_KEYS if key != "unique_samples_seen"}
    totals["unique_samples_seen"] = len(np.unique(np.concatenate(seen))) if seen else 0
    return totals


def with_pretraining(finetuning: dict, pretraining: dict | None) -> dict:
    """``pretrain_<key>`` and ``total_<key>`` (pretraining + fine-tuning) beside the fine-tuning keys."""
    out = dict(finetuning)
    for key in SPENT_KEYS:
        spent = float((pretraining or {}).get(key, 0) or 0)
        out[f"pretrain_{key}"] = spent
        if key != "unique_samples_seen":
            out[f"total_{key}"] = finetuning[key] + spent
    return out
