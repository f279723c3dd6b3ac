"""A download killed inside the pipeline resumes where it stopped (issue 13, item 1).

Snakemake deletes the outputs of a failed job, so the partial transfer must live outside the
``download`` rule's ``directory()`` output. The test serves an archive slowly from 127.0.0.1 (with
HTTP Range support), runs ``snakemake data/raw/<name>``, SIGKILLs the ``turbotrain download``
process once bytes reached the disk, reruns Snakemake and reads the server's requests: the second
transfer must ask for the rest (``Range: bytes=N-``, N > 0), not start over.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import signal
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import psutil
import pytest

from pipeline_helpers import Pipeline, copy_repo, kill_tree, wait_until, write_yaml

pytestmark = pytest.mark.slow

DATASET = "synthetic_smoke"  # dataset.name of config/smoke.yaml, here with `source: download`
RAW = f"data/raw/{DATASET}"
ARCHIVE = "scenes.tar"
MEMBER = "train/scene_a/1/000001.bin"
ARCHIVE_BYTES = 4 << 20  # four of the downloader's 1 MiB reads, so a kill after the first leaves a partial
SEND_CHUNK = 64 << 10
SLOW_DELAY_S = 0.1  # ~640 KB/s: several seconds for the whole archive
STARTUP_TIMEOUT_S = 300
SHELLS = {"bash", "sh", "dash", "zsh"}


class ThrottledRangeHandler(BaseHTTPRequestHandler):
    """Serves ``server.body`` at ``server.path`` in small, delayed chunks; honours ``Range: bytes=N-``."""

    def do_GET(self):  # noqa: N802 (http.server's naming)
        server = self.server
        server.requests.append(self.headers.get("Range"))
        if self.path != server.path:
            self.send_error(404)
            return
        body = server.body
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        start = int(match.group(1)) if match else 0
        if match:
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        try:
            for offset in range(start, len(body), SEND_CHUNK):
                self.wfile.write(body[offset : offset + SEND_CHUNK])
                self.wfile.flush()
                time.sleep(server.delay_s)
        except (BrokenPipeError, ConnectionResetError):  # the client was killed
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def slow_server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), ThrottledRangeHandler)
    httpd.daemon_threads = True
    member = np.random.default_rng(5).integers(0, 256, size=ARCHIVE_BYTES, dtype=np.uint8).tobytes()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo(MEMBER)
        info.size = len(member)
        tar.addfile(info, io.BytesIO(member))
    httpd.body, httpd.member, httpd.path = buffer.getvalue(), member, f"/{ARCHIVE}"
    httpd.requests, httpd.delay_s = [], SLOW_DELAY_S
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/{ARCHIVE}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def partial_bytes_on_disk(workdir: Path) -> int:
    """Bytes of every ``*.partial`` file under data/raw (wherever the downloader keeps them)."""
    return sum(p.stat().st_size for p in (workdir / "data" / "raw").rglob("*.partial") if p.is_file())


def download_processes(snakemake: psutil.Process) -> list[psutil.Process]:
    """The ``turbotrain download`` processes Snakemake started (not the shell wrapping them)."""
    found = []
    for child in snakemake.children(recursive=True):
        try:
            words = child.cmdline()
            if child.name() not in SHELLS and "download" in words and any("turbotrain" in w for w in words):
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


def range_offset(header: str) -> int:
    match = re.fullmatch(r"bytes=(\d+)-", header)
    assert match, header
    return int(match.group(1))


def test_killed_download_resumes_through_the_pipeline(slow_server, tmp_path):
    pipe = Pipeline(copy_repo(tmp_path / "repo"))
    sha256 = hashlib.sha256(slow_server.body).hexdigest()
    write_yaml(pipe.path("download.yaml"), {"dataset": {"source": "download",
                                                        "urls": [{"url": slow_server.url, "sha256": sha256}]}})
    pipe.configfiles = [*pipe.configfiles, "download.yaml"]

    proc = pipe.start(RAW)
    try:
        wait_until(lambda: partial_bytes_on_disk(pipe.workdir) > 0, proc, STARTUP_TIMEOUT_S, poll_s=0.05)
        (downloader,) = download_processes(psutil.Process(proc.pid))
        os.kill(downloader.pid, signal.SIGKILL)
        slow_server.delay_s = 0.0  # the rerun need not wait
        assert proc.wait(timeout=120) != 0, pipe.path("snakemake.out").read_text()
    finally:
        kill_tree(proc)
    kept = partial_bytes_on_disk(pipe.workdir)

    rerun = pipe.run(RAW)
    assert rerun.returncode == 0, rerun.output
    first, *resumed = slow_server.requests
    assert first is None and resumed, slow_server.requests
    assert all(r is not None and range_offset(r) > 0 for r in resumed), \
        f"the rerun started over: requests {slow_server.requests}, {kept} bytes kept after the kill"
    assert 0 < range_offset(resumed[0]) == kept < len(slow_server.body)
    assert pipe.path(f"{RAW}/{MEMBER}").read_bytes() == slow_server.member
    assert f'"sha256": "{sha256}"' in pipe.path(f"{RAW}/.{ARCHIVE}.complete").read_text()
    assert partial_bytes_on_disk(pipe.workdir) == 0
