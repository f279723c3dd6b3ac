"""A spinning LiDAR simulated by vectorised ray casting against the ground plane and oriented boxes.

Rays form a regular grid of ``beams`` elevations x ``360 / horizontal_resolution`` azimuths in the
sensor frame. Each box (a vehicle, pedestrian, parked car or building) is intersected with the
slab method in the box's own frame; only the azimuth columns the box can cover are tested, all
(box, column) pairs in one array operation. The nearest hit per ray wins, so near objects occlude
far ones. Range noise, random dropout and an intensity that depends
on the surface material and the incidence angle make the clouds look like sensor data.

The sensor pose may only carry a yaw (roll = pitch = 0): the scene's ground is flat and every
sensor is mounted level, which lets boxes move into the sensor frame with
:func:`turbotrain.geometry.transform_boxes`.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from turbotrain.geometry import box_corners_bev, pose_to_matrix, transform_boxes, wrap_angle

GROUND, BUILDING, VEHICLE, PEDESTRIAN = 0, 1, 2, 3
MATERIAL_OF_TYPE = {"car": VEHICLE, "truck": VEHICLE, "pedestrian": PEDESTRIAN, "building": BUILDING}
# Diffuse reflectivity per material: asphalt is dark, car paint and plates bright.
REFLECTIVITY = np.array([0.12, 0.35, 0.6, 0.3])
NO_HIT = -1


@dataclass(frozen=True)
class LidarSpec:
    """Sensor model; angles in degrees, distances in metres."""

    beams: int = 16
    vertical_fov: tuple[float, float] = (-15.0, 5.0)
    horizontal_resolution: float = 0.6
    max_range: float = 100.0
    min_range: float = 1.0
    range_noise: float = 0.02  # Gaussian sigma
    dropout: float = 0.02  # probability that a return is lost
    intensity_noise: float = 0.02

    def __post_init__(self):
        if self.beams < 1 or self.horizontal_resolution <= 0 or self.max_range <= self.min_range:
            raise ValueError(f"invalid LiDAR spec {self}")
        if not 0.0 <= self.dropout < 1.0 or self.range_noise < 0 or self.intensity_noise < 0:
            raise ValueError(f"dropout must be in [0, 1) and noise >= 0, got {self}")

    @property
    def columns(self) -> int:
        return int(round(360.0 / self.horizontal_resolution))

    def elevations(self) -> np.ndarray:
        return np.radians(np.linspace(self.vertical_fov[0], self.vertical_fov[1], self.beams))

    def azimuths(self) -> np.ndarray:
        """Column azimuths, uniformly spaced from -pi (so a column index is an angle / resolution)."""
        return -np.pi + np.arange(self.columns) * (2.0 * np.pi / self.columns)

    def directions(self) -> np.ndarray:
        """(beams, columns, 3) unit ray directions in the sensor frame (read-only, cached per spec)."""
        return _directions(self)


@functools.lru_cache(maxsize=8)
def _directions(spec: LidarSpec) -> np.ndarray:
    el, az = np.meshgrid(spec.elevations(), spec.azimuths(), indexing="ij")
    out = np.stack([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)], axis=-1)
    out.flags.writeable = False
    return out


@dataclass
class RayHits:
    """Per ray: distance to the nearest surface (``inf`` if none), its material and |cos incidence|."""

    distance: np.ndarray  # (B, C)
    material: np.ndarray  # (B, C) int, NO_HIT where nothing was hit
    cos_incidence: np.ndarray  # (B, C)


def cast_rays(spec: LidarSpec, boxes: np.ndarray, materials: np.ndarray, ground_z: float | None) -> RayHits:
    """Nearest hits of the sensor's rays (origin at 0) with ``boxes`` (sensor frame) and the ground.

    ``ground_z`` is the ground plane's height in the sensor frame (``None``: no ground). Boxes that
    contain the sensor are skipped: a sensor does not see its own mount. All (box, column) pairs are
    intersected at once; per ray the nearest box wins, ties to the lower box index, and a box must be
    strictly nearer than the ground -- the order a box-by-box loop would give.
    """
    directions = spec.directions()
    distance, material, cos_incidence = _ground_hits(directions, ground_z, spec.max_range)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 7)
    pair_box, pair_column = _box_columns(boxes, spec)
    if len(pair_box) == 0:
        return RayHits(distance, material, cos_incidence)
    t, cos_box = intersect_box(directions[:, pair_column], boxes[pair_box])  # (beams, pairs)
    beams = np.arange(directions.shape[0])[:, None]
    columns = np.broadcast_to(pair_column, t.shape)
    nearest = np.full(distance.shape, np.inf)
    np.minimum.at(nearest, (beams, columns), t)
    # The winning pair of a ray: the first (lowest box index) whose distance is the nearest.
    winner = np.full(distance.shape, len(pair_box))
    is_nearest = np.isfinite(t) & (t == nearest[beams, columns])
    pair_index = np.broadcast_to(np.arange(len(pair_box)), t.shape)
    np.minimum.at(winner, (np.broadcast_to(beams, t.shape)[is_nearest], columns[is_nearest]), pair_index[is_nearest])
    hit = nearest < distance
    hit_beam, hit_column = np.nonzero(hit)
    pair = winner[hit]
    distance[hit] = nearest[hit]
    material[hit] = np.asarray(materials, dtype=np.int64)[pair_box[pair]]
    cos_incidence[hit] = cos_box[hit_beam, pair]
    return RayHits(distance, material, cos_incidence)


def _ground_hits(directions: np.ndarray, ground_z: float | None, max_range: float):
    shape = directions.shape[:2]
    distance = np.full(shape, np.inf)
    material = np.full(shape, NO_HIT, dtype=np.int64)
    cos_incidence = np.zeros(shape)
    if ground_z is None or ground_z >= 0:
        return distance, material, cos_incidence
    down = directions[..., 2] < 0
    t = np.where(down, ground_z / np.where(down, directions[..., 2], -1.0), np.inf)
    hit = t <= max_range
    distance[hit] = t[hit]
    material[hit] = GROUND
    cos_incidence[hit] = np.abs(directions[..., 2][hit])
    return distance, material, cos_incidence


def intersect_box(directions: np.ndarray, box: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Slab-method entry distance of rays from the origin into boxes, and |cos incidence|.

    ``directions`` (..., 3) and ``box`` (..., 7) broadcast against each other (one box for all rays,
    or one box per ray column). Returns ``inf`` for rays that miss the box or start inside it.
    """
    box = np.asarray(box, dtype=np.float64)
    c, s = np.cos(box[..., 6]), np.sin(box[..., 6])
    origin = -np.stack([box[..., 0] * c + box[..., 1] * s, -box[..., 0] * s + box[..., 1] * c, box[..., 2]], axis=-1)
    local = np.stack(
        [directions[..., 0] * c + directions[..., 1] * s, -directions[..., 0] * s + directions[..., 1] * c, directions[..., 2]],
        axis=-1,
    )
    half = box[..., 3:6] / 2.0
    # A zero direction component never leaves its slab; a tiny stand-in gives +-inf slab bounds.
    safe = np.where(np.abs(local) < 1e-12, 1e-12, local)
    t1, t2 = (-half - origin) / safe, (half - origin) / safe
    t_min, t_max = np.minimum(t1, t2), np.maximum(t1, t2)
    t_near, t_far = t_min.max(axis=-1), t_max.min(axis=-1)
    hit = (t_near <= t_far) & (t_near > 0.0)
    face = np.argmax(t_min, axis=-1)
    cos_incidence = np.abs(np.take_along_axis(local, face[..., None], axis=-1)[..., 0])
    return np.where(hit, t_near, np.inf), cos_incidence


