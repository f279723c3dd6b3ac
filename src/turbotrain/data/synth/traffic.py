"""Traffic at 10 Hz: cars, trucks and pedestrians moving along the scene's routes.

Every actor is a point moving along its route's centreline (arc length ``s``, speed ``v >= 0``); its
box centre is the path point and its yaw the path heading. Because routes are smooth (G1) curves
and connectors are near-circular arcs, this is a kinematic bicycle driving at the path's curvature:
pose and yaw are continuous, and speed changes only through bounded accelerations.

Longitudinal control is the Intelligent Driver Model (Treiber et al. 2000) against the nearest
obstacle ahead: a leader on the path, a red stop line, or a pedestrian on the crosswalk. A
lateral-acceleration limit on the curves ahead caps the acceleration, so vehicles slow for turns.
At the intersection a vehicle enters only on green *and* when no vehicle on a conflicting route
holds the junction (a first-come reservation), which keeps permissive turns collision-free.
Pedestrians walk with the same model (their own parameters), wait at the kerb until their crossing
has enough green left, and are given way to by vehicles.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from turbotrain.data.records import ObjectRecord
from turbotrain.data.synth.polyline import Polyline
from turbotrain.data.synth.scene import Scene, VehicleRoute, WalkRoute

OBJECT_SIZES = {"car": (4.5, 1.9, 1.6), "truck": (9.0, 2.5, 3.2), "pedestrian": (0.6, 0.6, 1.75)}
SIZE_JITTER = {"car": (0.08, 0.06, 0.08), "truck": (0.1, 0.03, 0.05), "pedestrian": (0.12, 0.12, 0.06)}
LOOKAHEAD_STEP = 0.5  # m between look-ahead samples of the leader search
DT = 0.1  # 10 Hz, the frame rate of the recorded data


@dataclass(frozen=True)
class DriverModel:
    """IDM parameters of one actor."""

    max_accel: float  # a (m/s^2)
    comfort_brake: float  # b (m/s^2)
    max_brake: float  # hard limit on deceleration
    headway_s: float  # T
    min_gap: float  # s0 (m)


@dataclass(frozen=True)
class TrafficParams:
    vehicle_rate: float = 0.1  # arrivals per second per entry lane
    pedestrian_rate: float = 0.02  # arrivals per second per sidewalk end
    truck_share: float = 0.12
    car_speed: tuple[float, float] = (8.0, 13.0)  # desired speeds, m/s
    truck_speed: tuple[float, float] = (6.0, 10.0)
    walk_speed: tuple[float, float] = (1.0, 1.7)
    turn_weights: tuple[float, float, float] = (0.5, 0.25, 0.25)  # straight, left, right
    max_lateral_accel: float = 2.5  # m/s^2, sets the speed through turns
    lookahead: float = 50.0  # m, vehicles; pedestrians look 6 m ahead
    initial_density: float = 1.0  # share of the steady-state population placed at t = 0


@dataclass
class Actor:
    track_id: int
    obj_type: str  # car | truck | pedestrian
    size: np.ndarray  # (3,) l, w, h
    route: VehicleRoute | WalkRoute
    s: float
    v: float
    v_desired: float
    driver: DriverModel
    persistent: bool = False  # connected vehicles stay for the whole recording
    committed: bool = False  # vehicles: holds the junction; pedestrians: may cross the next crossing
    next_crossing: int = 0

    @property
    def path(self) -> Polyline:
        return self.route.path

    @property
    def is_pedestrian(self) -> bool:
        return self.obj_type == "pedestrian"

    @property
    def front_s(self) -> float:
        return self.s + self.size[0] / 2.0

    def box(self) -> np.ndarray:
        """Map-frame ``[x, y, z, l, w, h, yaw]`` resting on the ground."""
        x, y = self.path.position(self.s)
        return np.array([x, y, self.size[2] / 2.0, *self.size, float(self.path.heading(self.s))])

    def record(self) -> ObjectRecord:
        return ObjectRecord(track_id=self.track_id, obj_type=self.obj_type, box=self.box(), speed=float(self.v))


@dataclass
class _Obstacles:
    """A frozen table of every actor's state, read by all actors in one step (synchronous update)."""

    track_ids: np.ndarray
    xy: np.ndarray
    yaw: np.ndarray
    length: np.ndarray
    width: np.ndarray
    speed: np.ndarray
    pedestrian: np.ndarray

    @classmethod
    def of(cls, actors: list[Actor]) -> "_Obstacles":
        boxes = np.array([a.box() for a in actors]).reshape(-1, 7)
        return cls(
            track_ids=np.array([a.track_id for a in actors], dtype=np.int64),
            xy=boxes[:, :2], yaw=boxes[:, 6], length=boxes[:, 3], width=boxes[:, 4],
            speed=np.array([a.v for a in actors]), pedestrian=np.array([a.is_pedestrian for a in actors], dtype=bool),
        )


