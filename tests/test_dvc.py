"""DVC round trip on the smoke configuration: repro -> push -> fresh clone -> pull -> nothing reruns
-> one parameter changes -> only the stages that depend on it rerun.

Runs in a throw-away git repository holding a copy of the working tree whose config/config.yaml is
the smoke configuration (DVC reads its params from that file). The remote is the repository's
default one, `../turbotrain-dvc-remote` next to the checkout, so clones made next to the project
share it with no configuration, as they would on a workstation.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml
from snakemake.utils import update_config

from pipeline_helpers import SMOKE_CONFIG, Finished, copy_repo, run_command
from turbotrain.utils.atomic import write_yaml

# The stages and Snakemake targets the round trip covers: the data part of the smoke DAG for now.
# Once the training verbs exist: DVC_STAGES = ("dataset", "cache", "results") and
# SNAKEMAKE_TARGETS = ("all",).
DVC_STAGES = ("dataset", "cache")
SNAKEMAKE_TARGETS = tuple(f"data/cache/synthetic_smoke/{split}" for split in ("train", "val", "test"))
# A parameter only the fusion cache depends on: changing it must rerun `cache` and nothing upstream.
CHANGED_SECTION, CHANGED_KEY = "cache", "sample_stride"
RERUN_STAGE, KEPT_STAGE = "cache", "dataset"
GIT_IDENTITY = ["-c", "user.name=turbotrain-test", "-c", "user.email=test@turbotrain.invalid"]


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *GIT_IDENTITY, *args], cwd=repo, check=True, capture_output=True,
                          text=True).stdout


def dvc(repo: Path, *args: str) -> Finished:
    done = run_command(["dvc", *args], repo)
    assert done.returncode == 0, done.output[-4000:]
    return done


def install_smoke_config(project: Path) -> None:
    """Make the smoke configuration the project's config, merged the way Snakemake merges it."""
    config_path = project / "config" / "config.yaml"
    config = yaml.safe_load(config_path.read_text())
    update_config(config, yaml.safe_load((project / SMOKE_CONFIG).read_text()))
    write_yaml(config_path, config)


def edit_param(project: Path, section: str, key: str) -> None:
    config_path = project / "config" / "config.yaml"
    config = yaml.safe_load(config_path.read_text())
    config[section][key] -= 1
    write_yaml(config_path, config)


def commit_lock(repo: Path, message: str) -> None:
    """Commit dvc.lock and the .gitignore entries DVC adds for its outputs."""
    new_ignores = [p for p in git(repo, "ls-files", "--others", "--exclude-standard").split() if
                   Path(p).name == ".gitignore"]
    git(repo, "add", "dvc.lock", *new_ignores)
    git(repo, "commit", "-q", "-m", message)


def out_hash(repo: Path, stage: str) -> str:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return lock["stages"][stage]["outs"][0]["md5"]


def ran_stages(repro: Finished) -> set[str]:
    return {stage for stage in ("dataset", "cache", "results") if f"Running stage '{stage}'" in repro.output}


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Path:
    """A project whose smoke data DVC built and pushed to the default remote."""
    project = copy_repo(tmp_path_factory.mktemp("dvc") / "project")
    install_smoke_config(project)
    git(project, "init", "-q")
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "smoke project")
    repro = dvc(project, "repro", *DVC_STAGES)
    assert ran_stages(repro) == set(DVC_STAGES)
    commit_lock(project, "dvc repro")
    dvc(project, "push", *DVC_STAGES)
    return project


@pytest.fixture
def pulled_clone(published, request) -> Path:
    """A fresh clone next to the project, with the data pulled and Snakemake's records restored."""
    clone = published.parent / f"clone-{request.node.name}"
    subprocess.run(["git", "clone", "-q", str(published), str(clone)], check=True)
    dvc(clone, "pull", *DVC_STAGES)
    touch = run_command(["snakemake", "--cores", "1", "--touch", "--forceall", *SNAKEMAKE_TARGETS], clone)
    assert touch.returncode == 0, touch.output[-4000:]
    return clone


@pytest.mark.slow
def test_fresh_clone_after_pull_reruns_nothing(pulled_clone):
    assert "Data and pipelines are up to date" in dvc(pulled_clone, "status", *DVC_STAGES).output
    assert ran_stages(dvc(pulled_clone, "repro", *DVC_STAGES)) == set()
    dry_run = run_command(["snakemake", "--cores", "1", "--dry-run", *SNAKEMAKE_TARGETS], pulled_clone)
    assert dry_run.returncode == 0 and "Nothing to be done" in dry_run.output, dry_run.output[-4000:]


@pytest.mark.slow
def test_changed_param_reruns_only_dependent_stages(pulled_clone):
    kept_before, rerun_before = out_hash(pulled_clone, KEPT_STAGE), out_hash(pulled_clone, RERUN_STAGE)
    edit_param(pulled_clone, CHANGED_SECTION, CHANGED_KEY)

    status = dvc(pulled_clone, "status", *DVC_STAGES).output
    assert f"{RERUN_STAGE}:" in status and f"{KEPT_STAGE}:" not in status, status
    repro = dvc(pulled_clone, "repro", *DVC_STAGES)
    assert ran_stages(repro) == {RERUN_STAGE}
    # Snakemake, not DVC, picked the jobs: the fusion jobs reran, the data generation did not.
    assert "rule fuse:" in repro.output and "rule generate:" not in repro.output
    assert out_hash(pulled_clone, KEPT_STAGE) == kept_before
    assert out_hash(pulled_clone, RERUN_STAGE) != rerun_before
