"""A pipeline job's log: everything the process prints goes to its log file, and a failure also shows
its last lines on the terminal; each attempt of a retried job keeps its own log, and a retry of a
failure that cannot succeed on retry stops at once.

Rules call ``turbotrain <verb> ... --log {log} --attempt {resources.attempt}`` instead of redirecting
with ``> {log} 2>&1``: the redirection happens here, on the file descriptors (so C extensions,
tqdm and child processes land in the log too), and the failure summary is printed once the
original output is restored, which Snakemake shows on the terminal
(local runs) or in the SLURM log.

Why retries are filtered here: Snakemake retries a failed job whatever the failure. Preemption and
node failures are requeued by SLURM itself; an OOM kill can succeed with the memory a retry asks for.
A config error, bad input data or a NaN loss fails the same way every time, so a retry of the same
command after such a failure ends at once, naming the first attempt's log.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Iterator

TAIL_LINES = 25
FAILURE_SUFFIX = ".failure.json"


def rank_log(path: str | os.PathLike) -> Path:
    """The log of this process: ``path`` for rank 0 (or no torchrun), ``<path>.rank<r>`` for the others."""
    rank = int(os.environ.get("RANK", "0") or 0)
    return Path(path) if rank == 0 else Path(f"{path}.rank{rank}")


def attempt_log(path: Path, attempt: int) -> Path:
    return Path(f"{path}.attempt{attempt}")


def prepare_attempt(path: Path, attempt: int) -> None:
    """Attempt 1 of a job starts clean: earlier invocations' attempt logs and failure record go."""
    if attempt <= 1:
        for old in path.parent.glob(f"{path.name}.attempt*"):
            old.unlink()
        Path(f"{path}{FAILURE_SUFFIX}").unlink(missing_ok=True)


def keep_attempt_log(path: Path, attempt: int) -> None:
    """A failed attempt's log is also kept as ``<log>.attempt<k>`` (Snakemake removes the job's log
    before it retries)."""
    shutil.copyfile(path, attempt_log(path, attempt))


def earlier_deterministic_failure(path: Path, attempt: int, command: list[str]) -> dict | None:
    """The record of a deterministic failure of this same command in an earlier attempt, if any."""
    record = Path(f"{path}{FAILURE_SUFFIX}")
    if attempt <= 1 or not record.exists():
        return None
    failure = json.loads(record.read_text())
    return failure if failure.get("command") == command else None


def record_failure(path: Path, attempt: int, command: list[str], deterministic: bool, message: str) -> None:
    record = Path(f"{path}{FAILURE_SUFFIX}")
    if deterministic:
        record.write_text(json.dumps({"command": command, "attempt": attempt, "error": message,
                                      "log": str(attempt_log(path, attempt))}, indent=2))
    else:
        record.unlink(missing_ok=True)


def tail(path: Path, lines: int = TAIL_LINES) -> str:
    with open(path, errors="replace") as fh:
        return "".join(fh.readlines()[-lines:])


@contextlib.contextmanager
def redirected(path: Path) -> Iterator[None]:
    """Point stdout and stderr (file descriptors 1 and 2) at ``path`` until the block ends."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        os.close(saved_out)
        os.close(saved_err)
