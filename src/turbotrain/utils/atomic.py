"""Atomic file output: write to a temporary sibling, fsync, then rename over the target.

A killed job therefore leaves either the previous file or no file, never a half-written one that
looks complete. ``fsync=False`` skips the flush for files inside a folder that is itself moved into
place whole once finished (a killed job leaves only the unfinished temporary folder, so the rename
alone keeps each file whole; the folder's owner syncs once before the swap, :func:`sync_tree`). Temporary files carry a ``.partial`` marker so cleanup and users can tell them apart.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

import numpy as np
import yaml


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success rename it to ``target``.

    On any exception the temporary file is removed and ``target`` is left untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if fsync:
            with open(tmp_path, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp_path, target)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_open(target: str | os.PathLike, mode: str = "w", fsync: bool = True, **kwargs: Any) -> Iterator[IO]:
    """``open()`` whose result only appears at ``target`` once the block finished without error."""
    with atomic_path(target, fsync=fsync) as tmp, open(tmp, mode, **kwargs) as fh:
        yield fh


def write_text(target: str | os.PathLike, text: str, fsync: bool = True) -> None:
    with atomic_open(target, "w", fsync=fsync) as fh:
        fh.write(text)


def sync_tree(folder: str | os.PathLike) -> None:
    """Flush a folder written with ``fsync=False`` to disk before it is renamed into place.

    One ``os.sync()`` (flush every dirty page) plus an fsync of each directory costs one disk flush
    where per-file fsyncs cost one per file (two per LiDAR frame).
    """
    os.sync()
    for directory, _, _ in os.walk(folder):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_json(target: str | os.PathLike, obj: Any) -> None:
    with atomic_open(target, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True, default=_json_default)
        fh.write("\n")


def json_plain(obj: Any) -> Any:
    """``obj`` as :func:`write_json` would store it, read back: dicts, lists, str, numbers, bool, None."""
    return json.loads(json.dumps(obj, default=_json_default))


# libyaml's C emitter writes the same text as the Python one, twice as fast (one YAML per LiDAR frame).
_YAML_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def write_yaml(target: str | os.PathLike, obj: Any) -> None:
    with atomic_open(target, "w") as fh:
        yaml.dump(obj, fh, Dumper=_YAML_DUMPER, sort_keys=False)


def write_npz(target: str | os.PathLike, **arrays: np.ndarray) -> None:
    """Uncompressed npz (no pickle), written atomically."""
    with atomic_open(target, "wb") as fh:
        np.savez(fh, **arrays)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")