def _box_columns(boxes: np.ndarray, spec: LidarSpec) -> tuple[np.ndarray, np.ndarray]:
    """(box index, azimuth column) of every column each box can cover, boxes in index order.

    Boxes out of range or containing the sensor cover none.
    """
    reach = np.hypot(boxes[:, 0], boxes[:, 1]) - 0.5 * np.hypot(boxes[:, 3], boxes[:, 4])
    seen = np.flatnonzero((reach <= spec.max_range) & ~_contains_origin(boxes))
    corners = box_corners_bev(boxes[seen])
    centre_angle = np.arctan2(boxes[seen, 1], boxes[seen, 0])
    # A footprint that does not contain the sensor spans less than pi around its centre's azimuth.
    offsets = wrap_angle(np.arctan2(corners[..., 1], corners[..., 0]) - centre_angle[:, None])
    step = 2.0 * np.pi / spec.columns
    first = np.floor((centre_angle + offsets.min(axis=1) + np.pi) / step).astype(np.int64)
    last = np.ceil((centre_angle + offsets.max(axis=1) + np.pi) / step).astype(np.int64)
    counts = last - first + 1
    pair_box = np.repeat(seen, counts)
    within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    return pair_box, (np.repeat(first, counts) + within) % spec.columns


def _contains_origin(boxes: np.ndarray) -> np.ndarray:
    c, s = np.cos(boxes[:, 6]), np.sin(boxes[:, 6])
    local_x, local_y = -(boxes[:, 0] * c + boxes[:, 1] * s), -(-boxes[:, 0] * s + boxes[:, 1] * c)
    return (np.abs(local_x) <= boxes[:, 3] / 2.0) & (np.abs(local_y) <= boxes[:, 4] / 2.0)


def returns_from_hits(hits: RayHits, spec: LidarSpec, rng: np.random.Generator) -> np.ndarray:
    """(N, 4) float32 ``x, y, z, intensity`` in the sensor frame, after noise and dropout.

    The noise arrays are drawn for every ray, hit or not, so the random stream a scan consumes does
    not depend on the scene.
    """
    shape = hits.distance.shape
    range_noise = rng.normal(0.0, 1.0, shape) * spec.range_noise
    kept = rng.random(shape) >= spec.dropout
    intensity_noise = rng.normal(0.0, 1.0, shape) * spec.intensity_noise
    distance = hits.distance + range_noise
    valid = np.isfinite(hits.distance) & kept & (distance >= spec.min_range) & (distance <= spec.max_range)
    xyz = spec.directions()[valid] * distance[valid][:, None]
    reflectivity = REFLECTIVITY[hits.material[valid]]
    intensity = np.clip(reflectivity * (0.3 + 0.7 * hits.cos_incidence[valid]) + intensity_noise[valid], 0.0, 1.0)
    return np.concatenate([xyz, intensity[:, None]], axis=1).astype(np.float32)


def scan(spec: LidarSpec, pose: np.ndarray, boxes: np.ndarray, materials: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One sweep of a level sensor at OpenCOOD ``pose`` over map-frame ``boxes`` on the ground ``z = 0``."""
    pose = np.asarray(pose, dtype=np.float64)
    if abs(pose[3]) > 1e-9 or abs(pose[5]) > 1e-9:
        raise ValueError(f"the simulated LiDAR must be mounted level (roll = pitch = 0), got pose {pose.tolist()}")
    to_sensor = np.linalg.inv(pose_to_matrix(pose))
    boxes_sensor = transform_boxes(boxes, to_sensor)
    hits = cast_rays(spec, boxes_sensor, np.asarray(materials), ground_z=-float(pose[2]))
    return returns_from_hits(hits, spec, rng)
