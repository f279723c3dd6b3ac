"""Downloader against a real HTTP server on 127.0.0.1: checksums, resume, extraction, local sources."""
from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import shutil
import tarfile
import threading
import urllib.error
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import yaml

from turbotrain.cli import main
from turbotrain.config import load_config
from turbotrain.data.download import IncompleteTransfer, check_downloaded, download, download_all, staging_dir
from turbotrain.data.pins import pins_path
from turbotrain.stages.data import fuse
from turbotrain.utils.errors import ConfigError, DataError

REPO_ROOT = Path(__file__).resolve().parents[1]


class RangeHandler(BaseHTTPRequestHandler):
    """Serves ``server.files``; honours ``Range: bytes=N-`` and can cut a response short once."""

    def do_GET(self):  # noqa: N802 (http.server's naming)
        server = self.server
        server.requests.append(self.headers.get("Range"))
        body = server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = self._range_start() if server.honour_range else None
        if start is None:
            self.send_response(200)
            start = 0
        else:
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        cut = server.cut_after.pop(0) if server.cut_after else None
        # Announcing the full length and then closing early is what a dropped connection looks like.
        self.wfile.write(body[start:] if cut is None else body[start : start + cut])

    def _range_start(self) -> int | None:
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        return int(match.group(1)) if match else None

    def log_message(self, *args):  # keep test output quiet
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    httpd.files, httpd.requests, httpd.cut_after, httpd.honour_range = {}, [], [], True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def payload(size: int = 50_000, seed: int = 3) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size=size, dtype=np.uint8).tobytes()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def everything_in(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def tar_gz(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


SCENE = {"train/scene_a/1/000001.yaml": b"lidar_pose: [0, 0, 0, 0, 0, 0]\n", "train/scene_a/1/000001.pcd": b"pcd"}


# ----------------------------------------------------------------------------- plain files


def test_http_download_verifies_marks_and_skips_rerun(server, tmp_path):
    data = payload()
    server.files["/blob.bin"] = data
    out = download(f"{server.url}/blob.bin", tmp_path, sha256=sha(data), progress=False)
    assert out == tmp_path / "blob.bin" and out.read_bytes() == data
    assert everything_in(tmp_path) == [".blob.bin.complete", "blob.bin"]
    assert download(f"{server.url}/blob.bin", tmp_path, sha256=sha(data), progress=False) == out
    assert server.requests == [None]  # the rerun never contacted the server


def test_checksum_mismatch_leaves_nothing(server, tmp_path):
    server.files["/blob.bin"] = payload()
    wrong = "0" * 64
    with pytest.raises(DataError) as info:
        download(f"{server.url}/blob.bin", tmp_path / "dest", sha256=wrong, progress=False)
    assert info.value.field == "sha256" and info.value.expected == wrong
    assert info.value.got == sha(payload())
    assert everything_in(tmp_path / "dest") == []


def test_dropped_connection_is_resumed_with_range(server, tmp_path):
    data = payload()
    server.files["/blob.bin"] = data
    server.cut_after = [12_345]
    out = download(f"{server.url}/blob.bin", tmp_path, sha256=sha(data), progress=False)
    assert server.requests == [None, "bytes=12345-"]
    assert sha(out.read_bytes()) == sha(data)


def test_interrupted_run_leaves_partial_and_next_run_resumes(server, tmp_path):
    data = payload()
    server.files["/blob.bin"] = data
    server.cut_after = [20_000]
    dest = tmp_path / "raw" / "blobs"
    with pytest.raises(IncompleteTransfer):
        download(f"{server.url}/blob.bin", dest, sha256=sha(data), retries=0, progress=False)
    # The partial lives beside the output folder, which Snakemake deletes when the job fails.
    assert staging_dir(dest) == tmp_path / "raw" / ".blobs.download"
    assert everything_in(tmp_path / "raw") == [".blobs.download", ".blobs.download/blob.bin.partial", "blobs"]
    shutil.rmtree(dest)
    out = download(f"{server.url}/blob.bin", dest, sha256=sha(data), progress=True)
    assert server.requests == [None, "bytes=20000-"]
    assert out.read_bytes() == data
    assert everything_in(tmp_path / "raw") == ["blobs", "blobs/.blob.bin.complete", "blobs/blob.bin"]


def test_server_ignoring_range_restarts_the_partial(server, tmp_path):
    data = payload()
    server.files["/blob.bin"] = data
    server.honour_range = False
    server.cut_after = [7_000]
    out = download(f"{server.url}/blob.bin", tmp_path, sha256=sha(data), progress=False)
    assert server.requests == [None, "bytes=7000-"]  # asked to resume, got a full 200 answer
    assert out.read_bytes() == data


def test_http_error_is_not_retried(server, tmp_path):
    with pytest.raises(urllib.error.HTTPError):
        download(f"{server.url}/absent.tar", tmp_path, progress=False, retries=3)
    assert server.requests == [None]
    assert everything_in(tmp_path) == []


@pytest.mark.parametrize("name", ["../up.bin", "a/b.bin", ".."])
def test_unsafe_names_are_refused(tmp_path, name):
    with pytest.raises(ConfigError):
        download("http://127.0.0.1:9/x.bin", tmp_path, name=name, progress=False)


# ----------------------------------------------------------------------------- archives


def test_tar_gz_is_extracted_in_place_of_the_archive(server, tmp_path):
    archive = tar_gz(SCENE)
    server.files["/v2xpnp_train.tar.gz"] = archive
    out = download(f"{server.url}/v2xpnp_train.tar.gz", tmp_path, sha256=sha(archive), progress=False)
    assert out == tmp_path / "v2xpnp_train"
    assert (out / "train/scene_a/1/000001.pcd").read_bytes() == b"pcd"
    assert everything_in(tmp_path) == [".v2xpnp_train.tar.gz.complete", "v2xpnp_train", *(
        f"v2xpnp_train/{p}" for p in ["train", "train/scene_a", "train/scene_a/1",
                                      "train/scene_a/1/000001.pcd", "train/scene_a/1/000001.yaml"])]


def test_zip_is_extracted_and_archive_kept_on_request(server, tmp_path):
    archive = zip_bytes(SCENE)
    server.files["/map.zip"] = archive
    out = download(f"{server.url}/map.zip", tmp_path, sha256=sha(archive), progress=False, keep_archive=True)
    assert (out / "train/scene_a/1/000001.yaml").read_bytes() == SCENE["train/scene_a/1/000001.yaml"]
    assert (tmp_path / "map.zip").read_bytes() == archive


def test_extract_false_keeps_the_archive_file(server, tmp_path):
    archive = tar_gz(SCENE)
    server.files["/a.tar.gz"] = archive
    out = download(f"{server.url}/a.tar.gz", tmp_path / "raw", sha256=sha(archive), extract=False, progress=False)
    assert out == tmp_path / "raw" / "a.tar.gz" and out.read_bytes() == archive


@pytest.mark.parametrize("make_archive, name", [(tar_gz, "evil.tar.gz"), (zip_bytes, "evil.zip")])
def test_path_traversal_is_rejected(server, tmp_path, make_archive, name):
    archive = make_archive({"ok.txt": b"fine", "../escaped.txt": b"gotcha"})
    server.files[f"/{name}"] = archive
    dest = tmp_path / "dest"
    with pytest.raises(DataError, match="member path"):
        download(f"{server.url}/{name}", dest, sha256=sha(archive), progress=False)
    assert not (tmp_path / "escaped.txt").exists()
    assert everything_in(dest) == []  # no extraction, no marker
    assert everything_in(staging_dir(dest)) == [name]  # the verified download is kept for a rerun


# ----------------------------------------------------------------------------- local sources


def test_file_url_and_plain_path(tmp_path):
    source = tmp_path / "src" / "scene.tar.gz"
    source.parent.mkdir()
    source.write_bytes(tar_gz(SCENE))
    by_url = download(source.as_uri(), tmp_path / "a", sha256=sha(source.read_bytes()), progress=False)
    by_path = download(str(source), tmp_path / "b", sha256=sha(source.read_bytes()), progress=False)
    for out in (by_url, by_path):
        assert (out / "train/scene_a/1/000001.pcd").read_bytes() == b"pcd"
    assert source.exists()  # the source itself is never moved or deleted


def test_local_directory_is_used_in_place(tmp_path):
    (tmp_path / "dataset" / "train").mkdir(parents=True)
    out = download(tmp_path / "dataset", tmp_path / "dest", progress=False)
    assert out == (tmp_path / "dataset").resolve()
    assert not (tmp_path / "dest").exists()


def test_download_all_mixes_sources(server, tmp_path):
    data = payload(size=1000)
    server.files["/x"] = data
    (tmp_path / "local").mkdir()
    outputs = download_all(
        [{"url": f"{server.url}/x", "sha256": sha(data), "name": "x.bin"}, {"path": str(tmp_path / "local")}],
        tmp_path / "dest", progress=False,
    )
    assert outputs == [tmp_path / "dest" / "x.bin", (tmp_path / "local").resolve()]
    assert outputs[0].read_bytes() == data


def test_download_all_merges_split_archives_into_one_root(server, tmp_path):
    part1 = tar_gz({"train/scene_a/1/000001.pcd": b"a", "README": b"v1"})
    part2 = zip_bytes({"train/scene_b/-1/000001.pcd": b"b", "README": b"v2"})
    server.files.update({"/train_p1.tar.gz": part1, "/train_p2.zip": part2})
    entries = [{"url": f"{server.url}/train_p1.tar.gz", "sha256": sha(part1)}, {"url": f"{server.url}/train_p2.zip"}]
    dest = tmp_path / "raw"
    assert download_all(entries, dest, progress=False) == [dest, dest]
    assert (dest / "train/scene_a/1/000001.pcd").read_bytes() == b"a"
    assert (dest / "train/scene_b/-1/000001.pcd").read_bytes() == b"b"
    assert (dest / "README").read_bytes() == b"v2"  # a file both hold: the later archive wins
    hidden = [p for p in everything_in(dest) if p.startswith(".")]
    assert hidden == [".train_p1.tar.gz.complete", ".train_p2.zip.complete"]  # no staging left behind
    visible = [p for p in everything_in(dest) if not p.startswith(".")]
    assert visible == ["README", "train", "train/scene_a", "train/scene_a/1", "train/scene_a/1/000001.pcd",
                       "train/scene_b", "train/scene_b/-1", "train/scene_b/-1/000001.pcd"]
    assert download_all(entries, dest, progress=False) == [dest, dest]
    assert len(server.requests) == 2  # the rerun found both markers


# ----------------------------------------------------------------------------- trust on first use


def read_pins(dest) -> dict:
    return json.loads(pins_path(dest).read_text())["archives"]


def test_unverified_download_warns_and_pins_its_checksum(server, tmp_path, caplog):
    archive = tar_gz(SCENE)
    server.files["/part1.tar.gz"] = archive
    dest = tmp_path / "raw" / "v2xpnp"
    with caplog.at_level(logging.WARNING, logger="turbotrain.data.download"):
        download(f"{server.url}/part1.tar.gz", dest, progress=False, merge=True)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"{server.url}/part1.tar.gz: no sha256 configured" in w for w in warnings), warnings
    assert pins_path(dest) == tmp_path / "raw" / "v2xpnp.pins.json"  # beside the output, not inside
    assert read_pins(dest) == {"part1.tar.gz": {"sha256": sha(archive), "source": f"{server.url}/part1.tar.gz"}}
    assert (dest / "train/scene_a/1/000001.pcd").read_bytes() == b"pcd"
    assert not staging_dir(dest).exists()


def test_a_changed_archive_without_configured_sha256_fails_naming_both(server, tmp_path):
    first, changed = tar_gz(SCENE), tar_gz({**SCENE, "train/scene_a/1/000001.pcd": b"other"})
    server.files["/part1.tar.gz"] = first
    dest = tmp_path / "raw" / "v2xpnp"
    download(f"{server.url}/part1.tar.gz", dest, progress=False)
    shutil.rmtree(dest)  # a failed job's output deleted by Snakemake, or a fresh machine with the pins
    server.files["/part1.tar.gz"] = changed
    with pytest.raises(DataError) as info:
        download(f"{server.url}/part1.tar.gz", dest, progress=False)
    message = str(info.value)
    assert sha(first) in message and sha(changed) in message and str(pins_path(dest)) in message
    assert info.value.got == sha(changed)
    assert everything_in(dest) == [] and everything_in(staging_dir(dest)) == []  # the changed bytes are gone
    assert read_pins(dest)["part1.tar.gz"]["sha256"] == sha(first)  # the pin is not overwritten


def test_a_configured_sha256_wins_over_the_pin(server, tmp_path):
    first, changed = payload(seed=1), payload(seed=2)
    server.files["/blob.bin"] = first
    dest = tmp_path / "raw" / "blobs"
    download(f"{server.url}/blob.bin", dest, progress=False)
    server.files["/blob.bin"] = changed
    out = download(f"{server.url}/blob.bin", dest, sha256=sha(changed), progress=False)
    assert out.read_bytes() == changed


def test_a_finished_download_from_before_pinning_is_pinned_from_its_marker(server, tmp_path):
    data = payload()
    server.files["/blob.bin"] = data
    dest = tmp_path / "raw" / "blobs"
    download(f"{server.url}/blob.bin", dest, progress=False)
    pins_path(dest).unlink()
    assert download(f"{server.url}/blob.bin", dest, progress=False) == dest / "blob.bin"
    assert server.requests == [None]
    assert read_pins(dest)["blob.bin"]["sha256"] == sha(data)


def test_data_that_came_from_another_archive_are_refused_by_download_and_check(server, tmp_path):
    """`dvc pull` (or a copy) brings raw data whose marker names another archive than the pin."""
    data = payload()
    server.files["/blob.bin"] = data
    dest = tmp_path / "raw" / "blobs"
    entries = [{"url": f"{server.url}/blob.bin"}]
    download_all(entries, dest, progress=False)
    check_downloaded(dest, entries)  # matches its pin
    other = "ab" * 32
    marker = dest / ".blob.bin.complete"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "sha256": other}))
    with pytest.raises(DataError) as info:
        check_downloaded(dest, entries)
    assert info.value.path == str(marker) and info.value.got == other and sha(data) in str(info.value)
    with pytest.raises(DataError, match=other):
        download_all(entries, dest, progress=False)
    assert server.requests == [None]
    configured = [{"url": f"{server.url}/blob.bin", "sha256": sha(data)}]
    with pytest.raises(DataError, match=f"expected {sha(data)}, got '{other}'"):
        check_downloaded(dest, configured)


