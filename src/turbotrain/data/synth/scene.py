"""Static scene layouts: lanes, routes, crosswalks, signals, buildings, parked cars, sensor poles.

Map frame: right-handed, x east, y north, z up, ground plane ``z = 0``; traffic drives on the right.
Two layouts are drawn from a scenario's generator:

* ``intersection``: a 4-way crossing of an x-road and a y-road centred at the origin, one lane per
  direction, straight / left / right connectors, four crosswalks that join the four kerb corners,
  two signal groups (0 = x-road, 1 = y-road).
* ``corridor``: a straight x-road with a mid-block signalised crosswalk (group 0 = vehicles,
  group 1 = pedestrians).

Every road is ``lane_width`` per lane plus a parking strip per side, then a sidewalk, then a building
frontage; parked cars and buildings are the static occluders.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from turbotrain.data.records import Lane
from turbotrain.data.synth.polyline import Polyline, connector, fillet, offset_right
from turbotrain.geometry import wrap_angle

SCENE_KINDS = ("intersection", "corridor")
PARKED_CAR_SIZE = (4.5, 1.9, 1.6)
CONFLICT_DISTANCE = 2.6  # m between connector centrelines below which two cars would touch
RoadGroup = Callable[[np.ndarray], np.ndarray]  # (N, 2) points -> signal group letting walkers cross, -1 off-road


@dataclass(frozen=True)
class SceneParams:
    """Geometry knobs of the layouts (metres unless stated)."""

    intersection_share: float = 0.6  # probability that a scenario is an intersection
    arm_length: float = 100.0  # intersection: centre to arm end; corridor: half its length
    lane_width: float = 3.5
    parking_width: float = 2.5
    sidewalk_width: float = 3.0
    building_depth: tuple[float, float] = (10.0, 20.0)
    building_frontage: tuple[float, float] = (10.0, 30.0)
    building_height: tuple[float, float] = (5.0, 20.0)
    building_gap: tuple[float, float] = (1.0, 10.0)
    parking_slot: float = 6.5
    parking_occupancy: float = 0.45
    green_s: tuple[float, float] = (8.0, 14.0)  # per signal group, drawn per scenario
    clearance_s: float = 2.5  # all-red between groups
    corridor_walk_s: tuple[float, float] = (6.0, 9.0)

    @property
    def road_half_width(self) -> float:
        return self.lane_width + self.parking_width

    @property
    def sidewalk_centre(self) -> float:
        return self.road_half_width + self.sidewalk_width / 2.0

    @property
    def stop_distance(self) -> float:
        """Distance of a stop line from the crosswalk's centre line (1 m before its far edge)."""
        return self.sidewalk_width / 2.0 + 1.0


@dataclass(frozen=True)
class SignalPlan:
    """Fixed-time signal: groups get green in turn, separated by an all-red clearance."""

    green_s: tuple[float, ...]
    clearance_s: float
    offset_s: float

    @property
    def cycle_s(self) -> float:
        return float(sum(self.green_s) + len(self.green_s) * self.clearance_s)

    def green_remaining(self, group: int, t: float) -> float:
        """Seconds of green left for ``group`` at time ``t`` (0 when it is not green)."""
        phase = (t + self.offset_s) % self.cycle_s
        start = 0.0
        for g, green in enumerate(self.green_s):
            if g == group and start <= phase < start + green:
                return start + green - phase
            start += green + self.clearance_s
        return 0.0

    def is_green(self, group: int, t: float) -> bool:
        return self.green_remaining(group, t) > 0.0


@dataclass(frozen=True)
class Crossing:
    """A stretch of a walk route that is on the carriageway (arc lengths along the route)."""

    start_s: float
    end_s: float
    walk_group: int  # signal group during which pedestrians may start crossing


@dataclass
class VehicleRoute:
    """A drivable path from a scene entry to a scene exit, with its stop line and reserved stretch."""

    index: int
    entry: int  # spawn point id: routes sharing it start on the same lane
    path: Polyline
    turn: str  # straight | left | right
    signal_group: int
    stop_s: float  # front bumper stops here on red
    reserve_end_s: float  # the conflict zone ends here (the vehicle's rear must pass it)


@dataclass
class WalkRoute:
    index: int
    entry: int
    path: Polyline
    crossings: list[Crossing]


