"""Checkpoints from elsewhere cannot run code: every checkpoint is read weights-only.

The crafted files below call ``exec`` while unpickling, which would write a marker file; each test
asserts the marker never appears and that the refusal names the file.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from turbotrain.config import load_config
from turbotrain.data.synth import generate_dataset
from turbotrain.pretrain.transfer import pretrained_meta
from turbotrain.stages.data import fuse
from turbotrain.train.checkpoint import CHECKPOINT_FORMAT, load_checkpoint
from turbotrain.utils.errors import DataError

REPO_ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(REPO_ROOT / "config" / "smoke.yaml")
TRAIN_OVERRIDES = ["evaluation.curve_samples=0"]


class WritesMarker:
    """Unpickles by calling ``exec``: what a malicious checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",)


def malicious_pretrained(path: Path, marker: Path) -> Path:
    """A pretrained.pt with real tensors whose meta runs code when unpickled."""
    torch.save({"state_dict": {"encoder.weight": torch.zeros(2, 2)}, "groups": ["encoder"],
                "meta": {"wall_s": 1.0, "note": WritesMarker(marker)}}, path)
    return path


@pytest.fixture(scope="module")
def smoke_cache(tmp_path_factory) -> str:
    """A one-scenario fusion cache built with the smoke preset and config (train split)."""
    root = tmp_path_factory.mktemp("untrusted")
    config = load_config(SMOKE, TRAIN_OVERRIDES)
    generate_dataset(root / "raw", preset="smoke", seed=0, progress=False,
                     overrides={"splits": {"train": 1, "val": 0, "test": 0}, "frames": 10})
    fuse(config, root / "raw", "train", root / "cache")
    return str(root / "cache")


def test_train_refuses_a_pretrained_file_that_runs_code(smoke_cache, tmp_path):
    marker = tmp_path / "marker"
    evil = malicious_pretrained(tmp_path / "pretrained.pt", marker)
    argv = [sys.executable, "-m", "turbotrain.cli", "train", "--config", SMOKE,
            *[a for o in TRAIN_OVERRIDES for a in ("--set", o)],
            "--fusion", "none", "--pretrain", "spatiotemporal", "--recipe", "joint", "--balancer", "sum",
            "--cache", smoke_cache, "--pretrained", str(evil), "--out", str(tmp_path / "run")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT / "src"), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr
    assert not marker.exists()
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith(f"turbotrain train: error: {evil}: field 'pickle'"), done.stderr
    assert "exec" in error and "Traceback" not in done.stderr
    # The file really is malicious: an unrestricted load runs its code.
    torch.load(evil, weights_only=False)
    assert marker.read_text() == "code ran"


def test_pretrained_meta_refuses_the_file_too(tmp_path):
    marker = tmp_path / "marker"
    evil = malicious_pretrained(tmp_path / "pretrained.pt", marker)
    with pytest.raises(DataError, match="pretrained.pt: field 'pickle'") as info:
        pretrained_meta(evil)
    assert info.value.path == str(evil)
    assert not marker.exists()


def test_training_checkpoint_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "marker"
    evil = tmp_path / "last.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "model": {}, "progress": {"step": WritesMarker(marker)}}, evil)
    with pytest.raises(DataError, match="last.pt: field 'pickle'"):
        load_checkpoint(evil)
    assert not marker.exists()


def test_a_truncated_checkpoint_is_named(tmp_path):
    whole = tmp_path / "whole.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "model": {"w": torch.zeros(100)}}, whole)
    cut = tmp_path / "final.pt"
    cut.write_bytes(whole.read_bytes()[:200])
    with pytest.raises(DataError, match="final.pt: field 'format'"):
        load_checkpoint(cut)
