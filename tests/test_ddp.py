"""Data parallelism: torchrun environment, gradient averaging, and 1 vs 2 processes on CPU (gloo).

Run as a script (``python tests/test_ddp.py RUN_DIR``, optionally under torchrun) this file is the
training process the equality test launches.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from turbotrain.train.checkpoint import load_checkpoint
from turbotrain.train.distributed import DistContext, all_reduce_gradients, launch_env, resolve_device
from turbotrain.utils.errors import ConfigError

CPU = torch.device("cpu")


def test_launch_env_reads_torchrun_variables(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert launch_env() == (0, 1, 0)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert launch_env() == (3, 4, 1)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ConfigError, match="RANK=4"):
        launch_env()


def test_cpu_device_is_honoured_and_unknown_devices_are_refused():
    assert resolve_device("cpu") == CPU
    with pytest.raises(ConfigError, match="tpu"):
        resolve_device("tpu")


def test_single_process_gradient_averaging_divides_and_leaves_missing_grads_alone():
    with_grad, without_grad = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    with_grad.grad = torch.tensor([2.0, 4.0, 6.0])
    all_reduce_gradients([with_grad, without_grad], DistContext(0, 1, 0, CPU), divisor=2)
    assert torch.equal(with_grad.grad, torch.tensor([1.0, 2.0, 3.0]))
    assert without_grad.grad is None


def _env() -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "PYTHONPATH": src + os.pathsep + env.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}


def _launch(run_dir: Path, processes: int) -> dict:
    if processes == 1:
        command = [sys.executable, __file__, str(run_dir)]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={processes}", __file__, str(run_dir)]
    subprocess.run(command, env=_env(), check=True, timeout=240)
    return json.loads((run_dir / "summary.json").read_text())


def test_two_processes_give_the_single_process_weights(tmp_path):
    single = _launch(tmp_path / "one", processes=1)
    double = _launch(tmp_path / "two", processes=2)
    assert (single["world_size"], double["world_size"]) == (1, 2)
    assert single["steps"] == double["steps"] == 6
    one = load_checkpoint(tmp_path / "one" / "final.pt")
    two = load_checkpoint(tmp_path / "two" / "final.pt")
    for name in one["model"]:
        torch.testing.assert_close(one["model"][name], two["model"][name], atol=1e-6, rtol=1e-5, msg=name)
    torch.testing.assert_close(one["balancer"]["uw.log_var"], two["balancer"]["uw.log_var"],
                               atol=1e-6, rtol=1e-5)
    # Only rank 0 logs: every step appears once.
    steps = [line.split(",")[0] for line in (tmp_path / "two" / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == [str(s) for s in range(1, 7)]


def _child_main(run_dir: str) -> None:
    """Train the toy problem with a learnable balancer; rank 0 writes the summary."""
    from test_engine import TASKS, base_config, make_model, toy_dataset, two_task_step

    from turbotrain.train.balancers import build_balancer
    from turbotrain.train.engine import fit
    from turbotrain.utils.atomic import write_json

    config = base_config(max_steps=6, batch_size=8, grad_accum_steps=2, checkpoint_every=3)
    model = make_model()
    heads = {"regression": list(model.regression_head.parameters()),
             "classification": list(model.classification_head.parameters())}
    summary = fit(model, two_task_step, build_balancer("uncertainty", list(TASKS)), toy_dataset(), config,
                  run_dir, shared_params=list(model.trunk.parameters()), task_params=heads)
    if int(os.environ.get("RANK", "0")) == 0:
        write_json(Path(run_dir) / "summary.json", summary)


if __name__ == "__main__":
    _child_main(*sys.argv[1:])
