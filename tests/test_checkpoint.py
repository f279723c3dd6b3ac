"""Checkpoint files: RNG capture, atomic save/load, weight loading, and resume after SIGKILL.

Run as a script (``python tests/test_checkpoint.py RUN_DIR SECONDS_PER_STEP``) this file is the
child training process that the SIGKILL test starts, kills and restarts.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from turbotrain.train.checkpoint import (
    CheckpointFiles,
    capture_rng_state,
    load_checkpoint,
    load_model_weights,
    restore_rng_state,
    save_checkpoint,
)
from turbotrain.utils.errors import DataError

TOTAL_STEPS = 12


def _draws() -> tuple[float, float, torch.Tensor]:
    return random.random(), float(np.random.rand()), torch.rand(3)


def test_rng_state_round_trip_replays_every_generator(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    np.random.randn()  # leaves a cached Gaussian in NumPy's state
    save_checkpoint(tmp_path / "rng.pt", {"rng": capture_rng_state()})
    expected = _draws()
    _draws()  # move every generator on
    restore_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    got = _draws()
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1})

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_checkpoint(path, {"step": 2, "bad": Unpicklable()})
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_foreign_files_are_refused_by_name(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(DataError, match="other.pt.*format"):
        load_checkpoint(tmp_path / "other.pt")


def test_model_weights_load_under_a_prefix(tmp_path):
    torch.manual_seed(0)
    full = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    save_checkpoint(tmp_path / "pre.pt", {"model": full.state_dict()})
    first_layer = nn.Linear(3, 4)
    missing, unexpected = load_model_weights(tmp_path / "pre.pt", first_layer, prefix="0.")
    assert (missing, unexpected) == ([], [])
    assert torch.equal(first_layer.weight, full[0].weight)
    with pytest.raises(DataError, match="decoder"):
        load_model_weights(tmp_path / "pre.pt", first_layer, prefix="decoder.")


def test_final_name_must_not_clobber_last(tmp_path):
    with pytest.raises(ValueError, match="last.pt"):
        CheckpointFiles(tmp_path, final_name="last.pt")


# ------------------------------------------------------------------------------------ SIGKILL
def _child_command(run_dir: Path, seconds_per_step: float) -> list[str]:
    return [sys.executable, __file__, str(run_dir), str(seconds_per_step)]


def _child_env() -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[1] / "src")
    return {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": "1"}


def _run_to_completion(run_dir: Path) -> None:
    subprocess.run(_child_command(run_dir, 0.0), env=_child_env(), check=True, timeout=120)


def _kill_after_first_checkpoint(run_dir: Path) -> None:
    child = subprocess.Popen(_child_command(run_dir, 0.15), env=_child_env())
    deadline = time.monotonic() + 60
    try:
        while not (run_dir / "last.pt").exists():
            assert child.poll() is None, "child exited before writing a checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 60 s"
            time.sleep(0.02)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL


def test_run_killed_with_sigkill_resumes_to_identical_weights(tmp_path):
    _run_to_completion(tmp_path / "uninterrupted")
    killed = tmp_path / "killed"
    _kill_after_first_checkpoint(killed)
    assert not (killed / "final.pt").exists()
    assert load_checkpoint(killed / "last.pt")["progress"]["step"] < TOTAL_STEPS
    _run_to_completion(killed)
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["resumed_from_step"] > 0 and summary["steps"] == TOTAL_STEPS
    reference = load_checkpoint(tmp_path / "uninterrupted" / "final.pt")["model"]
    resumed = load_checkpoint(killed / "final.pt")["model"]
    assert reference.keys() == resumed.keys()
    for name in reference:
        assert torch.equal(reference[name], resumed[name]), name
    steps = [line.split(",")[0] for line in (killed / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == [str(s) for s in range(1, TOTAL_STEPS + 1)]


def _child_main(run_dir: str, seconds_per_step: str) -> None:
    """Train the toy model for two epochs (with dropout, so RNG restore matters), slowed to be killable."""
    from test_engine import SumBalancer, base_config, make_model, toy_dataset, two_task_step

    from turbotrain.train.engine import fit
    from turbotrain.utils.atomic import write_json

    delay = float(seconds_per_step)

    def slow_step(model, batch):
        time.sleep(delay)
        return two_task_step(model, batch)

    config = base_config(max_steps=TOTAL_STEPS, checkpoint_every=3, batch_size=4)
    summary = fit(make_model(dropout=0.2), slow_step, SumBalancer(), toy_dataset(24), config, run_dir)
    write_json(Path(run_dir) / "summary.json", summary)


if __name__ == "__main__":
    _child_main(*sys.argv[1:])
