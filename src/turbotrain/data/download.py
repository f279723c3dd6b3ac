"""Resumable, checksummed download and extraction of dataset archives.

V2XPnP-Seq and V2X-Real sit behind registration pages, so sources are user-supplied: ``http(s)://``
URLs, ``file://`` URLs or plain local paths (a local *directory* is used in place). For a file source:

1. stream to ``<dest>/.<name>.partial``; a rerun (or a retry after a dropped connection) resumes it
   with an HTTP ``Range`` request when the server answers 206, and restarts when it answers 200;
2. verify sha256; on mismatch the partial is deleted, so nothing that looks complete is left;
3. rename to ``<dest>/<name>`` (atomic, same folder);
4. extract ``.tar[.gz|.bz2|.xz]`` / ``.tgz`` / ``.zip`` into a hidden temporary folder, renamed to
   ``<dest>/<name without suffix>`` when done, or merged into ``<dest>`` (``merge=True``, the default
   of :func:`download_all`); members escaping that folder are rejected;
5. write ``<dest>/.<name>.complete`` (JSON with the checksum), so a rerun returns at once.

Written with the standard library's urllib: the only HTTP features needed are ``Range`` and status
codes, and it keeps the data stages free of a ``requests`` dependency.
"""
from __future__ import annotations

import http.client
import json
import logging
import os
import re
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable

from tqdm import tqdm

from turbotrain.utils.atomic import write_json
from turbotrain.utils.errors import ConfigError, DataError
from turbotrain.utils.hashing import sha256_file

logger = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
TIMEOUT_S = 60.0
TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar")
ZIP_SUFFIXES = (".zip",)
# What a dropped or stalled connection raises; these are retried with a resumed request.
TRANSIENT_ERRORS = (ConnectionError, TimeoutError, http.client.IncompleteRead, urllib.error.URLError)


class IncompleteTransfer(ConnectionError):
    """The server closed the connection before sending every byte it announced."""


@dataclass
class _Response:
    stream: BinaryIO
    start: int  # byte offset of the first byte in ``stream``
    total: int | None  # full size of the resource, when the source says it


# ----------------------------------------------------------------------------- public API


def download(
    url_or_path: str | os.PathLike, dest_dir: str | os.PathLike, sha256: str | None = None,
    extract: bool = True, progress: bool = True, name: str | None = None,
    retries: int = 3, keep_archive: bool = False, merge: bool = False,
) -> Path:
    """Fetch, verify and (for archives) extract one source; returns the file or extracted folder.

    ``name`` overrides the file name taken from the URL. ``retries`` resumed attempts follow a dropped
    connection. The archive is deleted after extraction unless ``keep_archive``. ``merge`` extracts
    the archive's contents straight into ``dest_dir`` (returned), merging folders that other archives
    also fill -- split releases such as train parts P1-P4 each hold ``train/<scenario>/...``.
    """
    source = str(url_or_path)
    local = _local_path(source)
    if local is not None and local.is_dir():
        if sha256:
            logger.warning("%s is a directory, used in place: sha256 not checked", local)
        return local.resolve()
    name = _safe_name(name or _name_from_source(source), source)
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    finished = _finished_output(dest, name, sha256)
    if finished is not None:
        return finished
    archive = dest / name
    digest = _reuse_archive(archive, sha256, source)
    if digest is None:
        digest = _fetch_verified(source, dest, name, sha256, progress, retries)
    output = _extract(archive, dest, merge) if extract and _archive_kind(name) else archive
    if output != archive and not keep_archive:
        archive.unlink()
    marker = {"sha256": digest, "source": source, "output": os.path.relpath(output, dest)}
    write_json(_marker_path(dest, name), marker)
    return output


def download_all(
    entries: Iterable[dict], dest_dir: str | os.PathLike, progress: bool = True, merge: bool = True,
) -> list[Path]:
    """:func:`download` each ``{"url" | "path", "sha256"?, "name"?, "merge"?}`` entry, in order.

    Archives are merged into ``dest_dir`` by default, so that split archives assemble one dataset
    root ``<dest_dir>/<split>/<scenario>``; an entry's own ``"merge"`` overrides that.
    """
    outputs = []
    for position, entry in enumerate(entries):
        source = entry.get("url") or entry.get("path")
        if not source:
            raise ConfigError(f"download entry {position} needs 'url' or 'path', got {entry!r}")
        outputs.append(
            download(source, dest_dir, sha256=entry.get("sha256"), name=entry.get("name"), progress=progress,
                     merge=bool(entry.get("merge", merge)))
        )
    return outputs


