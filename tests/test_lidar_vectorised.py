"""The vectorised ray caster gives exactly the hits of the box-by-box loop it replaced."""
from __future__ import annotations

import numpy as np
import pytest

from turbotrain.data.synth import lidar
from turbotrain.data.synth.generate import resolve_config
from turbotrain.geometry import box_corners_bev, wrap_angle


# ---- the implementation before vectorisation (commit 86e028f), kept as the oracle

def _reference_intersect(directions, box):
    c, s = np.cos(box[6]), np.sin(box[6])
    origin = -np.array([box[0] * c + box[1] * s, -box[0] * s + box[1] * c, box[2]])
    local = np.stack([directions[..., 0] * c + directions[..., 1] * s,
                      -directions[..., 0] * s + directions[..., 1] * c, directions[..., 2]], axis=-1)
    half = box[3:6] / 2.0
    safe = np.where(np.abs(local) < 1e-12, 1e-12, local)
    t1, t2 = (-half - origin) / safe, (half - origin) / safe
    t_min, t_max = np.minimum(t1, t2), np.maximum(t1, t2)
    t_near, t_far = t_min.max(axis=-1), t_max.min(axis=-1)
    hit = (t_near <= t_far) & (t_near > 0.0)
    face = np.argmax(t_min, axis=-1)
    return np.where(hit, t_near, np.inf), np.abs(np.take_along_axis(local, face[..., None], axis=-1)[..., 0])


def _reference_columns(box, spec):
    if float(np.hypot(box[0], box[1])) - 0.5 * float(np.hypot(box[3], box[4])) > spec.max_range:
        return None
    c, s = np.cos(box[6]), np.sin(box[6])
    if abs(-(box[0] * c + box[1] * s)) <= box[3] / 2.0 and abs(-(-box[0] * s + box[1] * c)) <= box[4] / 2.0:
        return None
    corners = box_corners_bev(box)[0]
    centre = np.arctan2(box[1], box[0])
    offsets = wrap_angle(np.arctan2(corners[:, 1], corners[:, 0]) - centre)
    step = 2.0 * np.pi / spec.columns
    first = int(np.floor((centre + offsets.min() + np.pi) / step))
    last = int(np.ceil((centre + offsets.max() + np.pi) / step))
    return np.arange(first, last + 1) % spec.columns


def _reference_cast(spec, boxes, materials, ground_z):
    directions = spec.directions()
    distance, material, cos_incidence = lidar._ground_hits(directions, ground_z, spec.max_range)
    for box, box_material in zip(np.asarray(boxes, dtype=np.float64).reshape(-1, 7), materials):
        columns = _reference_columns(box, spec)
        if columns is None:
            continue
        t, cos_box = _reference_intersect(directions[:, columns], box)
        nearer = t < distance[:, columns]
        distance[:, columns] = np.where(nearer, t, distance[:, columns])
        material[:, columns] = np.where(nearer, box_material, material[:, columns])
        cos_incidence[:, columns] = np.where(nearer, cos_box, cos_incidence[:, columns])
    return lidar.RayHits(distance, material, cos_incidence)


def _random_boxes(rng, count, spread):
    centres = rng.uniform(-spread, spread, (count, 2))
    sizes = rng.uniform([0.5, 0.5, 1.0], [12.0, 8.0, 10.0], (count, 3))
    return np.column_stack([centres, sizes[:, 2] / 2 - 1.8, sizes, rng.uniform(-np.pi, np.pi, count)])


def _assert_same_hits(got, want):
    np.testing.assert_array_equal(got.distance, want.distance)
    np.testing.assert_array_equal(got.material, want.material)
    np.testing.assert_array_equal(got.cos_incidence, want.cos_incidence)


@pytest.mark.parametrize("seed", range(6))
def test_vectorised_cast_equals_box_loop(seed):
    rng = np.random.default_rng(seed)
    spec = resolve_config("default").infrastructure_lidar if seed % 2 else resolve_config("default").vehicle_lidar
    boxes = _random_boxes(rng, 60, 130.0)  # some beyond max_range
    boxes[0, :2] = 0.0  # one box around the sensor: skipped
    boxes[1] = boxes[2]  # two identical boxes: the first one wins the tie
    materials = rng.integers(1, 4, len(boxes))
    want = _reference_cast(spec, boxes, materials, ground_z=-1.8)
    got = lidar.cast_rays(spec, boxes, materials, ground_z=-1.8)
    _assert_same_hits(got, want)
    assert np.isfinite(got.distance).any() and (got.material > lidar.GROUND).any()


def test_tie_goes_to_the_first_box_and_a_level_ray_hits_the_near_face():
    spec = lidar.LidarSpec(beams=3, vertical_fov=(-10.0, 10.0), horizontal_resolution=5.0)
    box = np.array([10.0, 0.0, 0.0, 2.0, 2.0, 4.0, 0.0])  # near face at x = 9
    hits = lidar.cast_rays(spec, np.stack([box, box]), np.array([lidar.VEHICLE, lidar.PEDESTRIAN]), ground_z=None)
    hit = np.isfinite(hits.distance)
    assert np.all(hits.material[hit] == lidar.VEHICLE) and np.all(hits.material[~hit] == lidar.NO_HIT)
    straight_ahead = spec.columns // 2  # azimuth 0 on the level (middle) beam
    assert hits.distance[1, straight_ahead] == 9.0 and hits.cos_incidence[1, straight_ahead] == 1.0
    assert hit.sum() == 3 * 3  # the box spans +-6.3 degrees of azimuth: columns -5, 0, 5 on each beam


def test_no_boxes_gives_the_ground_only():
    spec = lidar.LidarSpec(beams=4)
    hits = lidar.cast_rays(spec, np.zeros((0, 7)), np.zeros(0, np.int64), ground_z=-2.0)
    assert set(np.unique(hits.material)) <= {lidar.NO_HIT, lidar.GROUND}
