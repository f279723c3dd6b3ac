"""Arc-length parameterised 2D paths: the centrelines vehicles drive and pedestrians walk along.

Paths are resampled at a fixed spacing so that a position along the path (arc length ``s``) maps to
an array index by division; look-ups inside the simulation loop are then cheap index arithmetic.
Beyond either end a path continues as a straight line along its end heading, so an object that
overshoots the end in its last step still moves continuously.
"""
from __future__ import annotations

import numpy as np

from turbotrain.geometry import wrap_angle

SPACING = 0.25  # metres between resampled points: fine enough that linear interpolation is smooth


class Polyline:
    """A 2D path with arc length ``s``, heading (rad, CCW from +x) and curvature (1/m) per point."""

    def __init__(self, points: np.ndarray, spacing: float = SPACING):
        points = _drop_repeats(np.asarray(points, dtype=np.float64).reshape(-1, 2))
        if len(points) < 2:
            raise ValueError("a path needs at least two distinct points")
        along = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(points, axis=0), axis=1))])
        self.length = float(along[-1])
        count = max(int(np.ceil(self.length / spacing)), 1) + 1
        self.s = np.linspace(0.0, self.length, count)
        self.spacing = self.length / (count - 1)
        self.xy = np.stack([np.interp(self.s, along, points[:, 0]), np.interp(self.s, along, points[:, 1])], axis=1)
        tangent = np.gradient(self.xy, self.s, axis=0)
        self.heading_unwrapped = np.unwrap(np.arctan2(tangent[:, 1], tangent[:, 0]))
        self.curvature = np.gradient(self.heading_unwrapped, self.s) if count > 2 else np.zeros(count)

    def position(self, s: float | np.ndarray) -> np.ndarray:
        """(..., 2) points at arc length ``s``; linear extrapolation beyond the ends."""
        s = np.asarray(s, dtype=np.float64)
        inside = np.clip(s, 0.0, self.length)
        xy = np.stack([np.interp(inside, self.s, self.xy[:, 0]), np.interp(inside, self.s, self.xy[:, 1])], axis=-1)
        beyond = (s - inside)[..., None]
        return xy + beyond * self._unit(self.heading(inside))

    def heading(self, s: float | np.ndarray) -> np.ndarray:
        """Heading (rad, wrapped) at arc length ``s``; constant beyond the ends."""
        inside = np.clip(np.asarray(s, dtype=np.float64), 0.0, self.length)
        return wrap_angle(np.interp(inside, self.s, self.heading_unwrapped))

    @staticmethod
    def _unit(angle: np.ndarray) -> np.ndarray:
        return np.stack([np.cos(angle), np.sin(angle)], axis=-1)


def _drop_repeats(points: np.ndarray) -> np.ndarray:
    keep = np.concatenate([[True], np.linalg.norm(np.diff(points, axis=0), axis=1) > 1e-9])
    return points[keep]


def cubic_bezier(p0, p1, p2, p3, count: int = 40) -> np.ndarray:
    """(count, 2) points of a cubic Bezier curve; its end tangents follow p0->p1 and p2->p3."""
    t = np.linspace(0.0, 1.0, count)[:, None]
    p0, p1, p2, p3 = (np.asarray(p, dtype=np.float64) for p in (p0, p1, p2, p3))
    return (1 - t) ** 3 * p0 + 3 * (1 - t) ** 2 * t * p1 + 3 * (1 - t) * t**2 * p2 + t**3 * p3


def connector(start: np.ndarray, start_heading: float, end: np.ndarray, end_heading: float) -> np.ndarray:
    """A smooth curve joining two lane ends with matching headings (straight, or a turn).

    For a symmetric turn the control arms ``4/3 tan(turn/4) R`` make the Bezier the standard
    approximation of a circular arc of radius ``R``, so curvature is near constant through the turn
    (what a kinematic bicycle at fixed steering drives).
    """
    start, end = np.asarray(start, dtype=np.float64), np.asarray(end, dtype=np.float64)
    turn = abs(float(wrap_angle(end_heading - start_heading)))
    if turn < 1e-3:  # straight through: a line is the exact answer
        return np.stack([start, end])
    radius = np.linalg.norm(end - start) / (2.0 * np.sin(turn / 2.0))
    arm = 4.0 / 3.0 * np.tan(turn / 4.0) * radius
    d0 = np.array([np.cos(start_heading), np.sin(start_heading)])
    d1 = np.array([np.cos(end_heading), np.sin(end_heading)])
    return cubic_bezier(start, start + arm * d0, end - arm * d1, end)


def fillet(points: np.ndarray, radius: float, count: int = 8) -> np.ndarray:
    """Round every interior corner of a polyline with a quadratic Bezier of ``radius`` legs.

    Pedestrian routes are drawn as corner-to-corner polylines; rounding keeps their heading
    continuous so the walker's yaw turns over a few steps instead of jumping.
    """
    points = np.asarray(points, dtype=np.float64)
    out = [points[0]]
    for prev, corner, nxt in zip(points[:-2], points[1:-1], points[2:]):
        leg_in = min(radius, 0.5 * np.linalg.norm(corner - prev))
        leg_out = min(radius, 0.5 * np.linalg.norm(nxt - corner))
        a = corner + leg_in * _unit_vector(prev - corner)
        b = corner + leg_out * _unit_vector(nxt - corner)
        t = np.linspace(0.0, 1.0, count)[:, None]
        out.extend((1 - t) ** 2 * a + 2 * (1 - t) * t * corner + t**2 * b)
    out.append(points[-1])
    return np.asarray(out)


def offset_right(points: np.ndarray, distance: float) -> np.ndarray:
    """Shift a densely sampled polyline ``distance`` metres to the right of its direction of travel."""
    points = np.asarray(points, dtype=np.float64)
    tangent = np.gradient(points, axis=0)
    tangent /= np.maximum(np.linalg.norm(tangent, axis=1, keepdims=True), 1e-12)
    right = np.stack([tangent[:, 1], -tangent[:, 0]], axis=1)
    return points + distance * right


def _unit_vector(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-12)
