"""Move pretrained weights into a fine-tuning model, loudly.

A silent no-op load (every key renamed, nothing matched) is the classic bug of this field, so the
report lists loaded, missing and unexpected keys and loading refuses to continue if nothing matched.

A ``pretrained.pt`` is meant to be shared, so it holds only tensors and plain data (the groups and a
JSON-like ``meta``) and is read with :func:`~turbotrain.utils.safe_load.load_weights_only`: a file that
asks to run code while loading is refused, naming it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from turbotrain.utils.atomic import atomic_path, json_plain
from turbotrain.utils.errors import DataError
from turbotrain.utils.safe_load import load_weights_only

log = logging.getLogger(__name__)


class TransferError(RuntimeError):
    pass


@dataclass
class TransferReport:
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the transferred groups, absent from the checkpoint
    unexpected: list[str] = field(default_factory=list)  # in the checkpoint, not loadable into the model
    shape_mismatch: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {k: len(v) for k, v in self.__dict__.items()} | {"unexpected_keys": self.unexpected[:20],
                                                                  "missing_keys": self.missing[:20]}


def in_groups(key: str, groups: tuple[str, ...]) -> bool:
    """Whether state-dict ``key`` lies in one of ``groups``: module paths such as ``encoder`` or
    ``prediction_head.motion_encoder``."""
    return any(key == g or key.startswith(g + ".") for g in groups)


def group_state(model: nn.Module, groups: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """State-dict entries of ``model`` that lie in ``groups``."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if in_groups(k, groups)}


def save_pretrained(path: str | Path, state: nn.Module | dict[str, torch.Tensor], groups: tuple[str, ...],
                    meta: dict) -> None:
    """Write the transferable part of a pretrained model, or a ready state dict, atomically.

    ``meta`` is stored as its JSON data, which a weights-only load accepts: a value JSON cannot hold
    fails here, not on the machine that later loads the file.
    """
    tensors = group_state(state, groups) if isinstance(state, nn.Module) else dict(state)
    payload = {"state_dict": tensors, "groups": [str(g) for g in groups], "meta": json_plain(meta)}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def read_pretrained(path: str | Path) -> dict:
    """The payload of a :func:`save_pretrained` file, read without running code from it."""
    payload = load_weights_only(path)
    if not isinstance(payload, dict) or not isinstance(payload.get("state_dict"), dict):
        got = f"keys {sorted(map(str, payload))[:5]}" if isinstance(payload, dict) else type(payload).__name__
        raise DataError(path, "state_dict", "a pretrained checkpoint (keys 'state_dict', 'groups', 'meta')", got)
    return payload


def pretrained_meta(path: str | Path) -> dict:
    """What :func:`save_pretrained` recorded besides the weights (variant, data, wall time, commit)."""
    meta = read_pretrained(path).get("meta", {})
    if not isinstance(meta, dict):
        raise DataError(path, "meta", "a mapping", type(meta).__name__)
    return meta


def load_pretrained(model: nn.Module, path: str | Path) -> TransferReport:
    """Copy matching tensors of a :func:`save_pretrained` file into ``model``; raise if none match."""
    payload = read_pretrained(path)
    source, groups = payload["state_dict"], tuple(payload.get("groups", ()))
    target = model.state_dict()
    report = TransferReport()
    update = {}
    for key, value in source.items():
        if key not in target:
            report.unexpected.append(key)
        elif target[key].shape != value.shape:
            report.shape_mismatch.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(target[key].shape)}")
        else:
            update[key] = value
            report.loaded.append(key)
    report.missing = [k for k in target if in_groups(k, groups) and k not in source]
    if not update:
        raise TransferError(
            f"{path}: no pretrained tensor matched the model ({len(source)} in the checkpoint, "
            f"{len(report.unexpected)} unexpected, {len(report.shape_mismatch)} with another shape); refusing "
            "to fine-tune from an unchanged initialisation"
        )
    model.load_state_dict(update, strict=False)
    log.info("pretrained %s: loaded %d tensors, missing %d, unexpected %d, shape mismatch %d",
             path, len(report.loaded), len(report.missing), len(report.unexpected), len(report.shape_mismatch))
    return report
