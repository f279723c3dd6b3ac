"""Files inside a folder that is swapped in whole skip their fsync and stay atomic."""
from __future__ import annotations

import os

import pytest

from turbotrain.utils import atomic


def _count_fsyncs(monkeypatch) -> list[int]:
    calls = []
    real = os.fsync
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    return calls


def test_fsync_false_skips_the_flush_and_keeps_the_rename(tmp_path, monkeypatch):
    calls = _count_fsyncs(monkeypatch)
    atomic.write_text(tmp_path / "a.yaml", "x: 1\n", fsync=False)
    assert calls == [] and (tmp_path / "a.yaml").read_text() == "x: 1\n"
    atomic.write_text(tmp_path / "b.yaml", "x: 2\n")
    assert len(calls) == 1


def test_failed_write_leaves_no_file_either_way(tmp_path):
    for fsync in (True, False):
        with pytest.raises(RuntimeError), atomic.atomic_open(tmp_path / "c.yaml", fsync=fsync) as fh:
            fh.write("half")
            raise RuntimeError("killed")
        assert list(tmp_path.iterdir()) == []


def test_sync_tree_flushes_every_directory(tmp_path, monkeypatch):
    (tmp_path / "train" / "scene" / "1").mkdir(parents=True)
    atomic.write_text(tmp_path / "train" / "scene" / "1" / "000000.yaml", "x: 1\n", fsync=False)
    calls = _count_fsyncs(monkeypatch)
    atomic.sync_tree(tmp_path)
    assert len(calls) == 4  # root, train, scene, 1
