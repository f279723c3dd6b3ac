"""Fixture code for tests/test_slurm.py: a real single-node SLURM cluster on this host.

The cluster is Debian's slurm 22.05 + munge, started without systemd (CI containers have none):
munged, slurmctld and slurmd run as daemons whose pid files, sockets, state and logs all live in
one temporary folder, and only those processes are stopped at the end. The one file outside it is
``/etc/slurm/slurm.conf``: Snakemake's job-step plugin drops ``SLURM_CONF``, so the job steps only
find a config at the default path. An existing one is put back afterwards.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from turbotrain.utils.atomic import atomic_open, write_text

SLURM_CONF = Path("/etc/slurm/slurm.conf")
DEBIAN_PACKAGES = ("slurmctld", "slurmd", "munge", "slurm-client")
# The programs the cluster and the Snakemake plugin call.
REQUIRED_PROGRAMS = ("munged", "munge", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scontrol", "srun")
# Partitions named as in slurm/config.yaml, both on the one node, so the profile's routing of
# training jobs to `gpu` and everything else to `cpu` is exercised unchanged.
PARTITIONS = ("cpu", "gpu")


class SlurmUnavailable(RuntimeError):
    """SLURM cannot be installed here (no root, no apt, no network): the test skips with this reason."""


class ClusterStartError(RuntimeError):
    """SLURM is installed but the cluster did not come up: a real failure, never a skip."""


# --- installation ----------------------------------------------------------------------------------


def missing_programs() -> list[str]:
    return [p for p in REQUIRED_PROGRAMS if shutil.which(p) is None]


def ensure_installed() -> None:
    """Install Debian's slurm + munge if any program is missing; SlurmUnavailable if apt cannot."""
    if not missing_programs():
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise SlurmUnavailable(f"SLURM programs {missing_programs()} missing and no root apt-get to install them")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", *DEBIAN_PACKAGES]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise SlurmUnavailable(f"`{' '.join(cmd)}` failed (no network?): {done.stderr.strip()[-500:]}")
    if missing_programs():
        raise SlurmUnavailable(f"installed {DEBIAN_PACKAGES} but {missing_programs()} are still missing")


# --- configuration ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterPaths:
    """Everything the daemons write, under one temporary folder."""

    root: Path

    @property
    def munge_key(self) -> Path:
        return self.root / "munge.key"

    @property
    def munge_socket(self) -> Path:
        return self.root / "munge.socket"

    def pid_file(self, daemon: str) -> Path:
        return self.root / f"{daemon}.pid"

    def log_file(self, daemon: str) -> Path:
        return self.root / f"{daemon}.log"


def free_port() -> int:
    """A TCP port nothing listens on now, so the test cluster never collides with a real one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_definition() -> str:
    """This host's NodeName line as slurmd measures it (real CPU layout and memory)."""
    measured = subprocess.run(["slurmd", "-C"], check=True, capture_output=True, text=True).stdout
    line = next(ln for ln in measured.splitlines() if ln.startswith("NodeName="))
    # slurmd finds its own entry by hostname; the address avoids relying on DNS inside containers.
    return f"{line} NodeAddr=127.0.0.1 State=UNKNOWN"


def slurm_conf(paths: ClusterPaths, node_line: str, ctld_port: int, slurmd_port: int) -> str:
    """A single-node slurm.conf: cons_tres, no accounting, no cgroups (containers lack them)."""
    host = socket.gethostname().split(".")[0]
    lines = [
        "ClusterName=turbotrain-test",
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={ctld_port}",
        f"SlurmdPort={slurmd_port}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={paths.munge_socket}",
        f"StateSaveLocation={paths.root / 'state'}",
        f"SlurmdSpoolDir={paths.root / 'spool'}",
        f"SlurmctldPidFile={paths.pid_file('slurmctld')}",
        f"SlurmdPidFile={paths.pid_file('slurmd')}",
        f"SlurmctldLogFile={paths.log_file('slurmctld')}",
        f"SlurmdLogFile={paths.log_file('slurmd')}",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SwitchType=switch/none",
        "MpiDefault=none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none",
        "SchedulerType=sched/backfill",
        "SelectType=select/cons_tres",
        # CPU (not core) granularity: on a 2-thread CI box two 1-CPU jobs can then run side by side.
        "SelectTypeParameters=CR_CPU_Memory",
        "ReturnToService=2",
        # Finished jobs stay visible to squeue/scontrol this long: the plugin polls squeue (no sacct here)
        # and the test reads every job back after a run that takes more than 5 minutes on CI.
        "MinJobAge=7200",
        node_line,
        *(f"PartitionName={p} Nodes=ALL Default={'YES' if i == 0 else 'NO'} MaxTime=INFINITE State=UP"
          for i, p in enumerate(PARTITIONS)),
    ]
    return "\n".join(lines) + "\n"