@dataclass
class Scene:
    kind: str
    params: SceneParams
    lanes: list[Lane]
    vehicle_routes: list[VehicleRoute]
    walk_routes: list[WalkRoute]
    conflicts: np.ndarray  # (R, R) bool: routes whose reserved stretches overlap
    buildings: np.ndarray  # (K, 7) map-frame boxes
    parked: np.ndarray  # (P, 7) map-frame boxes of parked cars
    infrastructure_sites: np.ndarray  # (S, 3) x, y, yaw (rad), best first
    signals: SignalPlan
    entries: list[int] = field(default_factory=list)  # vehicle spawn point ids
    walk_entries: list[int] = field(default_factory=list)

    def routes_from(self, entry: int) -> list[VehicleRoute]:
        return [r for r in self.vehicle_routes if r.entry == entry]

    def walks_from(self, entry: int) -> list[WalkRoute]:
        return [r for r in self.walk_routes if r.entry == entry]


def build_scene(params: SceneParams, rng: np.random.Generator, kind: str | None = None) -> Scene:
    """The layout of ``kind`` (drawn from ``rng`` with ``intersection_share`` when ``None``)."""
    if kind is None:
        kind = "intersection" if rng.random() < params.intersection_share else "corridor"
    if kind not in SCENE_KINDS:
        raise ValueError(f"unknown scene kind {kind!r}; choose one of {SCENE_KINDS}")
    return build_intersection(params, rng) if kind == "intersection" else build_corridor(params, rng)


def stratified_kinds(count: int, intersection_share: float, rng: np.random.Generator) -> list[str]:
    """Kinds for ``count`` scenarios with exactly ``round(share * count)`` intersections, shuffled,
    so that even a small split holds the mix the share asks for."""
    intersections = int(round(intersection_share * count))
    kinds = ["intersection"] * intersections + ["corridor"] * (count - intersections)
    return [kinds[i] for i in rng.permutation(count)]


# ----------------------------------------------------------------------------- intersection

ARM_ANGLES = np.radians([0.0, 90.0, 180.0, 270.0])  # east, north, west, south (outward direction)


def _arm_frame(arm: int) -> tuple[np.ndarray, np.ndarray]:
    """Outward unit vector ``u`` of an arm and ``n``, its left normal (the inbound lane's side)."""
    phi = ARM_ANGLES[arm]
    return np.array([np.cos(phi), np.sin(phi)]), np.array([-np.sin(phi), np.cos(phi)])


def build_intersection(params: SceneParams, rng: np.random.Generator) -> Scene:
    """4-way signalised intersection at the origin (see module docstring)."""
    routes, lanes = _intersection_routes(params)
    conflicts = _route_conflicts(routes)
    crosswalks = _intersection_crosswalks(params)
    lanes += [Lane(lane_id=len(lanes) + i, centerline=cw, kind="crosswalk") for i, cw in enumerate(crosswalks)]
    walks = _intersection_walks(params, rng)
    buildings = np.concatenate([_frontage_boxes(params, rng, arm, side) for arm in range(4) for side in (1, -1)])
    parked = np.concatenate([_intersection_parking(params, rng, arm, side) for arm in range(4) for side in (1, -1)])
    corner = params.road_half_width + params.sidewalk_width + 0.5
    diagonal_first = rng.permutation([0, 2]) if rng.random() < 0.5 else rng.permutation([1, 3])
    order = list(diagonal_first) + [k for k in range(4) if k not in diagonal_first]
    sites = np.array([_corner_site(corner, k) for k in order])
    return Scene(
        kind="intersection", params=params, lanes=lanes, vehicle_routes=routes, walk_routes=walks,
        conflicts=conflicts, buildings=buildings, parked=parked, infrastructure_sites=sites,
        signals=_draw_signals(params, rng, groups=2), entries=list(range(4)),
        walk_entries=sorted({w.entry for w in walks}),
    )


def _corner_site(distance: float, corner: int) -> np.ndarray:
    """A pole on corner ``corner`` (NE, NW, SW, SE), facing the intersection centre."""
    angle = np.radians(45.0 + 90.0 * corner)
    xy = distance * np.sqrt(2.0) * np.array([np.cos(angle), np.sin(angle)])
    return np.array([xy[0], xy[1], float(wrap_angle(angle + np.pi))])


