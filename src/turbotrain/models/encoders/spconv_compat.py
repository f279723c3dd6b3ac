"""Import ``spconv.pytorch`` with the one shim that makes its CPU build usable for training.

spconv 2.3.8's CPU wheel runs the forward pass, but the backward kernels (and a few index helpers)
call ``get_current_stream()``, which asks ``torch.cuda`` for the current stream and fails on a
machine without CUDA. The CPU code paths ignore the stream value, so returning 0 there is safe.
``spconv.pytorch.ops`` imported the function by name, so both module attributes must be replaced.
"""
from __future__ import annotations

import importlib
import logging
from types import ModuleType

import torch

log = logging.getLogger(__name__)
_SHIM_MARKER = "_turbotrain_cpu_stream_shim"


def _cpu_stream() -> int:
    """Stand-in for spconv's ``get_current_stream`` when torch has no CUDA (CPU kernels ignore it)."""
    return 0


setattr(_cpu_stream, _SHIM_MARKER, True)


def apply_cpu_stream_shim() -> bool:
    """Patch spconv's stream lookup when CUDA is unavailable; idempotent.

    Returns True when the shim is in place after the call (False on a CUDA machine, where spconv's
    own function must stay).
    """
    if torch.cuda.is_available():
        return False
    # spconv's CPU kernels run in torch's intra-op thread pool and race there: strided sparse convs
    # returned values off by up to 0.5 with 2 threads (tests/test_spconv_compat.py). One thread is
    # correct; the "auto" backend avoids the question on CPU by using the PyTorch implementation.
    if torch.get_num_threads() != 1:
        log.warning("spconv on CPU: limiting torch to 1 thread (its CPU kernels are not thread-safe)")
        torch.set_num_threads(1)
    ops = importlib.import_module("spconv.pytorch.ops")
    cppcore = importlib.import_module("spconv.pytorch.cppcore")
    for module in (ops, cppcore):
        if not getattr(module.get_current_stream, _SHIM_MARKER, False):
            module.get_current_stream = _cpu_stream
    return True


def spconv_available() -> bool:
    """True when ``spconv.pytorch`` imports on this machine (a wheel matching Python/CUDA exists)."""
    try:
        importlib.import_module("spconv.pytorch")
    except (ImportError, OSError, RuntimeError):
        return False
    return True


def import_spconv() -> ModuleType:
    """``spconv.pytorch``, with the CPU stream shim applied when CUDA is unavailable."""
    module = importlib.import_module("spconv.pytorch")
    apply_cpu_stream_shim()
    return module
