"""A small YAML emitter for the per-frame label files (one per LiDAR frame, tens of thousands a run).

``yaml.dump`` spends ~10 ms a frame file in PyYAML's Python representer even with libyaml's C
emitter; this writer covers what the OpenCOOD / V2XPnP frame YAML holds -- nested mappings, lists of
numbers, numbers, strings, booleans, None -- and writes lists in flow style (``[x, y, z]``). The text
is valid YAML that ``yaml.safe_load`` reads back to an equal dict, floats bit for bit: floats are
written as ``repr`` (the shortest string that round-trips) in the form PyYAML's YAML 1.1 float
resolver recognises. Anything else raises TypeError (use ``yaml.dump`` for general documents).
"""
from __future__ import annotations

import functools
import json
import math
from typing import Any

import yaml

_RESOLVER = yaml.resolver.Resolver()
_STR_TAG = "tag:yaml.org,2002:str"
_PLAIN_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


def dumps(document: dict) -> str:
    """YAML text of a mapping (block style; lists in flow style)."""
    if not isinstance(document, dict):
        raise TypeError(f"fast_yaml writes a mapping at the top level, got {type(document).__name__}")
    if not document:
        return "{}\n"
    lines: list[str] = []
    _mapping(document, "", lines)
    return "\n".join(lines) + "\n"


def _mapping(mapping: dict, indent: str, lines: list[str]) -> None:
    for key, value in mapping.items():
        head = f"{indent}{_scalar(key)}:"
        if isinstance(value, dict) and value:
            lines.append(head)
            _mapping(value, indent + "  ", lines)
        else:
            lines.append(f"{head} {_flow(value)}")


def _flow(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_scalar(k)}: {_flow(v)}" for k, v in value.items()) + "}"
    return _scalar(value)


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _float(value)
    if isinstance(value, str):
        return _string(value)
    raise TypeError(f"fast_yaml cannot write {type(value).__name__} {value!r}")


def _float(value: float) -> str:
    if math.isnan(value):
        return ".nan"
    if math.isinf(value):
        return ".inf" if value > 0 else "-.inf"
    text = repr(float(value))  # numpy 2's repr of np.float64 is 'np.float64(...)'
    # YAML 1.1 (PyYAML) reads '1e-05' as a string: its float pattern needs a '.' before the exponent.
    if "." not in text and "e" in text:
        text = text.replace("e", ".0e", 1)
    return text


@functools.lru_cache(maxsize=4096)
def _string(value: str) -> str:
    """Plain when a YAML reader resolves it back to this string (``car``), else JSON-quoted (``"yes"``)."""
    plain = value and set(value) <= _PLAIN_SAFE and value[0] not in "-." \
        and _RESOLVER.resolve(yaml.ScalarNode, value, (True, False)) == _STR_TAG
    # JSON's double-quoted strings are YAML double-quoted scalars (YAML is a JSON superset).
    return value if plain else json.dumps(value)