def _intersection_routes(params: SceneParams) -> tuple[list[VehicleRoute], list[Lane]]:
    """Every entry arm to every other arm, and the lane map (inbound, outbound, connectors)."""
    rh, half_lane, far = params.road_half_width, params.lane_width / 2.0, params.arm_length
    inbound, outbound, lanes = {}, {}, []
    for arm in range(4):
        u, n = _arm_frame(arm)
        inbound[arm] = np.stack([far * u + half_lane * n, rh * u + half_lane * n])
        outbound[arm] = np.stack([rh * u - half_lane * n, far * u - half_lane * n])
        lanes += [Lane(len(lanes), inbound[arm]), Lane(len(lanes) + 1, outbound[arm])]
    routes = []
    for entry in range(4):
        for exit_arm in range(4):
            if exit_arm == entry:
                continue
            in_heading = float(ARM_ANGLES[entry] + np.pi)
            turn_curve = connector(inbound[entry][1], in_heading, outbound[exit_arm][0], float(ARM_ANGLES[exit_arm]))
            lanes.append(Lane(len(lanes), turn_curve))
            path = Polyline(np.concatenate([inbound[entry][:1], turn_curve, outbound[exit_arm][1:]]))
            inbound_length = far - rh
            routes.append(VehicleRoute(
                index=len(routes), entry=entry, path=path, turn=_turn_name(entry, exit_arm),
                signal_group=entry % 2,
                stop_s=far - (params.sidewalk_centre + params.stop_distance),
                reserve_end_s=inbound_length + _curve_length(turn_curve),
            ))
    return routes, lanes


def _turn_name(entry: int, exit_arm: int) -> str:
    return {2: "straight", 3: "left", 1: "right"}[(exit_arm - entry) % 4]


def _curve_length(points: np.ndarray) -> float:
    return float(np.linalg.norm(np.diff(points, axis=0), axis=1).sum())


def _route_conflicts(routes: list[VehicleRoute]) -> np.ndarray:
    """Routes from different entries whose reserved stretches come closer than two car widths."""
    zones = [_reserved_points(r) for r in routes]
    conflicts = np.zeros((len(routes), len(routes)), dtype=bool)
    for i, a in enumerate(routes):
        for j, b in enumerate(routes):
            if a.entry == b.entry or j <= i:
                continue  # same-lane routes queue behind each other: car following handles them
            gap = np.min(np.linalg.norm(zones[i][:, None] - zones[j][None], axis=-1))
            conflicts[i, j] = conflicts[j, i] = gap < CONFLICT_DISTANCE
    return conflicts


def _reserved_points(route: VehicleRoute) -> np.ndarray:
    keep = (route.path.s >= route.stop_s) & (route.path.s <= route.reserve_end_s)
    return route.path.xy[keep]


def _intersection_crosswalks(params: SceneParams) -> list[np.ndarray]:
    c = params.sidewalk_centre
    corners = [_corner_point(c, k) for k in range(4)]
    return [np.stack([corners[k], corners[(k + 1) % 4]]) for k in range(4)]


def _corner_point(c: float, corner: int) -> np.ndarray:
    angle = np.radians(45.0 + 90.0 * corner)
    return c * np.sqrt(2.0) * np.array([np.cos(angle), np.sin(angle)])


def _intersection_walks(params: SceneParams, rng: np.random.Generator) -> list[WalkRoute]:
    """Sidewalk end -> corner -> 0..2 crosswalks around the corner ring -> another sidewalk end.

    Corner k (NE, NW, SW, SE) touches arms k and k+1; the crosswalk from corner k to k+1 crosses
    arm k+1.
    """
    c, far = params.sidewalk_centre, params.arm_length
    walks: list[WalkRoute] = []
    for start_corner in range(4):
        for start_arm in (start_corner, (start_corner + 1) % 4):
            entry = 2 * start_corner + (start_arm != start_corner)
            for crossings, direction in ((0, 1), (1, 1), (1, -1), (2, 1), (2, -1)):
                ring = [(start_corner + direction * i) % 4 for i in range(crossings + 1)]
                end_corner = ring[-1]
                for end_arm in (end_corner, (end_corner + 1) % 4):
                    if crossings == 0 and end_arm == start_arm:
                        continue  # a U-turn on the same sidewalk
                    waypoints = [_sidewalk_end(c, far, start_corner, start_arm)]
                    waypoints += [_corner_point(c, k) for k in ring]
                    waypoints.append(_sidewalk_end(c, far, end_corner, end_arm))
                    path = _walk_path(np.array(waypoints), rng)
                    walks.append(WalkRoute(len(walks), entry, path, _crossings(path, _intersection_walk_group(params))))
    return walks


def _sidewalk_end(c: float, far: float, corner: int, arm: int) -> np.ndarray:
    """Far end of the sidewalk that runs from ``corner`` outwards along ``arm``."""
    u, _ = _arm_frame(arm)
    corner_xy = _corner_point(c, corner)
    lateral = corner_xy - np.dot(corner_xy, u) * u
    return far * u + lateral


