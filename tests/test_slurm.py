"""The `slurm` Snakemake profile: its content, and a real run through a local single-node SLURM."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline_helpers import REPO_ROOT, SMOKE_CONFIG, copy_repo, run_command
from slurm_cluster import SlurmUnavailable, local_slurm

# What the cluster run builds (the smoke config keeps every job CPU-only and seconds long):
# one table's subgraph: every rule kind that is submitted (data on the cpu partition, pretraining,
# fine-tuning and evaluation on gpu, the table itself) without the figures and the second dataset.
SLURM_TARGETS = ("results/tables/main.csv",)
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


def planned_jobs(project: Path) -> int:
    """How many jobs a fresh build of SLURM_TARGETS plans under the smoke config (its dry-run summary)."""
    dry = run_command(["snakemake", "-n", *SLURM_TARGETS, "--forceall", "--configfile", SMOKE_CONFIG], project)
    return int(re.search(r"^total\s+(\d+)", dry.output, re.MULTILINE).group(1))


@pytest.mark.slow
def test_smoke_targets_run_as_slurm_batch_jobs(cluster, tmp_path):
    project = copy_repo(tmp_path / "project")
    # --configfile takes several files, so it comes last.
    done = run_command(["snakemake", *SLURM_TARGETS, "--profile", "slurm", "--profile", TEST_PROFILE,
                        "--configfile", SMOKE_CONFIG], project, timeout_s=600)
    output = done.output
    assert done.returncode == 0, output[-4000:]
    assert (project / "results" / "tables" / "main.csv").exists()

    job_ids = submitted_slurm_ids(output)
    # the targets are files, not the local rule `all`, so every planned job went through sbatch
    assert len(job_ids) == planned_jobs(project), output[-4000:]
    assert set(job_ids) <= cluster.submitted_batch_job_ids()
    partitions = set()
    for job_id in job_ids:
        record = scontrol_job(job_id)
        assert "JobState=COMPLETED" in record
        partitions.add(re.search(r"Partition=(\S+)", record).group(1))
        assert not re.search(r"gres[/:]gpu", record)  # resources.use_gpu: false turns GPU requests off
    assert partitions == {"cpu", "gpu"}  # the profile routes training and evaluation jobs
    assert len(list((project / ".snakemake" / "slurm_logs").rglob("*.log"))) == len(job_ids)