@contextmanager
def installed_config(text: str) -> Iterator[Path]:
    """Write /etc/slurm/slurm.conf for the duration, putting back whatever was there before."""
    previous = SLURM_CONF.read_bytes() if SLURM_CONF.exists() else None
    previous_mode = SLURM_CONF.stat().st_mode if previous is not None else None
    write_text(SLURM_CONF, text)
    SLURM_CONF.chmod(0o644)  # every SLURM client (sbatch, squeue, the job steps) reads it
    try:
        yield SLURM_CONF
    finally:
        if previous is None:
            SLURM_CONF.unlink(missing_ok=True)
        else:
            with atomic_open(SLURM_CONF, "wb") as fh:
                fh.write(previous)
            SLURM_CONF.chmod(previous_mode)


# --- daemons -----------------------------------------------------------------------------------------


def create_munge_key(path: Path) -> None:
    """A fresh 1 KiB random key, readable only by its owner (munged refuses anything looser)."""
    with atomic_open(path, "wb") as fh:
        fh.write(os.urandom(1024))
    path.chmod(0o600)


def start_daemon(argv: list[str], pid_file: Path, timeout_s: float = 30.0) -> int:
    """Run a self-daemonising program and return the daemon's pid (read from its pid file)."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise ClusterStartError(f"`{' '.join(argv)}` failed: {done.stderr.strip()[-500:]}")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = pid_file.read_text().strip() if pid_file.exists() else ""
        if text.isdigit():
            return int(text)
        time.sleep(0.2)
    raise ClusterStartError(f"{argv[0]} started but wrote no pid to {pid_file}")


def stop_daemon(pid: int, timeout_s: float = 15.0) -> None:
    """SIGTERM one daemon we started, SIGKILL if it outlives the timeout."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)


def wait_until_idle(timeout_s: float = 90.0) -> None:
    """Block until sinfo reports the node idle in every partition."""
    deadline = time.monotonic() + timeout_s
    states = ""
    while time.monotonic() < deadline:
        done = subprocess.run(["sinfo", "--noheader", "--format=%P %T"], capture_output=True, text=True)
        states = done.stdout.strip()
        rows = [ln.split() for ln in states.splitlines()]
        if len(rows) >= len(PARTITIONS) and all(state == "idle" for _, state in rows):
            return
        time.sleep(1.0)
    raise ClusterStartError(f"the node never became idle (sinfo: {states!r})")


@dataclass
class LocalSlurm:
    """A running single-node cluster: where its logs are, and how to read what it scheduled."""

    paths: ClusterPaths

    def controller_log(self) -> str:
        return self.paths.log_file("slurmctld").read_text(errors="replace")

    def submitted_batch_job_ids(self) -> set[str]:
        """Ids slurmctld accepted through sbatch (its log line for every batch submission)."""
        return set(re.findall(r"_slurm_rpc_submit_batch_job: JobId=(\d+)", self.controller_log()))


@contextmanager
def local_slurm(workdir: Path) -> Iterator[LocalSlurm]:
    """Install (once), configure and start munged + slurmctld + slurmd; stop exactly those after."""
    if os.geteuid() != 0:
        raise SlurmUnavailable("starting slurmd/slurmctld and writing /etc/slurm/slurm.conf need root")
    ensure_installed()
    paths = ClusterPaths(workdir)
    for sub in ("state", "spool"):
        (paths.root / sub).mkdir(parents=True, exist_ok=True)
    create_munge_key(paths.munge_key)
    conf = slurm_conf(paths, node_definition(), free_port(), free_port())
    started: list[int] = []
    with installed_config(conf):
        try:
            started.append(start_daemon(
                ["munged", "--force", f"--key-file={paths.munge_key}", f"--socket={paths.munge_socket}",
                 f"--pid-file={paths.pid_file('munged')}", f"--log-file={paths.log_file('munged')}",
                 f"--seed-file={paths.root / 'munge.seed'}"],
                paths.pid_file("munged")))
            # -c: start from an empty job table, whatever a previous run left in the state folder.
            started.append(start_daemon(["slurmctld", "-c"], paths.pid_file("slurmctld")))
            started.append(start_daemon(["slurmd"], paths.pid_file("slurmd")))
            wait_until_idle()
            yield LocalSlurm(paths)
        finally:
            # Reverse order: slurmd and slurmctld still need munge while they shut down.
            for pid in reversed(started):
                stop_daemon(pid)
