"""The engine's data order: a per-epoch permutation that is a pure function of (seed, epoch).

Kept apart from the engine so that budget accounting (``accounting.py``) can replay which samples
a run read without importing the training loop.
"""
from __future__ import annotations

import numpy as np
import torch


def mixed_seed(*entropy: int) -> int:
    """A 63-bit seed from several integers; SeedSequence mixing keeps streams of neighbouring
    inputs (seed, epoch) uncorrelated, which ``seed + epoch`` would not."""
    return int(np.random.SeedSequence(list(entropy)).generate_state(1, dtype=np.uint64)[0] >> 1)


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The global sample order of one epoch; a pure function of ``(seed, epoch)``."""
    generator = torch.Generator().manual_seed(mixed_seed(seed, epoch))
    return torch.randperm(num_samples, generator=generator)
