import numpy as np
import pytest

from turbotrain.data.voxelize import Voxelizer, sort_voxels, spconv_available, voxelize_numpy
from turbotrain.grid import Grid

GRID = Grid((-8.0, -4.0, -2.0, 8.0, 4.0, 2.0), (0.4, 0.4, 0.5))
needs_spconv = pytest.mark.skipif(not spconv_available(), reason="spconv not installed")


def _cloud(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    xyz = rng.uniform([-10, -5, -3], [10, 5, 3], size=(n, 3))
    # Points exactly on voxel borders are where float rounding could split the backends.
    xyz[: n // 10] = np.round(xyz[: n // 10] / 0.4) * 0.4
    return np.hstack([xyz, rng.uniform(0, 1, (n, 1))]).astype(np.float32)


def test_numpy_hand_made_case():
    grid = Grid((0.0, 0.0, 0.0, 4.0, 4.0, 4.0), (1.0, 1.0, 1.0))
    points = np.array(
        [[3.5, 0.5, 0.5, 1], [0.5, 0.5, 0.5, 2], [3.6, 0.5, 0.5, 3], [3.7, 0.5, 0.5, 4], [1.5, 2.5, 3.5, 5], [-1, 0, 0, 6]],
        np.float32,
    )
    voxels, coords, num_points = voxelize_numpy(points, grid, max_points_per_voxel=2, max_voxels=10)
    np.testing.assert_array_equal(coords, [[0, 0, 3], [0, 0, 0], [3, 2, 1]])
    np.testing.assert_array_equal(num_points, [2, 1, 1])
    # The third point of the first voxel (intensity 4) exceeds max_points_per_voxel and is dropped.
    np.testing.assert_array_equal(voxels[0, :, 3], [1, 3])
    np.testing.assert_array_equal(voxels[1, 1], [0, 0, 0, 0])


def test_numpy_truncates_to_first_seen_voxels():
    points = _cloud(2000, seed=1)
    full = voxelize_numpy(points, GRID, 4, 100000)
    capped = voxelize_numpy(points, GRID, 4, 50)
    assert len(capped[1]) == 50
    np.testing.assert_array_equal(capped[1], full[1][:50])


def test_nonfinite_points_are_dropped():
    points = np.array([[0.1, 0.1, 0.1, 1.0], [np.nan, 0.0, 0.0, 1.0], [np.inf, 0.0, 0.0, 1.0]], np.float32)
    _, coords, num_points = Voxelizer(GRID, 4, 10, backend="numpy")(points)
    assert len(coords) == 1 and num_points.tolist() == [1]


@needs_spconv
@pytest.mark.parametrize("max_points, max_voxels", [(5, 100000), (2, 300)])
def test_backends_agree(max_points, max_voxels):
    points = _cloud(20000, seed=max_points)
    by_numpy = sort_voxels(*Voxelizer(GRID, max_points, max_voxels, backend="numpy")(points), GRID)
    by_spconv = sort_voxels(*Voxelizer(GRID, max_points, max_voxels, backend="spconv")(points), GRID)
    assert len(by_numpy[1]) > 100
    for a, b in zip(by_numpy, by_spconv):
        np.testing.assert_array_equal(a, b)


@needs_spconv
def test_spconv_voxelizer_reusable_and_picklable():
    import pickle

    voxelizer = Voxelizer(GRID, 5, 1000, backend="spconv")
    first = voxelizer(_cloud(500, seed=3))
    voxelizer(_cloud(500, seed=4))
    again = pickle.loads(pickle.dumps(voxelizer))(_cloud(500, seed=3))
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)


def test_auto_backend_and_bad_input():
    assert Voxelizer(GRID, 4, 10).backend == ("spconv" if spconv_available() else "numpy")
    with pytest.raises(ValueError, match="backend"):
        Voxelizer(GRID, 4, 10, backend="cuda")
    with pytest.raises(ValueError, match="shape"):
        Voxelizer(GRID, 4, 10, backend="numpy")(np.zeros((3,), np.float32))


@pytest.mark.parametrize("backend", ["numpy", pytest.param("spconv", marks=needs_spconv)])
def test_empty_and_out_of_range_clouds_give_no_voxels(backend):
    voxelizer = Voxelizer(GRID, 4, 10, backend=backend)
    for points in (np.zeros((0, 4), np.float32), np.full((3, 4), 100.0, np.float32)):
        voxels, coords, num_points = voxelizer(points)
        assert voxels.shape == (0, 4, 4) and coords.shape == (0, 3) and num_points.shape == (0,)
        assert coords.dtype == num_points.dtype == np.int32
