"""Read checkpoint files without running code from them.

Checkpoints travel (a ``pretrained.pt`` shared through a DVC remote, a run directory copied from a
colleague), and a pickle can call any function while it is read. Every checkpoint the project reads
therefore goes through :func:`load_weights_only`: ``torch.load(weights_only=True)`` accepts tensors
and plain Python data (dict, list, tuple, str, numbers, bool, None) and nothing else, and a file that
needs more is refused with an error naming it, before any of its code runs.
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from turbotrain.utils.errors import DataError

# torch's message explains how to load the file anyway; the user needs only the offending part.
_UNPICKLER_REASON = re.compile(r"WeightsUnpickler error:\s*(.+?)(?:\. |\n\n|$)", re.DOTALL)


def load_weights_only(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load`` of ``path`` restricted to tensors and plain data; DataError otherwise."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        match = _UNPICKLER_REASON.search(str(err))
        reason = " ".join(match.group(1).split()) if match else type(err).__name__
        if "GLOBAL" in reason:  # the pickle names a function or class to call
            raise DataError(path, "pickle", "a checkpoint of tensors and plain data only (refused, not executed: "
                            "it asks to call code while loading)", reason) from None
        raise DataError(path, "format", "a file written by torch.save", reason) from None
    except RuntimeError as err:
        if "PytorchStreamReader" not in str(err):  # e.g. a CUDA tensor on a machine without CUDA
            raise
        raise DataError(path, "format", "a complete file written by torch.save", " ".join(str(err).split())) from None
