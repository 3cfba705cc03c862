"""Geofences: is the lorry inside a customs yard, a border crossing, a depot?

A `Zone` is one ``[[geofences]]`` entry (agent/config/cargo.py): a circle or a polygon, with
a signed distance to its boundary (positive inside). `Geofences` follows the lorry from fix
to fix, with hysteresis so that GPS noise at a boundary does not make it flap in and out, and
says whether opening a seal is authorised where it is now.

Polygons are handled in a local metric projection around the polygon (`agent.model.geo.local_xy`,
equirectangular about the centre of its bounding box): edges are straight lines in that
projection. For what geofences here are -- yards, border crossings, depots, up to tens of km
across -- distances are off by about tan(latitude) x (north-south offset from the centre) /
earth radius: under 0.4 % for a polygon 50 km across below 45 degrees latitude, so a few cm
at the distances that matter for entering and leaving; and a straight edge in the projection
is within metres of the geodesic. Larger regions work but lose accuracy (about 1 % of a
distance 200 km north or south of the centre, at 22 degrees N). A polygon crossing the
antimeridian (longitude +/-180) is out of scope and rejected; circles are fine anywhere.
Point-in-polygon is by ray casting (even-odd rule), so corners may be given clockwise or
counter-clockwise; a self-intersecting polygon counts the overlap of its loops as outside.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

from agent.config.cargo import GeofenceConfig
from agent.model.geo import haversine_m, local_xy

DEFAULT_MARGIN_M = 15.0


@dataclass(slots=True, frozen=True)
class ZoneEvent:
    kind: Literal["enter", "exit"]
    zone: str
    """The zone's name."""
    zone_kind: str
    """customs, border, depot, port, parking, region or other."""
    seal_opening: Literal["authorised", "forbidden"]
    ts_ms: int


class Zone:
    """One geofence; immutable, built from its config. Precomputes the projection."""

    def __init__(self, config: GeofenceConfig):
        self.config = config
        self.name = config.name
        self.kind = config.kind
        self.seal_opening = config.seal_opening
        self.events = config.events
        if config.circle is not None:
            c = config.circle
            self.lat0, self.lon0 = c.lat, c.lon
            self._radius: float | None = c.radius_m
            self._edges: tuple[tuple[float, float, float, float, float], ...] = ()
            self._xy: tuple[tuple[float, float], ...] = ()
            # The cull below measures in local_xy, the exact test by haversine: allow for
            # their (tiny, at these distances) difference.
            self.bound_m = c.radius_m * 1.01 + 1.0
        else:
            self._radius = None
            corners = _clean(config.polygon or [])
            if len(corners) < 3:
                raise ValueError(f"geofence {self.name!r}: a polygon needs at least 3 distinct corners")
            lats = [p[0] for p in corners]
            lons = [p[1] for p in corners]
            if max(lons) - min(lons) > 180:
                raise ValueError(f"geofence {self.name!r}: polygons crossing the antimeridian "
                                 "(longitude 180) are not supported; use a circle or split it")
            self.lat0 = (min(lats) + max(lats)) / 2
            self.lon0 = (min(lons) + max(lons)) / 2
            self._xy = tuple(local_xy(self.lat0, self.lon0, la, lo) for la, lo in corners)
            edges = []
            for (ax, ay), (bx, by) in zip(self._xy, self._xy[1:] + self._xy[:1]):
                dx, dy = bx - ax, by - ay
                length2 = dx * dx + dy * dy
                edges.append((ax, ay, dx, dy, 1.0 / length2 if length2 else 0.0))
            self._edges = tuple(edges)
            self.bound_m = max(math.hypot(x, y) for x, y in self._xy) + 1e-6

    def __repr__(self) -> str:
        shape = f"circle r={self._radius:g} m" if self._radius is not None else f"polygon of {len(self._xy)}"
        return f"Zone({self.name!r}, {self.kind}, {self.seal_opening}, {shape})"

    def distance_inside_m(self, lat: float, lon: float) -> float:
        """Metres inside the boundary (negative: outside). Circle: radius - great-circle
        distance to the centre; polygon: distance to the nearest edge, in the projection."""
        if self._radius is not None:
            return self._radius - haversine_m(self.lat0, self.lon0, lat, lon)
        return self._signed_xy(*local_xy(self.lat0, self.lon0, lat, lon))

    def contains(self, lat: float, lon: float) -> bool:
        """Inside or on the boundary."""
        return self.distance_inside_m(lat, lon) >= 0

    @cached_property
    def depth_m(self) -> float:
        """The deepest a point can be inside (a circle's radius; for a polygon, the largest
        `distance_inside_m` over its centroid and a 24 x 24 grid: a slight underestimate)."""
        if self._radius is not None:
            return self._radius
        xs = [x for x, _ in self._xy]
        ys = [y for _, y in self._xy]
        best = self._centroid_depth_m
        n = 24
        for i in range(n):
            x = min(xs) + (max(xs) - min(xs)) * (i + 0.5) / n
            for j in range(n):
                best = max(best, self._signed_xy(x, min(ys) + (max(ys) - min(ys)) * (j + 0.5) / n))
        return max(best, 0.0)

    @cached_property
    def _centroid_depth_m(self) -> float:
        """`distance_inside_m` at the area centroid (the vertex mean if the area is 0)."""
        if self._radius is not None:
            return self._radius
        a = cx = cy = 0.0
        for (x1, y1), (x2, y2) in zip(self._xy, self._xy[1:] + self._xy[:1]):
            cross = x1 * y2 - x2 * y1
            a += cross
            cx += (x1 + x2) * cross
            cy += (y1 + y2) * cross
        if abs(a) < 1e-9:
            cx = sum(x for x, _ in self._xy) / len(self._xy)
            cy = sum(y for _, y in self._xy) / len(self._xy)
        else:
            cx, cy = cx / (3 * a), cy / (3 * a)
        return self._signed_xy(cx, cy)

    def _signed_xy(self, px: float, py: float) -> float:
        """Signed distance of a projected point: one pass over the edges for both the ray
        casting (a ray towards +x) and the nearest edge."""
        inside = False
        best = math.inf
        for ax, ay, dx, dy, inv in self._edges:
            rx, ry = px - ax, py - ay
            if (ay > py) != (ay + dy > py) and rx < dx * ry / dy:
                inside = not inside
            t = (rx * dx + ry * dy) * inv
            if t <= 0.0:
                d2 = rx * rx + ry * ry
            else:
                if t > 1.0:
                    t = 1.0
                ex, ey = rx - t * dx, ry - t * dy
                d2 = ex * ex + ey * ey
            if d2 < best:
                best = d2
        d = math.sqrt(best)
        return d if inside else -d

    def _clearance(self, lat: float, lon: float, far_m: float) -> float:
        """The exact `distance_inside_m`, unless the point is more than ``far_m`` beyond the
        zone's bounding circle: then only a bound, a number below ``-far_m``, cheaply."""
        x, y = local_xy(self.lat0, self.lon0, lat, lon)
        limit = self.bound_m + far_m
        if x * x + y * y > limit * limit:
            return self.bound_m - math.hypot(x, y)
        if self._radius is not None:
            return self._radius - haversine_m(self.lat0, self.lon0, lat, lon)
        return self._signed_xy(x, y)


