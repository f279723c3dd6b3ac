"""Errors that name the file, the field and what was expected, so a user can fix bad input."""
from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """Bad input data: ``DataError(path, field, expected, got)`` renders one actionable line."""

    def __init__(self, path: str | Path, field: str, expected: str, got: object = None):
        self.path = str(path)
        self.field = field
        self.expected = expected
        self.got = got
        msg = f"{self.path}: field '{field}': expected {expected}"
        if got is not None:
            msg += f", got {got!r}"
        super().__init__(msg)

    def __reduce__(self):  # rebuilt from its fields: it crosses process boundaries (parallel fuse)
        return type(self), (self.path, self.field, self.expected, self.got)


class ConfigError(ValueError):
    """Invalid configuration, raised before any job starts."""