def _walk_path(waypoints: np.ndarray, rng: np.random.Generator) -> Polyline:
    """Rounded corners, then a keep-right offset so walkers in opposite directions pass side by side."""
    rounded = Polyline(fillet(waypoints, radius=1.5))
    return Polyline(offset_right(rounded.xy, float(rng.uniform(0.4, 1.1))))


def _intersection_walk_group(params: SceneParams) -> RoadGroup:
    rh = params.road_half_width

    def group(xy: np.ndarray) -> np.ndarray:
        # Crossing the x-road is safe while the y-road (group 1) has green, and vice versa.
        on_x_road, on_y_road = np.abs(xy[:, 1]) < rh, np.abs(xy[:, 0]) < rh
        return np.where(on_x_road, 1, np.where(on_y_road, 0, -1))

    return group


def _crossings(path: Polyline, road_group: RoadGroup) -> list[Crossing]:
    """Contiguous carriageway stretches of a walk route and the signal group that lets them go."""
    group = road_group(path.xy)
    on_road = group >= 0
    edges = np.flatnonzero(np.diff(on_road.astype(np.int8)))
    starts = [0] if on_road[0] else []
    starts += [e + 1 for e in edges if not on_road[e]]
    crossings = []
    for start in starts:
        end = start
        while end + 1 < len(on_road) and on_road[end + 1]:
            end += 1
        crossings.append(Crossing(float(path.s[start]), float(path.s[end]), int(group[start])))
    return crossings


def _frontage_boxes(params: SceneParams, rng: np.random.Generator, arm: int, side: int) -> np.ndarray:
    """Buildings along one side of one intersection arm, from the corner lot outwards."""
    u, n = _arm_frame(arm)
    setback = params.road_half_width + params.sidewalk_width
    return _frontage(params, rng, np.zeros(2), u, side * n, start=setback + 0.5, end=params.arm_length, setback=setback)


def _frontage(
    params: SceneParams, rng: np.random.Generator, origin: np.ndarray, u: np.ndarray, n: np.ndarray,
    start: float, end: float, setback: float,
) -> np.ndarray:
    """A row of buildings along ``u`` from ``start`` to ``end``, their fronts ``setback`` + 0..2 m off."""
    boxes, along = [], start
    while along < end:
        frontage = rng.uniform(*params.building_frontage)
        depth = rng.uniform(*params.building_depth)
        height = rng.uniform(*params.building_height)
        lateral = setback + rng.uniform(0.0, 2.0) + depth / 2.0
        centre = origin + (along + frontage / 2.0) * u + lateral * n
        boxes.append([centre[0], centre[1], height / 2.0, frontage, depth, height, np.arctan2(u[1], u[0])])
        along += frontage + rng.uniform(*params.building_gap)
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 7)


def _intersection_parking(params: SceneParams, rng: np.random.Generator, arm: int, side: int) -> np.ndarray:
    u, n = _arm_frame(arm)
    first = params.sidewalk_centre + params.stop_distance + 8.0  # keep the approach to the stop line clear
    heading = ARM_ANGLES[arm] + (np.pi if side > 0 else 0.0)  # parked with the flow of the adjacent lane
    return _parking_row(params, rng, np.zeros(2), u, side * n, first, params.arm_length, heading, skip=None)


def _parking_row(
    params: SceneParams, rng: np.random.Generator, origin: np.ndarray, u: np.ndarray, n: np.ndarray,
    start: float, end: float, heading: float, skip: tuple[float, float] | None,
) -> np.ndarray:
    """Parked cars in the parking strip, a slot every ``parking_slot`` m, each taken at random."""
    lateral = params.lane_width + params.parking_width / 2.0
    boxes = []
    for along in np.arange(start, end - params.parking_slot / 2.0, params.parking_slot):
        if rng.random() >= params.parking_occupancy or (skip is not None and skip[0] <= along <= skip[1]):
            continue
        size = np.asarray(PARKED_CAR_SIZE) * rng.uniform(0.92, 1.08, 3)
        centre = origin + (along + rng.uniform(-0.5, 0.5)) * u + (lateral + rng.uniform(-0.15, 0.15)) * n
        yaw = float(wrap_angle(heading + rng.normal(0.0, 0.03)))
        boxes.append([centre[0], centre[1], size[2] / 2.0, size[0], size[1], size[2], yaw])
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 7)