def test_check_downloaded_names_what_it_cannot_check(tmp_path, caplog):
    dest = tmp_path / "raw" / "blobs"
    dest.mkdir(parents=True)
    with caplog.at_level(logging.WARNING, logger="turbotrain.data.download"):
        check_downloaded(dest, [{"url": "http://127.0.0.1:9/blob.bin"}])
    assert "no record of a finished download of blob.bin" in caplog.text


def download_config(tmp_path, url: str) -> str:
    """config/smoke.yaml with its dataset downloaded from ``url`` (no sha256) into tmp_path/raw."""
    config = yaml.safe_load((REPO_ROOT / "config" / "smoke.yaml").read_text())
    config["dataset"].update({"source": "download", "root": str(tmp_path / "raw"), "urls": [{"url": url}]})
    path = tmp_path / "download.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_turbotrain_download_and_fuse_stop_on_a_changed_unpinned_archive(server, tmp_path, capsys):
    first, changed = tar_gz(SCENE), tar_gz({**SCENE, "README": b"re-released"})
    server.files["/part1.tar.gz"] = first
    config_file = download_config(tmp_path, f"{server.url}/part1.tar.gz")
    raw = tmp_path / "raw" / "synthetic_smoke"
    assert main(["download", "--config", config_file, "--out", str(raw)]) == 0
    assert read_pins(raw)["part1.tar.gz"]["sha256"] == sha(first)

    # Raw data from elsewhere (`dvc pull`): its marker says it came from the re-released archive.
    marker = raw / ".part1.tar.gz.complete"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "sha256": sha(changed)}))
    with pytest.raises(DataError, match=f"expected {sha(first)} .*got '{sha(changed)}'"):
        fuse(load_config(config_file), raw, "train", tmp_path / "cache")
    assert not (tmp_path / "cache").exists()

    shutil.rmtree(raw)  # what Snakemake does with a failed job's output; the pins stay
    server.files["/part1.tar.gz"] = changed
    capsys.readouterr()
    assert main(["download", "--config", config_file, "--out", str(raw)]) == 2
    error = capsys.readouterr().err.splitlines()[-1]  # after the progress bar
    assert error.startswith(f"turbotrain download: error: {server.url}/part1.tar.gz: field 'sha256': expected {sha(first)}")
    assert f"got '{sha(changed)}'" in error
