"""Helpers for tests that run the Snakemake DAG in a throw-away copy of the repository.

A copy holds what a commit would (tracked files plus untracked, not-ignored ones) and none of the
pipeline's outputs, so every job really runs. Commands run with this interpreter's tools first on
PATH and the copy's ``src`` first on PYTHONPATH: the editable install in the venv points at the
checkout the tests were started from, and the copy must run its own code.

    pipe = Pipeline(copy_repo(tmp_path / "repo"))
    done = pipe.run("data/cache/synthetic_smoke/val")          # snakemake -c1 <target> --configfile config/smoke.yaml
    assert done.returncode == 0, done.output
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil  # a Snakemake dependency, so present wherever these tests can run
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
SMOKE_CONFIG = "config/smoke.yaml"
# Top-level folders that hold pipeline outputs or local state; a copy starts without them.
OUTPUT_DIRS = frozenset({".venv", "data", "runs", "results", "logs", ".snakemake", ".turbotrain"})
# Snakemake's per-job `benchmark:` records go to benchmarks/<rule>/...; the scripts sit in benchmarks/.
BENCHMARK_DIR = "benchmarks"
SNAKEMAKE_TIMEOUT_S = 900


def is_pipeline_output(relative: str) -> bool:
    """Whether a repository-relative path is an output of the pipeline rather than its source."""
    parts = Path(relative).parts
    if not parts or parts[0] in OUTPUT_DIRS:
        return True
    return parts[0] == BENCHMARK_DIR and len(parts) > 2


def source_files(root: Path = REPO_ROOT) -> list[str]:
    """Tracked plus untracked-but-not-ignored files of ``root`` (repository-relative, no outputs)."""
    listing = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                             cwd=root, check=True, capture_output=True).stdout.decode()
    return [rel for rel in listing.split("\0") if rel and not is_pipeline_output(rel)]


def copy_repo(dest: Path, root: Path = REPO_ROOT) -> Path:
    """Copy the source files of ``root`` into ``dest`` (created); returns ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    for rel in source_files(root):
        src = root / rel
        if src.is_file():  # a tracked file deleted in the working tree is not part of the copy
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def pipeline_env(workdir: Path) -> dict[str, str]:
    """Environment for commands run in ``workdir``: venv tools first, the copy's own package, 1 thread."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(workdir / "src"), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    return env


def smoke_merged_config(root: Path = REPO_ROOT) -> dict:
    """config/config.yaml with config/smoke.yaml merged on top, as `--configfile` merges it, validated."""
    from snakemake.utils import update_config

    from turbotrain.config import validate_config

    config = yaml.safe_load((root / "config" / "config.yaml").read_text())
    update_config(config, yaml.safe_load((root / SMOKE_CONFIG).read_text()))
    return validate_config(config)


def write_yaml(path: Path, data: dict) -> Path:
    """Write ``data`` as YAML (an extra ``--configfile`` for one test); returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@dataclass
class Finished:
    """A finished command: exit status and its stdout and stderr interleaved."""

    returncode: int
    output: str


@dataclass
class Pipeline:
    """Snakemake in one repository copy with a fixed list of config files (smoke config by default)."""

    workdir: Path
    configfiles: Sequence[str | Path] = field(default_factory=lambda: [SMOKE_CONFIG])
    cores: int = 1

    def path(self, relative: str | Path) -> Path:
        return self.workdir / relative

    def command(self, targets: Iterable[str], extra: Iterable[str] = ()) -> list[str]:
        # --configfile takes several files, so it comes last, after targets and flags.
        return ["snakemake", f"-c{self.cores}", *targets, *extra,
                "--configfile", *[str(c) for c in self.configfiles]]

    def run(self, *targets: str, extra: Iterable[str] = (), timeout_s: float = SNAKEMAKE_TIMEOUT_S) -> Finished:
        """Run Snakemake to completion (whatever its exit status)."""
        return run_command(self.command(targets, extra), self.workdir, timeout_s)

    def start(self, *targets: str, extra: Iterable[str] = (), log_name: str = "snakemake.out") -> subprocess.Popen:
        """Start Snakemake in its own process group (see :func:`kill_tree`); output goes to ``log_name``."""
        with open(self.workdir / log_name, "w") as out:
            return subprocess.Popen(self.command(targets, extra), cwd=self.workdir, env=pipeline_env(self.workdir),
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def unlock(self) -> Finished:
        """Remove the lock a killed Snakemake leaves behind (what an operator runs before the rerun)."""
        return self.run(extra=["--unlock"])

    def clone(self, dest: Path) -> "Pipeline":
        """A copy of the whole working folder, outputs and Snakemake's records included.

        Modification times are kept, so outputs stay up to date; locks are left behind.
        """
        shutil.copytree(self.workdir, dest, symlinks=True,
                        ignore=lambda folder, _: ["locks"] if Path(folder).name == ".snakemake" else [])
        return Pipeline(dest, list(self.configfiles), self.cores)


def run_command(argv: Sequence[str], workdir: Path, timeout_s: float = SNAKEMAKE_TIMEOUT_S) -> Finished:
    """Run ``argv`` in ``workdir`` with :func:`pipeline_env`; never raises on a non-zero exit."""
    done = subprocess.run(list(argv), cwd=workdir, env=pipeline_env(workdir), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout_s)
    return Finished(done.returncode, done.stdout)


def kill_tree(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Signal ``proc``'s process group and every descendant (some may have left the group), then reap it.

    ``proc`` must have been started with ``start_new_session=True`` so its group holds only its tree.
    """
    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    for child in descendants:
        try:
            child.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=60)
    psutil.wait_procs(descendants, timeout=60)


def wait_until(condition: Callable[[], bool], proc: subprocess.Popen, timeout_s: float,
               poll_s: float = 0.2) -> None:
    """Poll ``condition`` while ``proc`` runs; AssertionError if it exits or times out first."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"process exited (status {proc.returncode}) before the awaited condition")
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        time.sleep(poll_s)