# ----------------------------------------------------------------------------- sources


def _local_path(source: str) -> Path | None:
    """The filesystem path of a ``file://`` URL or plain path; ``None`` for network URLs."""
    parsed = urllib.parse.urlparse(source)
    if parsed.scheme == "file":
        return Path(urllib.request.url2pathname(parsed.path))
    if parsed.scheme in ("http", "https"):
        return None
    if parsed.scheme and len(parsed.scheme) > 1:  # one letter is a Windows drive, not a scheme
        raise ConfigError(f"unsupported download source {source!r}: use http(s)://, file:// or a path")
    return Path(source)


def _name_from_source(source: str) -> str:
    return urllib.parse.unquote(Path(urllib.parse.urlparse(source).path).name)


def _safe_name(name: str, source: str) -> str:
    """A plain file name: the outputs and markers derived from it must stay inside ``dest_dir``."""
    if name in ("", ".", "..") or not re.fullmatch(r"[\w.+-]+", name):
        raise ConfigError(f"unsafe or empty file name {name!r} for {source!r}; pass name= (letters, digits, ._+-)")
    return name


def _open_source(source: str, offset: int) -> _Response:
    """Open ``source`` at byte ``offset`` (or at 0, when the server ignores the Range request)."""
    local = _local_path(source)
    if local is not None:
        return _open_local(local, offset)
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    request = urllib.request.Request(source, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:  # partial is as long as (or longer than) the file: start over
            return _open_source(source, 0)
        raise
    if response.status == 206:
        return _Response(response, _content_range_start(response, source), _content_range_total(response))
    length = response.headers.get("Content-Length")
    return _Response(response, 0, int(length) if length is not None else None)


def _open_local(path: Path, offset: int) -> _Response:
    try:
        handle = open(path, "rb")
    except FileNotFoundError as err:
        raise DataError(path, "source", "an existing file or directory", "missing") from err
    total = os.fstat(handle.fileno()).st_size
    start = offset if offset <= total else 0
    handle.seek(start)
    return _Response(handle, start, total)


def _content_range_start(response, source: str) -> int:
    match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    if match is None:
        raise DataError(source, "Content-Range", "'bytes <start>-<end>/<total>' on a 206 answer",
                        response.headers.get("Content-Range"))
    return int(match.group(1))


def _content_range_total(response) -> int | None:
    match = re.search(r"/(\d+)$", response.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


# ----------------------------------------------------------------------------- transfer


def _partial_path(dest: Path, name: str) -> Path:
    return dest / f".{name}.partial"


def _marker_path(dest: Path, name: str) -> Path:
    return dest / f".{name}.complete"


def _reuse_archive(archive: Path, sha256: str | None, source: str) -> str | None:
    """Checksum of an archive a killed run downloaded but did not extract; ``None`` to fetch anew."""
    if not archive.is_file():
        return None
    try:
        return _verify(archive, sha256, source, delete_on_mismatch=True)
    except DataError:
        logger.warning("%s does not match sha256 %s: fetching it again", archive, sha256)
        return None


def _fetch_verified(source: str, dest: Path, name: str, sha256: str | None, progress: bool, retries: int) -> str:
    """Download into the partial file, check it, rename it to ``<dest>/<name>``; returns its sha256."""
    partial = _partial_path(dest, name)
    for attempt in range(retries + 1):
        try:
            _transfer(source, partial, progress, name)
            break
        except urllib.error.HTTPError:
            raise  # the server answered (404, 403, ...): asking again will not help
        except TRANSIENT_ERRORS as err:
            if attempt == retries:
                raise
            logger.warning("transfer of %s interrupted (%s); resuming (attempt %d)", source, err, attempt + 2)
    digest = _verify(partial, sha256, source, delete_on_mismatch=True)
    os.replace(partial, dest / name)
    return digest


def _transfer(source: str, partial: Path, progress: bool, label: str) -> None:
    """Append the rest of ``source`` to ``partial``; raises :class:`IncompleteTransfer` when cut short."""
    offset = partial.stat().st_size if partial.exists() else 0
    response = _open_source(source, offset)
    if response.start not in (0, offset):
        response.stream.close()
        raise DataError(source, "Content-Range", f"a range starting at byte {offset}", response.start)
    # A server answering 200 to a Range request sends the whole file: start the partial over.
    mode = "ab" if response.start == offset else "wb"
    written = response.start
    with response.stream, open(partial, mode) as out, tqdm(
        total=response.total, initial=written, unit="B", unit_scale=True, desc=label, disable=not progress,
    ) as bar:
        for chunk in iter(lambda: response.stream.read(CHUNK_BYTES), b""):
            out.write(chunk)
            written += len(chunk)
            bar.update(len(chunk))
        out.flush()
        os.fsync(out.fileno())
    # urllib returns a short body without complaint when the connection drops, so count bytes.
    if response.total is not None and written < response.total:
        raise IncompleteTransfer(f"{source}: got {written} of {response.total} bytes")


def _verify(path: Path, sha256: str | None, source: str, delete_on_mismatch: bool = False) -> str:
    """Hex sha256 of ``path``; raises DataError (deleting ``path`` if asked) when it is not ``sha256``."""
    digest = sha256_file(path)
    if sha256 and digest != sha256.lower():
        if delete_on_mismatch:
            path.unlink(missing_ok=True)
        raise DataError(source, "sha256", sha256.lower(), digest)
    return digest


def _finished_output(dest: Path, name: str, sha256: str | None) -> Path | None:
    """The output a previous run completed, when its marker agrees with the requested checksum."""
    marker = _marker_path(dest, name)
    if not marker.is_file():
        return None
    try:
        done = json.loads(marker.read_text())
        output = dest / done["output"]
        recorded = done["sha256"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None
    if (sha256 and recorded != sha256.lower()) or not output.exists():
        return None
    return output


# ----------------------------------------------------------------------------- extraction


def _archive_kind(name: str) -> str | None:
    lowered = name.lower()
    if lowered.endswith(TAR_SUFFIXES):
        return "tar"
    if lowered.endswith(ZIP_SUFFIXES):
        return "zip"
    return None


def _strip_archive_suffix(name: str) -> str:
    lowered = name.lower()
    for suffix in TAR_SUFFIXES + ZIP_SUFFIXES:
        if lowered.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _extract(archive: Path, dest: Path, merge: bool) -> Path:
    """Unpack into a hidden temporary folder, then rename it to ``<dest>/<archive stem>`` or merge it."""
    staging = Path(tempfile.mkdtemp(prefix=f".{archive.name}.", suffix=".extracting", dir=dest))
    try:
        if _archive_kind(archive.name) == "tar":
            _extract_tar(archive, staging)
        else:
            _extract_zip(archive, staging)
        if merge:
            _merge_tree(staging, dest)
            return dest
        target = dest / _strip_archive_suffix(archive.name)
        if target.exists():  # left by a run killed between rename and marker: this copy is verified
            shutil.rmtree(target)
        os.replace(staging, target)
        return target
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already after a successful rename


def _merge_tree(source: Path, target: Path) -> None:
    """Move every entry of ``source`` into ``target``, descending into folders both hold.

    Each move is a same-filesystem rename; an entry already at ``target`` (from an earlier,
    interrupted run of this archive) is replaced by the verified copy.
    """
    target.mkdir(parents=True, exist_ok=True)
    for entry in source.iterdir():
        destination = target / entry.name
        if _is_real_dir(entry) and _is_real_dir(destination):
            _merge_tree(entry, destination)
            continue
        if _is_real_dir(destination):
            shutil.rmtree(destination)
        os.replace(entry, destination)


def _is_real_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _extract_tar(archive: Path, staging: Path) -> None:
    try:
        with tarfile.open(archive, "r:*") as tar:
            # "data" rejects absolute paths, "..", links leaving the folder and device files.
            tar.extractall(staging, filter="data")
    except tarfile.FilterError as err:
        raise DataError(archive, "member path", "a path inside the archive's folder", str(err)) from err
    except tarfile.TarError as err:
        raise DataError(archive, "tar", "a readable tar archive", str(err)) from err


def _extract_zip(archive: Path, staging: Path) -> None:
    try:
        with zipfile.ZipFile(archive) as zf:
            for member in zf.namelist():
                _check_inside(archive, staging, member)
            zf.extractall(staging)
    except zipfile.BadZipFile as err:
        raise DataError(archive, "zip", "a readable zip archive", str(err)) from err


def _check_inside(archive: Path, staging: Path, member: str) -> None:
    # zipfile silently rewrites "../x" to "x"; an archive that tries it is refused instead.
    resolved = (staging / member).resolve()
    if member.startswith(("/", "\\")) or not resolved.is_relative_to(staging.resolve()):
        raise DataError(archive, "member path", "a path inside the archive's folder", member)
