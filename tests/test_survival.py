"""Survival of the pipeline (issue "Orchestration"): what happens when things go wrong mid-DAG.

* a fine-tuning job killed with SIGKILL resumes from its checkpoint when the same Snakemake command
  is rerun, and ends with the weights and metrics of an uninterrupted run;
* a corrupted point cloud fails the fusion job of its split with a message naming the file, while
  ``--keep-going`` still builds the other split;
* a config typo fails before any job, in Snakemake's ``validate`` and in ``turbotrain`` itself.

Every test runs Snakemake with the smoke config in a throw-away copy of the repository; the smoke
raw data and fusion caches are built once per module and cloned into each test's copy.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline_helpers import SMOKE_CONFIG, Pipeline, copy_repo, kill_tree, run_command, wait_until, write_yaml

pytestmark = pytest.mark.slow

DATASET = "synthetic_smoke"  # dataset.name of config/smoke.yaml
CACHE = f"data/cache/{DATASET}"
RAW = f"data/raw/{DATASET}"
SPLITS = ("train", "val", "test")
# The cheapest fine-tuning run: no fusion, no pretraining, one joint stage with a plain loss sum.
RUN_ID = "none/none/joint-sum/lf1/schedule/seed0"
RUN_DIR = f"runs/finetune/{DATASET}/{RUN_ID}"
STAGE_DIR = f"{RUN_DIR}/stages/1-joint"
FINAL = f"{RUN_DIR}/final.pt"
METRICS = f"results/metrics/{DATASET}/{RUN_ID}.json"
FINETUNE_LOG = f"logs/finetune/{DATASET}/{RUN_ID}.log"
MAX_STEPS = 40
# Enough steps that the job is still training when its first checkpoint appears; few curve samples
# keep the per-checkpoint evaluation hook cheap while still exercising it.
RESUMABLE_TRAINING = {"train": {"max_steps": MAX_STEPS, "checkpoint_every": 2}, "finetune": {"joint": {"max_steps": MAX_STEPS}},
                      "evaluation": {"curve_samples": 2}}
STARTUP_TIMEOUT_S = 300
SNAKEMAKE_OUT = "snakemake.out"


@pytest.fixture(scope="module")
def smoke_data(tmp_path_factory) -> Pipeline:
    """A repository copy holding the generated smoke dataset and the fusion cache of every split."""
    pipe = Pipeline(copy_repo(tmp_path_factory.mktemp("survival") / "base"))
    done = pipe.run(*(f"{CACHE}/{split}" for split in SPLITS))
    assert done.returncode == 0, done.output
    return pipe


def training_copy(smoke_data: Pipeline, dest: Path) -> Pipeline:
    """A clone of the smoke data with a longer, often-checkpointed training config on top."""
    pipe = smoke_data.clone(dest)
    write_yaml(pipe.path("survival.yaml"), RESUMABLE_TRAINING)
    pipe.configfiles = [*pipe.configfiles, "survival.yaml"]
    return pipe


def detection_and_prediction(pipe: Pipeline) -> dict:
    """The metric blocks of the run's metrics JSON and its scene bootstrap (the training block holds
    wall-clock times)."""
    metrics = json.loads(pipe.path(METRICS).read_text())
    return {"detection": metrics["detection"], "prediction": metrics["prediction"], "bootstrap": metrics["bootstrap"]}


def loss_log(pipe: Pipeline) -> list[dict[str, str]]:
    """Step and loss columns of the stage's metrics.csv (timings differ between runs, losses must not)."""
    with open(pipe.path(f"{STAGE_DIR}/metrics.csv")) as fh:
        return [{k: v for k, v in row.items() if k == "step" or k.startswith("loss/")} for row in csv.DictReader(fh)]


def training_curve(pipe: Pipeline) -> list[tuple]:
    """(step, AP@0.5, EPA) of each checkpoint's validation score (their wall times differ between runs)."""
    curve = json.loads(pipe.path(METRICS).read_text())["training"]["curve"]
    return [(point["step"], point["ap50"], point["epa"]) for point in curve]


def final_weights(pipe: Pipeline) -> dict[str, torch.Tensor]:
    return torch.load(pipe.path(FINAL), map_location="cpu", weights_only=True)["model"]


def kill_during_training(pipe: Pipeline) -> int:
    """Start the fine-tuning job, SIGKILL Snakemake and the job at its first checkpoint; returns its step."""
    last = pipe.path(f"{STAGE_DIR}/last.pt")
    proc = pipe.start(FINAL, log_name=SNAKEMAKE_OUT)
    try:
        wait_until(last.exists, proc, STARTUP_TIMEOUT_S)
    except AssertionError as err:
        raise AssertionError(f"{err}; Snakemake said:\n{pipe.path(SNAKEMAKE_OUT).read_text()}") from err
    finally:
        kill_tree(proc)
    assert not pipe.path(FINAL).exists(), "the job finished before the kill: raise MAX_STEPS"
    return torch.load(last, map_location="cpu", weights_only=True)["progress"]["step"]