def idm_acceleration(v: float, v_desired: float, gap: float, closing: float, driver: DriverModel) -> float:
    """IDM acceleration, clipped to ``[-max_brake, max_accel]``; ``gap = inf`` means a free road."""
    free = 1.0 - (v / max(v_desired, 0.1)) ** 4
    interaction = 0.0
    if np.isfinite(gap):
        dynamic = v * driver.headway_s + v * closing / (2.0 * np.sqrt(driver.max_accel * driver.comfort_brake))
        desired_gap = driver.min_gap + max(0.0, dynamic)
        interaction = (desired_gap / max(gap, 0.05)) ** 2
    return float(np.clip(driver.max_accel * (free - interaction), -driver.max_brake, driver.max_accel))


class TrafficSimulator:
    """Steps every actor of a :class:`Scene` by ``DT``; draws spawns and actor traits from ``rng``."""

    def __init__(self, scene: Scene, params: TrafficParams, rng: np.random.Generator, first_track_id: int = 100):
        self.scene, self.params, self.rng = scene, params, rng
        self.t = 0.0
        self.actors: list[Actor] = []
        self._held: Counter[int] = Counter()  # route index -> vehicles holding the junction on it
        self.parked = [
            ObjectRecord(track_id=first_track_id + i, obj_type="car", box=box.copy(), speed=0.0)
            for i, box in enumerate(scene.parked)
        ]
        self._next_id = first_track_id + len(self.parked)

    # ------------------------------------------------------------------ public API

    def populate(self) -> None:
        """Place actors along the entry stretches as if traffic had been arriving for a while."""
        for entry in self.scene.entries:
            self._populate_lane(entry)
        for entry in self.scene.walk_entries:
            self._populate_sidewalk(entry)

    def warm_up(self, seconds: float) -> None:
        for _ in range(int(round(seconds / DT))):
            self.step()

    def step(self) -> None:
        """Spawn arrivals, move every actor by one ``DT`` from a shared snapshot, drop the departed."""
        self._spawn_arrivals()
        obstacles = _Obstacles.of(self.actors)
        accelerations = [self._acceleration(actor, obstacles) for actor in self.actors]
        for actor, accel in zip(self.actors, accelerations):
            _advance(actor, accel)
        for actor in self.actors:
            self._update_commitment(actor)
        self.actors = [a for a in self.actors if a.persistent or a.s - a.size[0] / 2.0 < a.path.length]
        self.t += DT

    def snapshot(self) -> list[ObjectRecord]:
        """Every object of the current step: moving actors and parked cars (class ``car``)."""
        return [a.record() for a in self.actors] + list(self.parked)

    def add_connected_vehicle(self, track_id: int, horizon_s: float) -> Actor:
        """A car that stays on the map for ``horizon_s`` seconds (its desired speed is capped).

        Placed on a free stretch before a stop line, so it starts cruising smoothly; in dense traffic
        an ordinary car still on its way in is promoted instead (nothing has been recorded yet, so
        its new track id is not a visible change).
        """
        actor = self._insert_car(track_id) or self._promote_car(track_id)
        if actor is None:
            raise RuntimeError("no car can become a connected vehicle; lower the traffic density")
        remaining = actor.path.length - actor.s - 10.0
        actor.v_desired = float(min(actor.v_desired, max(remaining / horizon_s, 3.0)))
        actor.v = min(actor.v, actor.v_desired)
        actor.persistent = True
        return actor

    def _insert_car(self, track_id: int) -> Actor | None:
        for _ in range(50):
            route = self.scene.vehicle_routes[int(self.rng.integers(len(self.scene.vehicle_routes)))]
            s0 = float(self.rng.uniform(0.05, 0.8) * route.stop_s)
            if self._clear_around(route.path, s0, ahead=20.0, behind=10.0):
                actor = self._make_vehicle(route, s0, "car", track_id=track_id)
                self.actors.append(actor)
                return actor
        return None

    def _promote_car(self, track_id: int) -> Actor | None:
        candidates = [
            a for a in self.actors
            if a.obj_type == "car" and not a.persistent and a.s < a.route.stop_s - 10.0
        ]
        if not candidates:
            return None
        actor = candidates[int(self.rng.integers(len(candidates)))]
        actor.track_id = track_id
        return actor

    # ------------------------------------------------------------------ spawning

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    def _draw_vehicle_type(self) -> str:
        return "truck" if self.rng.random() < self.params.truck_share else "car"

    def _make_vehicle(self, route: VehicleRoute, s: float, obj_type: str, track_id: int | None = None) -> Actor:
        truck = obj_type == "truck"
        speed = self.params.truck_speed if truck else self.params.car_speed
        driver = DriverModel(
            max_accel=float(self.rng.uniform(0.8, 1.3) if truck else self.rng.uniform(1.5, 2.5)),
            comfort_brake=float(self.rng.uniform(1.8, 2.5)), max_brake=6.0,
            headway_s=float(self.rng.uniform(1.0, 1.8)), min_gap=float(self.rng.uniform(1.5, 3.0)),
        )
        v_desired = float(self.rng.uniform(*speed))
        track_id = self._new_id() if track_id is None else track_id
        return Actor(track_id, obj_type, self._draw_size(obj_type), route, s, 0.8 * v_desired, v_desired, driver)

    def _make_pedestrian(self, route: WalkRoute, s: float) -> Actor:
        driver = DriverModel(max_accel=1.0, comfort_brake=1.5, max_brake=3.0, headway_s=0.8, min_gap=0.4)
        v_desired = float(self.rng.uniform(*self.params.walk_speed))
        actor = Actor(self._new_id(), "pedestrian", self._draw_size("pedestrian"), route, s, v_desired, v_desired, driver)
        actor.next_crossing = sum(c.end_s < s for c in route.crossings)
        return actor

    def _draw_size(self, obj_type: str) -> np.ndarray:
        base, jitter = np.asarray(OBJECT_SIZES[obj_type]), np.asarray(SIZE_JITTER[obj_type])
        return base * (1.0 + self.rng.uniform(-1.0, 1.0, 3) * jitter)

    def _choose_route(self, entry: int) -> VehicleRoute:
        routes = self.scene.routes_from(entry)
        names = ("straight", "left", "right")
        weights = np.array([self.params.turn_weights[names.index(r.turn)] for r in routes])
        return routes[int(self.rng.choice(len(routes), p=weights / weights.sum()))]

    def _spawn_arrivals(self) -> None:
        for entry in self.scene.entries:
            if self.rng.random() < self.params.vehicle_rate * DT:
                route = self._choose_route(entry)
                vehicle = self._make_vehicle(route, 0.0, self._draw_vehicle_type())
                stopping = vehicle.v**2 / (2 * vehicle.driver.comfort_brake)
                if self._clear_around(route.path, 0.0, ahead=stopping + 12.0, behind=0.0):
                    self.actors.append(vehicle)
        for entry in self.scene.walk_entries:
            if self.rng.random() < self.params.pedestrian_rate * DT:
                walks = self.scene.walks_from(entry)
                walk = walks[int(self.rng.integers(len(walks)))]
                if self._clear_around(walk.path, 0.0, ahead=2.0, behind=0.0):
                    self.actors.append(self._make_pedestrian(walk, 0.0))

    def _populate_lane(self, entry: int) -> None:
        """Cars at exponential spacings (Poisson arrivals at cruising speed) up to the stop line."""
        stop_s = self.scene.routes_from(entry)[0].stop_s  # routes of one entry share their inbound lane
        arrivals = max(self.params.vehicle_rate * self.params.initial_density, 1e-6)
        mean_spacing = float(np.mean(self.params.car_speed)) / arrivals
        s = float(self.rng.exponential(mean_spacing))
        while s < stop_s - 15.0:
            route = self._choose_route(entry)
            vehicle = self._make_vehicle(route, s, self._draw_vehicle_type())
            if self._clear_around(route.path, s, ahead=25.0, behind=15.0):
                self.actors.append(vehicle)
            s += max(float(self.rng.exponential(mean_spacing)), 20.0)

    def _populate_sidewalk(self, entry: int) -> None:
        walks = self.scene.walks_from(entry)
        arrivals = max(self.params.pedestrian_rate * self.params.initial_density, 1e-6)
        mean_spacing = float(np.mean(self.params.walk_speed)) / arrivals
        s = float(self.rng.exponential(mean_spacing))
        while True:
            walk = walks[int(self.rng.integers(len(walks)))]
            limit = walk.crossings[0].start_s - 2.0 if walk.crossings else walk.path.length - 2.0
            if s >= limit:
                break
            if self._clear_around(walk.path, s, ahead=2.0, behind=2.0):
                self.actors.append(self._make_pedestrian(walk, s))
            s += max(float(self.rng.exponential(mean_spacing)), 3.0)

    def _clear_around(self, path: Polyline, s: float, ahead: float, behind: float) -> bool:
        """No actor's centre within 2.5 m of the path stretch ``[s - behind, s + ahead]``."""
        if not self.actors:
            return True
        stretch = path.position(s + np.arange(-behind, ahead + 1e-9, LOOKAHEAD_STEP))
        centres = np.array([a.box()[:2] for a in self.actors])
        return bool(np.min(np.linalg.norm(stretch[:, None] - centres[None], axis=-1)) > 2.5)

    # ------------------------------------------------------------------ control

    def _acceleration(self, actor: Actor, obstacles: _Obstacles) -> float:
        if actor.is_pedestrian:
            return self._pedestrian_acceleration(actor, obstacles)
        return self._vehicle_acceleration(actor, obstacles)

    def _vehicle_acceleration(self, actor: Actor, obstacles: _Obstacles) -> float:
        gap, closing = self._leader(actor, obstacles, self.params.lookahead, yield_to_all_pedestrians=True)
        to_stop_line = actor.route.stop_s - actor.front_s
        if not actor.committed and -1.0 < to_stop_line < self.params.lookahead:
            # Decide where a comfortable stop is still possible: before it, a red light may still
            # turn green; after committing, the vehicle goes even if the light turns red.
            decision = actor.v**2 / (2.0 * actor.driver.comfort_brake) + 5.0
            allowed = self._may_enter(actor.route)
            if allowed and to_stop_line <= decision:
                self._commit(actor)
            elif not allowed and to_stop_line < gap:
                gap, closing = _line_gap(to_stop_line, actor.driver, margin=0.5), actor.v
        idm = idm_acceleration(actor.v, actor.v_desired, gap, closing, actor.driver)
        return max(min(idm, self._curve_braking(actor)), -actor.driver.max_brake)

    def _pedestrian_acceleration(self, actor: Actor, obstacles: _Obstacles) -> float:
        gap, closing = self._leader(actor, obstacles, 6.0, yield_to_all_pedestrians=False)
        crossings = actor.route.crossings
        if actor.next_crossing < len(crossings) and not actor.committed:
            crossing = crossings[actor.next_crossing]
            to_kerb = crossing.start_s - actor.front_s
            needed = (crossing.end_s - crossing.start_s) / max(actor.v_desired, 0.5) + 2.0
            if self.scene.signals.green_remaining(crossing.walk_group, self.t) >= needed and to_kerb <= 2.0:
                actor.committed = True
            elif to_kerb < gap and to_kerb <= 6.0:
                gap, closing = _line_gap(to_kerb, actor.driver, margin=0.2), actor.v
        return idm_acceleration(actor.v, actor.v_desired, gap, closing, actor.driver)

    def _may_enter(self, route: VehicleRoute) -> bool:
        """Green for the route's group and no vehicle on a conflicting route inside the junction."""
        if not self.scene.signals.is_green(route.signal_group, self.t):
            return False
        conflicts = self.scene.conflicts[route.index]
        return not any(conflicts[held] for held, count in self._held.items() if count > 0)

    def _update_commitment(self, actor: Actor) -> None:
        """Release the junction once the rear has left it; move pedestrians on to their next crossing."""
        if actor.is_pedestrian:
            crossings = actor.route.crossings
            if actor.next_crossing < len(crossings) and actor.s > crossings[actor.next_crossing].end_s:
                actor.next_crossing += 1
                actor.committed = False
        elif actor.committed and actor.s - actor.size[0] / 2.0 > actor.route.reserve_end_s:
            self._release(actor)

    def _commit(self, actor: Actor) -> None:
        actor.committed = True
        self._held[actor.route.index] += 1

    def _release(self, actor: Actor) -> None:
        actor.committed = False
        self._held[actor.route.index] -= 1

    def _curve_braking(self, actor: Actor) -> float:
        """Acceleration cap that reaches every curve ahead at its speed limit ``sqrt(a_lat / |k|)``.

        IDM alone only brakes gently above its desired speed, so a curve limit fed in as the desired
        speed would be overshot; braking at the constant rate that meets the tightest point ahead
        starts early and softly, like a driver lifting off before a turn.
        """
        path = actor.path
        ahead = np.arange(0.0, self.params.lookahead, 1.0)
        s_ahead = np.clip(actor.s + ahead, 0.0, path.length)
        curvature = np.abs(np.interp(s_ahead, path.s, path.curvature))
        limit_sq = self.params.max_lateral_accel / np.maximum(curvature, 1e-6)
        needed = (actor.v**2 - limit_sq) / (2.0 * np.maximum(ahead, 1.0))
        return float(-max(needed.max(), -actor.driver.max_accel))

    def _leader(
        self, actor: Actor, obstacles: _Obstacles, lookahead: float, yield_to_all_pedestrians: bool,
    ) -> tuple[float, float]:
        """Bumper gap to, and closing speed on, the nearest obstacle on the path ahead (``inf`` if none).

        Vehicles give way to any pedestrian on their path but follow only vehicles moving within 90
        degrees of their own heading, so two actors can never wait on each other; pedestrians
        follow pedestrians walking their way and ignore vehicles.
        """
        heading = float(actor.path.heading(actor.s))
        same_way = np.cos(obstacles.yaw - heading) > 0.0
        relevant = (obstacles.track_ids != actor.track_id) & (obstacles.pedestrian == actor.is_pedestrian) & same_way
        if yield_to_all_pedestrians:
            relevant |= obstacles.pedestrian
        if not relevant.any():
            return np.inf, 0.0
        idx = np.flatnonzero(relevant)
        along = np.arange(0.0, lookahead, LOOKAHEAD_STEP)
        points = actor.path.position(actor.front_s + along)
        d = np.linalg.norm(points[:, None] - obstacles.xy[idx][None], axis=-1)
        reach = actor.size[1] / 2.0 + obstacles.width[idx] / 2.0 + 0.3
        on_path = (d < reach[None]).any(axis=0)
        if not on_path.any():
            return np.inf, 0.0
        idx, d = idx[on_path], d[:, on_path]
        nearest_along = along[np.argmin(d, axis=0)]
        relative = obstacles.yaw[idx] - heading
        extent = np.abs(np.cos(relative)) * obstacles.length[idx] / 2.0 + np.abs(np.sin(relative)) * obstacles.width[idx] / 2.0
        gaps = nearest_along - extent
        k = int(np.argmin(gaps))
        return float(gaps[k]), float(actor.v - obstacles.speed[idx[k]] * np.cos(relative[k]))


def _line_gap(distance: float, driver: DriverModel, margin: float) -> float:
    """IDM gap to a stop line: IDM halts ``min_gap`` short of an obstacle, but a line is not a car,
    so the virtual obstacle sits ``min_gap - margin`` beyond it and the actor stops ``margin`` short."""
    return max(distance + driver.min_gap - margin, 0.0)


def _advance(actor: Actor, accel: float) -> None:
    """Ballistic update that never reverses: speed clipped at 0, distance from the mean speed."""
    v_next = max(actor.v + accel * DT, 0.0)
    actor.s += 0.5 * (actor.v + v_next) * DT
    actor.v = v_next
