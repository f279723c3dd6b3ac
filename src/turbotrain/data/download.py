"""Resumable, checksummed download and extraction of dataset archives.

V2XPnP-Seq and V2X-Real sit behind registration pages, so sources are user-supplied: ``http(s)://``
URLs, ``file://`` URLs or plain local paths (a local *directory* is used in place). For a file source
downloaded into ``<root>/<name>``:

1. stream to ``<root>/.<name>.download/<file>.partial``, a staging folder *beside* the output: the
   Snakemake rule's output is the folder ``<root>/<name>``, which Snakemake deletes when the job
   fails, and a killed transfer must survive that. A rerun (or a retry after a dropped connection)
   resumes the partial with an HTTP ``Range`` request when the server answers 206, and restarts when
   it answers 200;
2. verify sha256 against ``dataset.urls[].sha256`` or, when none is configured, against the pin
   recorded on the first download (:mod:`turbotrain.data.pins`); a first download without either
   is pinned, with a warning. On mismatch the partial is deleted, so nothing that looks complete is
   left, and the error names both checksums;
3. rename it to ``<staging>/<file>`` (atomic, same folder);
4. extract ``.tar[.gz|.bz2|.xz]`` / ``.tgz`` / ``.zip`` into a scratch folder in the staging folder,
   renamed to ``<dest>/<file without suffix>`` when done, or merged into ``<dest>`` (``merge=True``,
   the default of :func:`download_all`); members escaping that folder are rejected. A file that is
   not extracted is moved to ``<dest>/<file>``;
5. write ``<dest>/.<file>.complete`` (JSON with the checksum), so a rerun returns at once, and a
   reader of the data (:func:`check_downloaded`) can compare it with the pins.

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

from turbotrain.data.pins import ArchivePins, Expected, pins_path
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
    Without ``sha256`` the file is checked against (or, the first time, recorded in) the pins file
    beside ``dest_dir``.
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
    pins = ArchivePins(pins_path(dest))
    expected = pins.expected(name, sha256)
    finished = _finished_output(dest, name, expected, source, pins)
    if finished is not None:
        return finished
    if expected.sha256 is None:
        logger.warning("%s: no sha256 configured (dataset.urls[].sha256); downloading it unverified and pinning "
                       "its checksum in %s (trust on first use)", source, pins.path)
    staging = staging_dir(dest)
    staging.mkdir(exist_ok=True)
    for scratch in staging.glob(f"{name}.*.extracting"):  # left by a run killed while unpacking
        shutil.rmtree(scratch, ignore_errors=True)
    archive = staging / name
    digest = _reuse_archive(archive, expected, source)
    if digest is None:
        digest = _fetch_verified(source, staging, name, expected, progress, retries)
    if expected.sha256 is None:
        pins.record(name, digest, source)
        logger.warning("%s: pinned sha256 %s in %s; copy it into dataset.urls[].sha256 to pin it in the config",
                       source, digest, pins.path)
    output = _place(archive, dest, extract, keep_archive, merge)
    marker = {"sha256": digest, "source": source, "output": os.path.relpath(output, dest)}
    write_json(_marker_path(dest, name), marker)
    _remove_if_empty(staging)
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


def check_downloaded(dest_dir: str | os.PathLike, entries: Iterable[dict]) -> None:
    """Check downloaded data (e.g. fetched by ``dvc pull``) against the configured or pinned checksums.

    Each file entry's marker ``<dest>/.<file>.complete`` records the sha256 of the archive the data
    came from; a marker that disagrees raises DataError with both checksums. Entries without a
    marker or without any checksum to compare are named in a warning.
    """
    dest = Path(dest_dir)
    pins = ArchivePins(pins_path(dest))
    for entry in entries:
        source = str(entry.get("url") or entry.get("path") or "")
        local = _local_path(source) if source else None
        if not source or (local is not None and local.is_dir()):
            continue
        name = _safe_name(entry.get("name") or _name_from_source(source), source)
        recorded = _marker_sha256(dest, name)
        expected = pins.expected(name, entry.get("sha256"))
        if recorded is None:
            logger.warning("%s: no record of a finished download of %s (%s): its data are not checked",
                           dest, name, _marker_path(dest, name).name)
        elif expected.sha256 is None:
            logger.warning("%s: %s has neither a configured nor a pinned sha256: its data are not checked",
                           dest, source)
        elif recorded != expected.sha256:
            raise DataError(_marker_path(dest, name), "sha256", expected.describe(), recorded)


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


def staging_dir(dest: str | os.PathLike) -> Path:
    """``<root>/.<name>.download`` for ``dest = <root>/<name>``: partial files and unpacking scratch.

    Beside ``dest``, not inside: a failed job's output folder is deleted by Snakemake, and the
    transfer must resume after that. Same parent, so every move out of it is a rename.
    """
    dest = Path(os.path.abspath(dest))
    return dest.with_name(f".{dest.name}.download")


def _partial_path(staging: Path, name: str) -> Path:
    return staging / f"{name}.partial"


def _marker_path(dest: Path, name: str) -> Path:
    return dest / f".{name}.complete"


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:  # another archive's partial is still there
        pass


def _reuse_archive(archive: Path, expected: Expected, source: str) -> str | None:
    """Checksum of an archive a killed run downloaded but did not extract; ``None`` to fetch anew."""
    if not archive.is_file():
        return None
    try:
        return _verify(archive, expected, source, delete_on_mismatch=True)
    except DataError:
        logger.warning("%s does not match sha256 %s: fetching it again", archive, expected.sha256)
        return None


def _fetch_verified(source: str, staging: Path, name: str, expected: Expected, progress: bool, retries: int) -> str:
    """Download into the partial file, check it, rename it to ``<staging>/<name>``; returns its sha256."""
    partial = _partial_path(staging, name)
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
    digest = _verify(partial, expected, source, delete_on_mismatch=True)
    os.replace(partial, staging / name)
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


def _verify(path: Path, expected: Expected, source: str, delete_on_mismatch: bool = False) -> str:
    """Hex sha256 of ``path``; raises DataError naming both checksums (deleting ``path`` if asked)
    when it is not the expected one."""
    digest = sha256_file(path)
    if expected.sha256 and digest != expected.sha256:
        if delete_on_mismatch:
            path.unlink(missing_ok=True)
        raise DataError(source, "sha256", expected.describe(), digest)
    return digest


def _read_marker(dest: Path, name: str) -> dict | None:
    try:
        done = json.loads(_marker_path(dest, name).read_text())
        return {"output": dest / done["output"], "sha256": str(done["sha256"]).lower()}
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return None


def _marker_sha256(dest: Path, name: str) -> str | None:
    done = _read_marker(dest, name)
    return done["sha256"] if done else None


def _finished_output(dest: Path, name: str, expected: Expected, source: str, pins: ArchivePins) -> Path | None:
    """The output a previous run completed, when its marker agrees with the expected checksum.

    A finished output without any checksum to compare (downloaded before pinning existed) pins the
    checksum its marker recorded. One that contradicts its pin raises: the data in place came from
    another archive than the pinned one. A changed configured checksum fetches the archive again.
    """
    done = _read_marker(dest, name)
    if done is None or not done["output"].exists():
        return None
    if expected.sha256 is None:
        pins.record(name, done["sha256"], source)
        logger.warning("%s: pinned sha256 %s (of the finished download in %s) in %s", source, done["sha256"], dest,
                       pins.path)
        return done["output"]
    if done["sha256"] == expected.sha256:
        return done["output"]
    if expected.pinned:
        raise DataError(_marker_path(dest, name), "sha256", expected.describe(), done["sha256"])
    return None


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


def _place(archive: Path, dest: Path, extract: bool, keep_archive: bool, merge: bool) -> Path:
    """Move a verified file from the staging folder into ``dest``: extracted, or as it is."""
    if not (extract and _archive_kind(archive.name)):
        os.replace(archive, dest / archive.name)
        return dest / archive.name
    output = _extract(archive, dest, merge)
    if keep_archive:
        os.replace(archive, dest / archive.name)
    else:
        archive.unlink()
    return output


def _extract(archive: Path, dest: Path, merge: bool) -> Path:
    """Unpack into a scratch folder beside the archive (the staging folder), then rename it to
    ``<dest>/<archive stem>`` or merge it into ``dest``."""
    staging = Path(tempfile.mkdtemp(prefix=f"{archive.name}.", suffix=".extracting", dir=archive.parent))
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
