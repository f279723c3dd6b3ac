"""Trust on first use for archives whose links came without a checksum.

Registration e-mails often give download links without a sha256. Such an archive is hashed when it is
first downloaded and its checksum recorded in the dataset's pins file; every later download of the
same archive (on any machine with the file) and every read of the downloaded data must match it.

The pins file of the raw folder ``<root>/<name>`` is ``<root>/<name>.pins.json``, *beside* the folder:
Snakemake deletes a failed download job's output folder, and a re-download replaces it, but the
pins must outlive both; and a file of its own can be committed (``.gitignore`` lets
``data/raw/*.pins.json`` through). Entries are keyed by archive file name, not URL: signed links
expire and are re-issued for the same archive.

    {"archives": {"train_P1.tar.gz": {"sha256": "…", "source": "https://…/train_P1.tar.gz"}}}
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from turbotrain.utils.atomic import write_json
from turbotrain.utils.errors import DataError

PINS_SUFFIX = ".pins.json"
CONFIG_FIELD = "dataset.urls[].sha256"


def pins_path(raw_dir: str | os.PathLike) -> Path:
    """``<root>/<name>.pins.json`` for the raw folder ``<root>/<name>``."""
    raw = Path(os.path.abspath(raw_dir))
    return raw.with_name(raw.name + PINS_SUFFIX)


@dataclass(frozen=True)
class Expected:
    """The checksum an archive must have, and where it comes from (for the error message)."""

    sha256: str | None
    pinned: bool = False  # True: recorded on first use (pins file); False: configured (or none)
    pins_file: Path | None = None

    def describe(self) -> str:
        if not self.pinned:
            return self.sha256 or "no checksum"
        return (f"{self.sha256} (pinned when first downloaded, in {self.pins_file}; if the archive changed on "
                f"purpose, put its new sha256 into {CONFIG_FIELD} or delete its entry from that file)")


class ArchivePins:
    """The pins file of one raw folder: archive name -> sha256 seen on first use."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def _archives(self) -> dict[str, dict]:
        if not self.path.is_file():
            return {}
        try:
            archives = json.loads(self.path.read_text())["archives"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise DataError(self.path, "archives", "a JSON object {\"archives\": {name: {\"sha256\": ...}}}",
                            str(err)) from None
        if not isinstance(archives, dict):
            raise DataError(self.path, "archives", "a mapping of archive name to {\"sha256\": ...}", archives)
        return archives

    def get(self, name: str) -> str | None:
        entry = self._archives().get(name)
        if entry is None:
            return None
        sha256 = entry.get("sha256") if isinstance(entry, dict) else None
        if not isinstance(sha256, str) or len(sha256) != 64:
            raise DataError(self.path, f"archives.{name}.sha256", "64 hex digits", sha256)
        return sha256.lower()

    def record(self, name: str, sha256: str, source: str) -> None:
        """Add (or replace) ``name``'s pin; the file is rewritten atomically."""
        archives = self._archives()
        archives[name] = {"sha256": sha256, "source": source}
        write_json(self.path, {"archives": archives})

    def expected(self, name: str, configured: str | None) -> Expected:
        """A configured sha256 wins; otherwise the pin, if there is one."""
        if configured:
            return Expected(configured.lower())
        pinned = self.get(name)
        return Expected(pinned, pinned=pinned is not None, pins_file=self.path if pinned else None)
