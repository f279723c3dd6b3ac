"""LiDAR point files: PCL ``.pcd`` (ASCII, binary, binary_compressed) and KITTI-style ``.bin``.

Every reader returns ``(N, 4) float32`` columns ``x, y, z, intensity`` in the sensor frame. A file
without an intensity field reads as intensity 0. A file that cannot be parsed, or holds fewer points
than its header promises, raises :class:`~turbotrain.utils.errors.DataError` naming the file.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
from pypcd4 import Encoding, PointCloud

from turbotrain.utils.atomic import atomic_path
from turbotrain.utils.errors import DataError

POINT_COLUMNS = 4  # x, y, z, intensity
# PCL writers disagree on the intensity field's name; CARLA/OpenCOOD use "intensity", some tools "i".
INTENSITY_FIELD_NAMES = ("intensity", "i")
# What pypcd4 (and the numpy/lzf/pydantic code under it) raises on a malformed file.
_PARSE_ERRORS = (ValueError, TypeError, KeyError, RuntimeError, struct.error, UnicodeDecodeError)


def read_pcd(path: str | os.PathLike) -> np.ndarray:
    """``(N, 4) float32`` points of a ``.pcd`` file (any PCL encoding)."""
    path = Path(path)
    cloud = _parse_pcd(path)
    _check_point_count(path, cloud)
    return _xyzi_of(path, cloud)


def write_pcd(
    path: str | os.PathLike, points: np.ndarray, binary: bool = True, compressed: bool = False, fsync: bool = True,
) -> None:
    """Write ``(N, >=3)`` points as ``x y z intensity`` float32, atomically.

    ``binary=False`` writes PCL ASCII; ``compressed=True`` (with ``binary``) writes binary_compressed.
    A missing intensity column is written as zeros. ``fsync``: see :mod:`turbotrain.utils.atomic`.
    """
    xyzi = as_xyzi(points)
    cloud = PointCloud.from_xyzi_points(xyzi)
    encoding = _encoding_for(binary, compressed)
    with atomic_path(path, fsync=fsync) as tmp:
        cloud.save(tmp, encoding=encoding)


def read_bin(path: str | os.PathLike) -> np.ndarray:
    """``(N, 4) float32`` points of a KITTI-style ``.bin`` (flat float32 x, y, z, intensity)."""
    path = Path(path)
    try:
        flat = np.fromfile(path, dtype="<f4")
    except OSError as err:
        raise DataError(path, "file", "a readable float32 .bin point file", str(err)) from err
    if flat.size % POINT_COLUMNS:
        raise DataError(
            path, "size", f"a multiple of {POINT_COLUMNS} float32 values (x, y, z, intensity)",
            f"{flat.size} values (truncated?)",
        )
    return flat.reshape(-1, POINT_COLUMNS).astype(np.float32, copy=False)


def write_bin(path: str | os.PathLike, points: np.ndarray) -> None:
    """Write points as a KITTI-style ``.bin`` (little-endian float32, 4 columns), atomically."""
    xyzi = as_xyzi(points).astype("<f4", copy=False)
    with atomic_path(path) as tmp:
        xyzi.tofile(tmp)


def read_points(path: str | os.PathLike) -> np.ndarray:
    """Read a ``.pcd`` or ``.bin`` point file, chosen by its suffix."""
    path = Path(path)
    if path.suffix == ".bin":
        return read_bin(path)
    if path.suffix == ".pcd":
        return read_pcd(path)
    raise DataError(path, "suffix", "'.pcd' or '.bin'", path.suffix)


def as_xyzi(points: np.ndarray) -> np.ndarray:
    """``(N, 4) float32`` copy of ``(N, 3)`` or ``(N, >=4)`` points (zero intensity when absent)."""
    points = np.asarray(points, dtype=np.float32)
    if points.ndim != 2 or points.shape[1] < 3:
        raise ValueError(f"points must be (N, 3) or (N, >=4), got shape {points.shape}")
    out = np.zeros((points.shape[0], POINT_COLUMNS), dtype=np.float32)
    width = min(points.shape[1], POINT_COLUMNS)
    out[:, :width] = points[:, :width]
    return out


def _parse_pcd(path: Path) -> PointCloud:
    try:
        return PointCloud.from_path(path)
    except FileNotFoundError as err:
        raise DataError(path, "file", "an existing .pcd file", "missing") from err
    except _PARSE_ERRORS as err:
        raise DataError(path, "pcd data", "a valid PCL point cloud", _describe(err)) from err


def _describe(err: Exception) -> str:
    """One line about a parse failure; pydantic's multi-line report is cut to the header keys it names."""
    if hasattr(err, "errors") and callable(err.errors):
        keys = sorted({str(item["loc"][0]) for item in err.errors() if item.get("loc")})
        return f"bad or missing header keys {keys}"
    lines = str(err).splitlines() or [""]
    return f"{type(err).__name__}: {lines[0]}"


def _check_point_count(path: Path, cloud: PointCloud) -> None:
    # pypcd4 reads a short binary body without complaint, so a truncated file is caught here.
    got = int(cloud.pc_data.shape[0])
    if got != cloud.metadata.points:
        raise DataError(path, "POINTS", f"{cloud.metadata.points} points as the header says", f"{got} (truncated?)")


def _xyzi_of(path: Path, cloud: PointCloud) -> np.ndarray:
    fields = cloud.fields
    missing = [axis for axis in ("x", "y", "z") if axis not in fields]
    if missing:
        raise DataError(path, "FIELDS", "x, y and z", fields)
    out = np.zeros((cloud.points, POINT_COLUMNS), dtype=np.float32)
    if cloud.points == 0:
        return out
    out[:, :3] = cloud.numpy(("x", "y", "z"))
    intensity = next((name for name in INTENSITY_FIELD_NAMES if name in fields), None)
    if intensity is not None:
        out[:, 3] = cloud.numpy((intensity,))[:, 0]
    return out


def _encoding_for(binary: bool, compressed: bool) -> Encoding:
    if not binary:
        return Encoding.ASCII
    return Encoding.BINARY_COMPRESSED if compressed else Encoding.BINARY
