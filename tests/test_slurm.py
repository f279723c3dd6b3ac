"""The `slurm` Snakemake profile: its content, and a real run through a local single-node SLURM."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline_helpers import REPO_ROOT, SMOKE_CONFIG, copy_repo, run_command
from slurm_cluster import SlurmUnavailable, local_slurm

# What the cluster run builds. The data part of the smoke DAG for now; switch to ("all",) once the
# training verbs exist (the smoke config keeps every job CPU-only and seconds long).
SLURM_TARGETS = (
    "data/cache/synthetic_smoke/val",
    "results/figures/synthetic_smoke_sample_bev.png",
)
PROFILE = REPO_ROOT / "slurm" / "config.yaml"
TEST_PROFILE = "tests/profiles/slurm-local"
# Flags that only make sense on the throw-away test cluster.
LOCAL_ONLY_KEYS = {"slurm-no-account", "slurm-status-command", "slurm-init-seconds-before-status-checks"}
GPU_RULES = ("pretrain", "finetune", "evaluate")


def load_profile(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_profile_submits_through_slurm_with_requeue():
    profile = load_profile(PROFILE)
    assert profile["executor"] == "slurm"
    assert profile["slurm-requeue"] is True
    assert profile["retries"] >= 1
    assert {"slurm_partition", "runtime", "mem_mb"} <= set(profile["default-resources"])


def test_profile_routes_gpu_rules_to_the_gpu_partition():
    profile = load_profile(PROFILE)
    default_partition = profile["default-resources"]["slurm_partition"]
    gpu_partitions = {profile["set-resources"][rule]["slurm_partition"] for rule in GPU_RULES}
    assert len(gpu_partitions) == 1 and default_partition not in gpu_partitions


def test_profile_carries_no_local_test_flags():
    assert not LOCAL_ONLY_KEYS & set(load_profile(PROFILE))
    assert LOCAL_ONLY_KEYS <= set(load_profile(REPO_ROOT / TEST_PROFILE / "config.yaml"))


def submitted_slurm_ids(snakemake_output: str) -> list[str]:
    """The SLURM job ids Snakemake reports for its submissions."""
    return re.findall(r"has been submitted with SLURM jobid (\d+)", snakemake_output)


def scontrol_job(job_id: str) -> str:
    return subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    try:
        with local_slurm(tmp_path_factory.mktemp("slurm")) as running:
            yield running
    except SlurmUnavailable as exc:
        pytest.skip(f"no local SLURM cluster: {exc}")


@pytest.mark.slow
def test_smoke_targets_run_as_slurm_batch_jobs(cluster, tmp_path):
    project = copy_repo(tmp_path / "project")
    # --configfile takes several files, so it comes last.
    done = run_command(["snakemake", *SLURM_TARGETS, "--profile", "slurm", "--profile", TEST_PROFILE,
                        "--configfile", SMOKE_CONFIG], project, timeout_s=600)
    output = done.output
    assert done.returncode == 0, output[-4000:]
    assert all((project / target).exists() for target in SLURM_TARGETS)

    job_ids = submitted_slurm_ids(output)
    assert len(job_ids) == 3, output[-4000:]  # generate, fuse(val), show_sample
    assert set(job_ids) <= cluster.submitted_batch_job_ids()
    for job_id in job_ids:
        record = scontrol_job(job_id)
        assert "JobState=COMPLETED" in record
        assert "Partition=cpu" in record
        assert not re.search(r"gres[/:]gpu", record)  # data jobs request no GPU
    assert len(list((project / ".snakemake" / "slurm_logs").rglob("*.log"))) == len(job_ids)