def test_killed_finetune_resumes_to_the_uninterrupted_result(smoke_data, tmp_path):
    killed = training_copy(smoke_data, tmp_path / "killed")
    killed_at = kill_during_training(killed)
    assert 0 < killed_at < MAX_STEPS

    # SIGKILL leaves Snakemake's directory lock behind; removing it is the documented first step.
    assert killed.unlock().returncode == 0
    rerun = killed.run(FINAL)
    assert rerun.returncode == 0, rerun.output
    job_log = killed.path(FINETUNE_LOG).read_text()
    assert f"resumed from step {killed_at}, trained to step {MAX_STEPS}" in job_log, job_log
    evaluated = killed.run(METRICS)
    assert evaluated.returncode == 0, evaluated.output

    uninterrupted = training_copy(smoke_data, tmp_path / "uninterrupted")
    done = uninterrupted.run(METRICS)
    assert done.returncode == 0, done.output
    assert "resumed from step" not in uninterrupted.path(FINETUNE_LOG).read_text()

    resumed_losses = loss_log(killed)
    assert [int(row["step"]) for row in resumed_losses] == list(range(1, MAX_STEPS + 1))
    assert resumed_losses == loss_log(uninterrupted)
    resumed_weights, reference_weights = final_weights(killed), final_weights(uninterrupted)
    assert resumed_weights.keys() == reference_weights.keys()
    unequal = [name for name in reference_weights if not torch.equal(resumed_weights[name], reference_weights[name])]
    assert not unequal, f"weights differ after resuming: {unequal[:5]}"
    assert detection_and_prediction(killed) == detection_and_prediction(uninterrupted)
    # points scored before the kill are kept, not only those of the resumed session
    assert training_curve(killed) == training_curve(uninterrupted)
    assert [step for step, *_ in training_curve(killed)] == list(range(2, MAX_STEPS + 1, 2))


def first_sample_point_cloud(pipe: Pipeline, split: str) -> Path:
    """The raw .pcd of the ego's current frame of the split's first sample: fusion must read it."""
    manifest = json.loads(pipe.path(f"{CACHE}/{split}/manifest.json").read_text())
    _, scenario, agent, timestamp = manifest["sample_ids"][0].split("/")
    return pipe.path(f"{RAW}/{split}/{scenario}/{agent}/{timestamp}.pcd")


