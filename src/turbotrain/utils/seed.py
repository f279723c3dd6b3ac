"""One place that seeds every random number generator the pipeline uses."""
from __future__ import annotations

import random

import numpy as np


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        import torch
    except ImportError:  # data stages run without torch
        return
    torch.manual_seed(seed)