def _draw_signals(
    params: SceneParams, rng: np.random.Generator, groups: int, greens: tuple[float, ...] | None = None,
) -> SignalPlan:
    greens = tuple(float(rng.uniform(*params.green_s)) for _ in range(groups)) if greens is None else greens
    plan = SignalPlan(green_s=greens, clearance_s=params.clearance_s, offset_s=0.0)
    return SignalPlan(green_s=greens, clearance_s=params.clearance_s, offset_s=float(rng.uniform(0.0, plan.cycle_s)))


# ----------------------------------------------------------------------------- corridor


def build_corridor(params: SceneParams, rng: np.random.Generator) -> Scene:
    """Straight x-road with a signalised mid-block crosswalk at a random ``x``."""
    far, half_lane, c = params.arm_length, params.lane_width / 2.0, params.sidewalk_centre
    crosswalk_x = float(rng.uniform(-0.2, 0.2) * far)
    eastbound = np.array([[-far, -half_lane], [far, -half_lane]])
    westbound = np.array([[far, half_lane], [-far, half_lane]])
    half_walk = params.sidewalk_width / 2.0  # the crosswalk is as wide as a sidewalk
    # Arc length runs with x eastbound (s = x + far) and against it westbound (s = far - x).
    routes = [
        VehicleRoute(0, 0, Polyline(eastbound), "straight", 0, stop_s=far + crosswalk_x - params.stop_distance,
                     reserve_end_s=far + crosswalk_x + half_walk),
        VehicleRoute(1, 1, Polyline(westbound), "straight", 0, stop_s=far - crosswalk_x - params.stop_distance,
                     reserve_end_s=far - crosswalk_x + half_walk),
    ]
    crosswalk = np.array([[crosswalk_x, -c], [crosswalk_x, c]])
    lanes = [Lane(0, eastbound), Lane(1, westbound), Lane(2, crosswalk, kind="crosswalk")]
    walks = _corridor_walks(params, rng, crosswalk_x)
    setback = params.road_half_width + params.sidewalk_width
    east = np.array([1.0, 0.0])
    buildings = np.concatenate([
        _frontage(params, rng, np.array([-far, 0.0]), east, np.array([0.0, side]), 0.0, 2 * far, setback) for side in (1.0, -1.0)
    ])
    skip = (far + crosswalk_x - 10.0, far + crosswalk_x + 10.0)
    parked = np.concatenate([
        _parking_row(params, rng, np.array([-far, 0.0]), east, np.array([0.0, side]), 0.0, 2 * far, heading, skip)
        for side, heading in ((1.0, np.pi), (-1.0, 0.0))
    ])
    pole_y = setback + 0.5
    sites = np.array([
        [crosswalk_x - rng.uniform(15.0, 30.0), pole_y, -np.pi / 2],
        [crosswalk_x + rng.uniform(15.0, 30.0), -pole_y, np.pi / 2],
    ])
    green = float(rng.uniform(*params.green_s)) * 1.5
    walk = float(rng.uniform(*params.corridor_walk_s))
    return Scene(
        kind="corridor", params=params, lanes=lanes, vehicle_routes=routes, walk_routes=walks,
        conflicts=np.zeros((2, 2), dtype=bool), buildings=buildings, parked=parked,
        infrastructure_sites=sites[rng.permutation(2)],
        signals=_draw_signals(params, rng, groups=2, greens=(green, walk)), entries=[0, 1],
        walk_entries=sorted({w.entry for w in walks}),
    )


def _corridor_walks(params: SceneParams, rng: np.random.Generator, crosswalk_x: float) -> list[WalkRoute]:
    """From each sidewalk end: straight along, or over the crosswalk and either way on the far side."""
    far, c, rh = params.arm_length, params.sidewalk_centre, params.road_half_width

    def road_group(xy: np.ndarray) -> np.ndarray:
        return np.where(np.abs(xy[:, 1]) < rh, 1, -1)

    walks = []
    for entry, (x0, side) in enumerate(((-far, 1.0), (-far, -1.0), (far, 1.0), (far, -1.0))):
        options = [[(x0, side * c), (-x0, side * c)]]
        for x_end in (-far, far):
            options.append([(x0, side * c), (crosswalk_x, side * c), (crosswalk_x, -side * c), (x_end, -side * c)])
        for waypoints in options:
            path = _walk_path(np.array(waypoints), rng)
            walks.append(WalkRoute(len(walks), entry, path, _crossings(path, road_group)))
    return walks
