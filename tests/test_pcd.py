"""Point files: PCD (ASCII / binary / binary_compressed) and KITTI .bin round trips and bad input."""
from __future__ import annotations

import numpy as np
import pytest
from pypcd4 import Encoding, PointCloud

from turbotrain.data.pcd import read_bin, read_pcd, read_points, write_bin, write_pcd
from turbotrain.utils.errors import DataError


@pytest.fixture
def points() -> np.ndarray:
    rng = np.random.default_rng(7)
    cloud = rng.uniform(-60, 60, size=(257, 4)).astype(np.float32)
    cloud[:, 3] = rng.uniform(0, 1, size=257)
    return cloud


@pytest.mark.parametrize(
    "binary, compressed", [(True, False), (False, False), (True, True)], ids=["binary", "ascii", "compressed"]
)
def test_pcd_round_trip(tmp_path, points, binary, compressed):
    path = tmp_path / "000001.pcd"
    write_pcd(path, points, binary=binary, compressed=compressed)
    got = read_pcd(path)
    assert got.dtype == np.float32 and got.shape == (257, 4)
    np.testing.assert_allclose(got, points, atol=1e-6)
    assert list(tmp_path.iterdir()) == [path]  # the atomic write left no temporary behind


def test_pcd_header_names_encoding(tmp_path, points):
    write_pcd(tmp_path / "a.pcd", points, binary=False)
    header = (tmp_path / "a.pcd").read_bytes()[:300].decode()
    assert "FIELDS x y z intensity" in header and "DATA ascii" in header


def test_pcd_without_intensity_reads_zero_intensity(tmp_path, points):
    path = tmp_path / "xyz.pcd"
    PointCloud.from_xyz_points(points[:, :3]).save(path, encoding=Encoding.BINARY)
    got = read_pcd(path)
    np.testing.assert_array_equal(got[:, :3], points[:, :3])
    np.testing.assert_array_equal(got[:, 3], 0.0)


def test_xyz_points_are_written_with_zero_intensity(tmp_path, points):
    write_pcd(tmp_path / "a.pcd", points[:, :3])
    np.testing.assert_array_equal(read_pcd(tmp_path / "a.pcd")[:, 3], 0.0)


def test_empty_cloud_round_trip(tmp_path):
    write_pcd(tmp_path / "e.pcd", np.zeros((0, 4), np.float32))
    assert read_pcd(tmp_path / "e.pcd").shape == (0, 4)


@pytest.mark.parametrize("cut", [4, 3, 16 * 200], ids=["one-value", "mid-value", "many-points"])
def test_truncated_binary_pcd_names_file(tmp_path, points, cut):
    path = tmp_path / "000002.pcd"
    write_pcd(path, points)
    data = path.read_bytes()
    path.write_bytes(data[:-cut])
    with pytest.raises(DataError, match="000002.pcd") as info:
        read_pcd(path)
    assert info.value.field in ("POINTS", "pcd data")


def test_truncated_ascii_pcd_raises(tmp_path, points):
    path = tmp_path / "a.pcd"
    write_pcd(path, points, binary=False)
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(DataError, match="a.pcd"):
        read_pcd(path)


def test_garbage_pcd_raises_data_error(tmp_path):
    path = tmp_path / "g.pcd"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    with pytest.raises(DataError, match="g.pcd.*pcd data"):
        read_pcd(path)


def test_header_without_required_keys_names_them(tmp_path):
    path = tmp_path / "h.pcd"
    path.write_text("VERSION 0.7\nFIELDS x y z\nSIZE 4 4 4\nDATA ascii\n1 2 3\n")
    with pytest.raises(DataError, match="TYPE|type"):
        read_pcd(path)


def test_missing_pcd_raises_data_error(tmp_path):
    with pytest.raises(DataError, match="nope.pcd.*missing"):
        read_pcd(tmp_path / "nope.pcd")


def test_bin_round_trip_and_dispatch(tmp_path, points):
    write_bin(tmp_path / "000003.bin", points)
    np.testing.assert_array_equal(read_bin(tmp_path / "000003.bin"), points)
    np.testing.assert_array_equal(read_points(tmp_path / "000003.bin"), points)
    write_pcd(tmp_path / "000003.pcd", points)
    np.testing.assert_array_equal(read_points(tmp_path / "000003.pcd"), points)


def test_bin_is_flat_little_endian_float32(tmp_path):
    raw = np.array([1, 2, 3, 0.5, 4, 5, 6, 0.25], dtype="<f4")
    raw.tofile(tmp_path / "k.bin")
    np.testing.assert_array_equal(read_bin(tmp_path / "k.bin"), raw.reshape(2, 4))


def test_truncated_bin_raises(tmp_path, points):
    path = tmp_path / "t.bin"
    write_bin(path, points)
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(DataError, match="t.bin.*size"):
        read_bin(path)


def test_unknown_suffix_raises(tmp_path):
    with pytest.raises(DataError, match="suffix"):
        read_points(tmp_path / "a.ply")