def truncate(path: Path) -> None:
    """Cut a file in half, as an interrupted copy or a full disk leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_corrupted_point_cloud_fails_only_its_branch(smoke_data, tmp_path):
    pipe = smoke_data.clone(tmp_path / "corrupted")
    victim = first_sample_point_cloud(pipe, "test")
    truncate(victim)
    for split in ("val", "test"):  # both caches are rebuilt; only the test one reads the bad file
        shutil.rmtree(pipe.path(f"{CACHE}/{split}"))

    done = pipe.run(f"{CACHE}/val", f"{CACHE}/test", extra=["--keep-going"])

    assert done.returncode != 0, done.output
    assert "Error in rule fuse" in done.output and "split=test" in done.output, done.output
    # the error itself (file and field) is on the terminal, not only in the job's log
    assert f"--- last lines of logs/fuse/{DATASET}_test.log ---" in done.output, done.output[-3000:]
    assert str(victim.relative_to(pipe.workdir / RAW)) in done.output, done.output[-3000:]
    fuse_log = pipe.path(f"logs/fuse/{DATASET}_test.log").read_text()
    assert str(victim.relative_to(pipe.workdir / RAW)) in fuse_log, fuse_log
    assert "pcd" in fuse_log.lower(), fuse_log
    assert not pipe.path(f"{CACHE}/test").exists()
    assert pipe.path(f"{CACHE}/val/manifest.json").exists()


TYPO = "voxel_sise"


def test_config_typo_fails_in_validation_before_any_job(tmp_path):
    pipe = Pipeline(copy_repo(tmp_path / "repo"), [SMOKE_CONFIG, "typo.yaml"])
    write_yaml(pipe.path("typo.yaml"), {"grid": {TYPO: [0.4, 0.4, 0.5]}})

    for extra in (["-n"], []):  # a dry run, and a real one that must not start a job either
        done = pipe.run("all", extra=extra)
        assert done.returncode != 0, done.output
        assert "invalid configuration" in done.output and TYPO in done.output, done.output
        assert "allowed keys:" in done.output and "voxel_size" in done.output, done.output
        assert "Job stats" not in done.output, done.output
        assert len(done.output.splitlines()) < 30, done.output  # the key, not a dump of the schema
    assert not any(pipe.path(folder).exists() for folder in ("data", "logs", "runs", "results"))


def test_config_typo_fails_the_cli_naming_the_key(tmp_path):
    workdir = copy_repo(tmp_path / "repo")
    config_text = (workdir / "config/config.yaml").read_text()
    assert "voxel_size:" in config_text
    (workdir / "typo.yaml").write_text(config_text.replace("voxel_size:", f"{TYPO}:"))

    done = run_command(["turbotrain", "fuse", "--config", "typo.yaml", "--raw", RAW, "--split", "val",
                        "--out", CACHE], workdir)

    assert done.returncode == 2, done.output
    assert "invalid configuration" in done.output and "grid: Additional properties" in done.output, done.output
    assert TYPO in done.output, done.output
    assert not (workdir / "data").exists()


def test_a_failure_a_retry_cannot_fix_is_not_retried_and_each_attempt_keeps_its_log(smoke_data, tmp_path):
    """A job-time config error (a trajectory window longer than the cached tracks) with `--retries 2`:
    attempt 1 fails with the error, attempts 2 and 3 end at once naming it, and every log survives."""
    pipe = smoke_data.clone(tmp_path / "retries")
    write_yaml(pipe.path("window.yaml"), {"pretrain": {"variants": {"trajectory": {"trajectory": {"window": 6}}}}})
    pipe.configfiles = [*pipe.configfiles, "window.yaml"]
    target = f"runs/pretrain/{DATASET}/attfuse/trajectory/schedule/pretrained.pt"
    done = pipe.run(target, extra=["--retries", "2"])
    assert done.returncode != 0
    log = pipe.path(f"logs/pretrain/{DATASET}/attfuse/trajectory/schedule.log")
    first = Path(f"{log}.attempt1").read_text()
    assert "trajectory.window" in first, first[-2000:]
    for text in (Path(f"{log}.attempt2").read_text(), log.read_text()):
        assert "not retried" in text and "attempt 1 of this same command failed" in text, text[-2000:]
        assert "Traceback" not in text  # no model was built: the retry ended at once
    assert "trajectory.window" in done.output  # the error on the terminal


def test_a_local_datasets_cache_follows_its_files(smoke_data, tmp_path):
    """`source: local`: a label file fixed by hand or a new scenario folder reruns the fusion job."""
    pipe = smoke_data.clone(tmp_path / "local")
    local = pipe.path("unpacked")
    shutil.copytree(pipe.path(RAW), local)
    write_yaml(pipe.path("local.yaml"), {"dataset": {"name": "mylocal", "source": "local", "local_path": str(local)},
                                         "extra_datasets": {}, "experiments": {"groups": []}})
    pipe.configfiles = [*pipe.configfiles, "local.yaml"]
    target = "data/cache/mylocal/val"
    assert pipe.run(target).returncode == 0
    assert "Nothing to be done" in pipe.run(target, extra=["-n"]).output

    label = next(local.glob("val/*/*/*.yaml"))
    label.write_text(label.read_text() + "\n")  # a hand edit deep inside the folder
    assert "fuse" in pipe.run(target, extra=["-n"]).output.split("Job stats:")[-1]
    assert pipe.run(target).returncode == 0
    shutil.copytree(next(local.glob("val/*")), local / "val" / "added_scenario")
    assert "fuse" in pipe.run(target, extra=["-n"]).output.split("Job stats:")[-1]


def test_the_slurm_profile_without_slurm_says_so(smoke_data, tmp_path):
    """`snakemake --profile slurm` where no SLURM client is installed: one clear line, no job."""
    pipe = smoke_data.clone(tmp_path / "noslurm")
    tools = pipe.path("tools")
    tools.mkdir()
    for tool in ("bash", "sh", "env", "cat", "which", "git", "python3", "uname"):  # what snakemake itself runs
        found = shutil.which(tool)
        if found:
            (tools / tool).symlink_to(found)
    env_path = f"{Path(sys.executable).parent}{os.pathsep}{tools}"
    logs_before = sorted(pipe.path("logs").rglob("*"))  # the clone carries the smoke data's logs
    done = subprocess.run(["snakemake", "--profile", "slurm", "all", "--configfile", SMOKE_CONFIG],
                          cwd=pipe.workdir, env={**os.environ, "PATH": env_path, "PYTHONPATH": str(pipe.path("src"))},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert "SLURM not found: sbatch" in done.stdout + done.stderr, (done.stdout + done.stderr)[-3000:]
    assert sorted(pipe.path("logs").rglob("*")) == logs_before  # no job started
