"""DVC round trip on the smoke configuration: repro -> push -> fresh clone -> pull -> nothing reruns
-> one parameter changes -> only the stages that depend on it rerun; a deleted product is rebuilt.

Runs in a throw-away git repository holding a copy of the working tree whose DVC pipeline is the
smoke configuration's, generated the documented way (`turbotrain dvc-yaml --config
config/config.yaml --config config/smoke.yaml`: dvc.yaml plus the merged params.yaml). The remote is
the repository's default one, `../turbotrain-dvc-remote` next to the checkout, so clones made next
to the project share it with no configuration, as they would on a workstation.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline_helpers import SMOKE_CONFIG, Finished, copy_repo, run_command
from turbotrain.utils.atomic import write_yaml

# The round trip covers the whole smoke DAG (the smoke grid pretrains on the extra dataset too).
DVC_STAGES = ("params", "raw-synthetic_smoke", "cache-synthetic_smoke", "raw-synthetic_b", "cache-synthetic_b",
              "results")
SNAKEMAKE_TARGETS = ("all", "--configfile", "params.yaml")
# A parameter only the final evaluation depends on (not the training curves): DVC reruns `results`,
# in which Snakemake re-evaluates the trained checkpoints without retraining them, and nothing upstream.
CHANGED_SECTION, CHANGED_KEY, NEW_VALUE = "evaluation", "miss_threshold", 3.0
RERUN_STAGE, KEPT_STAGES = "results", DVC_STAGES[1:5]
GIT_IDENTITY = ["-c", "user.name=turbotrain-test", "-c", "user.email=test@turbotrain.invalid"]


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *GIT_IDENTITY, *args], cwd=repo, check=True, capture_output=True,
                          text=True).stdout


def dvc(repo: Path, *args: str) -> Finished:
    done = run_command(["dvc", *args], repo)
    assert done.returncode == 0, done.output[-4000:]
    return done


def install_smoke_pipeline(project: Path) -> None:
    """The DVC pipeline of the smoke configuration, generated as the README documents."""
    done = run_command(["turbotrain", "dvc-yaml", "--config", "config/config.yaml", "--config", SMOKE_CONFIG], project)
    assert done.returncode == 0, done.output


def edit_param(project: Path, section: str, key: str, value) -> None:
    config_path = project / "config" / "config.yaml"
    config = yaml.safe_load(config_path.read_text())
    node = config[section]
    *parents, last = key.split(".")
    for part in parents:
        node = node[part]
    node[last] = value
    write_yaml(config_path, config)


def commit_lock(repo: Path, message: str) -> None:
    """Commit dvc.lock and the .gitignore entries DVC adds for its outputs."""
    new_ignores = [p for p in git(repo, "ls-files", "--others", "--exclude-standard").split() if
                   Path(p).name == ".gitignore"]
    git(repo, "add", "dvc.lock", "params.yaml", *new_ignores)
    git(repo, "commit", "-q", "-m", message)


def out_hashes(repo: Path, stage: str) -> dict[str, str]:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {out["path"]: out["md5"] for out in lock["stages"][stage]["outs"]}


def ran_stages(repro: Finished) -> set[str]:
    return {stage for stage in DVC_STAGES if f"Running stage '{stage}'" in repro.output}


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Path:
    """A project whose smoke data DVC built and pushed to the default remote."""
    project = copy_repo(tmp_path_factory.mktemp("dvc") / "project")
    install_smoke_pipeline(project)
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
    kept_before = {stage: out_hashes(pulled_clone, stage) for stage in KEPT_STAGES}
    rerun_before = out_hashes(pulled_clone, RERUN_STAGE)
    edit_param(pulled_clone, CHANGED_SECTION, CHANGED_KEY, NEW_VALUE)

    status = dvc(pulled_clone, "status", *DVC_STAGES).output
    assert "params:" in status and not any(f"{k}:" in status for k in (*KEPT_STAGES, RERUN_STAGE)), status
    dvc(pulled_clone, "repro", "params")  # the edited config file reaches params.yaml
    status = dvc(pulled_clone, "status", *DVC_STAGES).output
    assert f"{RERUN_STAGE}:" in status and not any(f"{k}:" in status for k in KEPT_STAGES), status
    repro = dvc(pulled_clone, "repro", *DVC_STAGES)
    assert ran_stages(repro) == {RERUN_STAGE}
    # Snakemake, not DVC, picked the jobs: evaluations reran, training and data did not.
    assert "rule evaluate:" in repro.output
    assert not any(f"rule {r}:" in repro.output for r in ("finetune", "pretrain", "fuse", "generate"))
    assert {stage: out_hashes(pulled_clone, stage) for stage in KEPT_STAGES} == kept_before
    rerun_after = out_hashes(pulled_clone, RERUN_STAGE)
    changed = {path for path in rerun_after if rerun_after[path] != rerun_before.get(path)}
    assert any(path.startswith("results/metrics") for path in changed), changed
    assert not any(path.startswith("runs/") for path in changed), changed


@pytest.mark.slow
def test_an_extra_datasets_seed_marks_its_data_and_the_results_as_changed(pulled_clone):
    """Pretraining reads the extra dataset: a new seed for it must rerun `results`, not only its data."""
    edit_param(pulled_clone, "extra_datasets", "synthetic_b.seed", 7)
    dvc(pulled_clone, "repro", "params")
    status = dvc(pulled_clone, "status", *DVC_STAGES).output
    assert all(f"{stage}:" in status for stage in ("raw-synthetic_b", "cache-synthetic_b", "results")), status
    assert not any(f"{stage}:" in status for stage in ("raw-synthetic_smoke", "cache-synthetic_smoke")), status


@pytest.mark.slow
def test_a_deleted_product_is_rebuilt_and_versioned_again(pulled_clone):
    """Snakemake ignores a finished job's deleted input; the rebuild stamps make `dvc repro` (which
    sees the missing output) get it rebuilt, so dvc.lock never records the deletion."""
    victim = next((pulled_clone / "results" / "metrics").rglob("seed0.json"))
    victim.unlink()
    dry = run_command(["snakemake", "-n", "all", "--configfile", "params.yaml"], pulled_clone)
    assert "evaluate" in dry.output and "Nothing to be done" not in dry.output, dry.output[-3000:]
    repro = dvc(pulled_clone, "repro", *DVC_STAGES)
    assert ran_stages(repro) == {RERUN_STAGE} and "rule evaluate:" in repro.output
    assert victim.exists()
    assert "rule finetune:" not in repro.output  # only the deleted product and what reads it
    assert "Data and pipelines are up to date" in dvc(pulled_clone, "status", *DVC_STAGES).output
