"""Training checkpoints: everything a killed run needs to continue bit-identically.

A checkpoint is one ``torch.save`` dict written atomically (``utils.atomic.atomic_path``), so a
SIGKILL during the write leaves the previous checkpoint intact. The payload holds only tensors and
plain Python values, which lets :func:`load_checkpoint` read it weights-only
(:func:`~turbotrain.utils.safe_load.load_weights_only`: no pickle code runs when loading a checkpoint
from someone else's run directory; one that asks to is refused, naming the file).
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from turbotrain.utils.atomic import atomic_path
from turbotrain.utils.errors import DataError
from turbotrain.utils.safe_load import load_weights_only

CHECKPOINT_FORMAT = 1
LAST_NAME = "last.pt"


def capture_rng_state() -> dict[str, Any]:
    """States of every generator training may draw from: Python, NumPy, torch CPU and CUDA."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        # NumPy's key array is stored as a tensor so the payload stays weights_only-loadable.
        "numpy": {
            "kind": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (CUDA states only when this process sees a GPU)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["kind"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (plus the format version) atomically to ``path``."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save({"format": CHECKPOINT_FORMAT, **payload}, tmp)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`; refuses other formats by name."""
    path = Path(path)
    payload = load_weights_only(path, map_location)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        got = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise DataError(path, "format", f"turbotrain checkpoint format {CHECKPOINT_FORMAT}", got)
    return payload


def load_model_weights(
    path: str | Path, model: nn.Module, prefix: str = "", strict: bool = True
) -> tuple[list[str], list[str]]:
    """Load the ``model`` entry of a checkpoint into ``model`` (e.g. pretrained weights for fine-tuning).

    ``prefix`` keeps only entries under that module path and strips it, so a pretrained encoder
    (``"encoder."``) can be loaded into a bare encoder. Returns ``(missing_keys, unexpected_keys)``.
    """
    state = load_checkpoint(path)["model"]
    if prefix:
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not state:
            raise DataError(path, "model", f"parameters under prefix '{prefix}'", "none")
    result = model.load_state_dict(state, strict=strict)
    return list(result.missing_keys), list(result.unexpected_keys)


class CheckpointFiles:
    """The checkpoint files of one run directory: the rolling ``last.pt`` and the final one."""

    def __init__(self, run_dir: str | Path, final_name: str = "final.pt"):
        if final_name == LAST_NAME:
            raise ValueError(f"final checkpoint name must differ from '{LAST_NAME}'")
        self.run_dir = Path(run_dir)
        self.last = self.run_dir / LAST_NAME
        self.final = self.run_dir / final_name

    def resume_payload(self, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
        """The payload to resume from, or ``None`` for a fresh run."""
        return load_checkpoint(self.last, map_location) if self.last.exists() else None

    def save_last(self, payload: dict[str, Any]) -> Path:
        return save_checkpoint(self.last, payload)

    def save_final(self, payload: dict[str, Any]) -> Path:
        return save_checkpoint(self.final, payload)