def _clean(corners: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """Drop repeated consecutive corners and a closing corner equal to the first."""
    out: list[tuple[float, float]] = []
    for p in corners:
        p = (float(p[0]), float(p[1]))
        if not out or p != out[-1]:
            out.append(p)
    while len(out) > 1 and out[-1] == out[0]:
        out.pop()
    return out


class Geofences:
    """Which zones the lorry is in, fix after fix.

    A zone is entered once the lorry is at least ``margin_m`` inside it and left once it is
    at least ``margin_m`` outside; in between nothing changes, so a lorry parked on a yard's
    fence line does not flap. (For a zone too small for that -- less than ``2 * margin_m``
    deep -- the margin is half its depth, so it can still be entered.) The first fix sets the
    state from the position alone (inside = `Zone.contains`): a lorry that starts inside a
    zone gets an "enter" event for it, so the backend learns where it starts.

    Per fix the cost is one projection and a distance compare per zone, plus the exact test
    only for the zones whose bounding circle is within ``margin_m`` of the position.
    """

    def __init__(self, configs: Iterable[GeofenceConfig], margin_m: float = DEFAULT_MARGIN_M):
        if not margin_m >= 0:
            raise ValueError("margin_m must be >= 0")
        self.margin_m = float(margin_m)
        self.zones: tuple[Zone, ...] = tuple(Zone(c) for c in configs)
        names = [z.name for z in self.zones]
        if dup := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"geofence names must be unique; repeated: {', '.join(dup)}")
        m = self.margin_m
        self._margins = tuple(
            m if z._centroid_depth_m >= 2 * m else min(m, z.depth_m / 2) for z in self.zones)
        self._in = [False] * len(self.zones)
        self._started = False

    def zone_names(self) -> list[str]:
        """All the zones' names, in config order."""
        return [z.name for z in self.zones]

    @property
    def inside(self) -> tuple[str, ...]:
        """The names of the zones the lorry is in now, in config order."""
        return tuple(z.name for z, i in zip(self.zones, self._in) if i)

    def seal_opening_authorised(self) -> bool:
        """True if any zone the lorry is in now authorises opening a seal."""
        return any(i and z.seal_opening == "authorised" for z, i in zip(self.zones, self._in))

    def update(self, ts_ms: int, lat: float, lon: float) -> list[ZoneEvent]:
        """Take one fix; the events it causes: exits first, then enters, each in config
        order. A position that is not a finite number is ignored."""
        if not (math.isfinite(lat) and math.isfinite(lon)):
            return []
        exits: list[ZoneEvent] = []
        enters: list[ZoneEvent] = []
        first = not self._started
        self._started = True
        state = self._in
        for k, zone in enumerate(self.zones):
            was = state[k]
            m = self._margins[k]
            d = zone._clearance(lat, lon, m)
            if first:
                now = d >= 0
            elif was:
                now = d > -m
            else:
                now = d >= m
            if now == was:
                continue
            state[k] = now
            if zone.events:
                (enters if now else exits).append(
                    ZoneEvent("enter" if now else "exit", zone.name, zone.kind, zone.seal_opening, ts_ms))
        return exits + enters if exits else enters
