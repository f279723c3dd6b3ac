"""The project's digests: of a file's bytes, and of a JSON-able value (config sections, inputs).

One place, so a checksum in a manifest, a download record and a run fingerprint are computed alike.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any

CHUNK_BYTES = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def canonical_sha256(value: Any) -> str:
    """Full hex sha256 of ``value``'s canonical JSON (sorted keys; non-JSON values by ``str``)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def config_hash(section: Any) -> str:
    """Stable short (16 hex digits) digest of a config section: what a cached product depends on."""
    return canonical_sha256(section)[:16]
