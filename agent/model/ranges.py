"""Physical ranges of every measured field, declared once; what is outside them is not published.

Sources (receivers, buses, sensors, remote peers) can send anything that parses: an HDOP of
-5, 99,999 satellites, an altitude of 1e300. A value outside its field's range is not a
measurement: the value is dropped (published as null) and counted per field, or, for a field a
reading cannot do without (a position's latitude), the whole reading is refused. Parsers ask
``RangeCheck.keep`` / ``RangeCheck.require`` and report ``RangeCheck.counts`` in their status.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from math import isfinite
from typing import TypeVar

N = TypeVar("N", bound=float)
"""keep/require hand back the value itself: an int stays an int (satellites, battery %)."""


@dataclass(frozen=True, slots=True)
class Range:
    lo: float
    hi: float
    unit: str
    why: str
    lo_open: bool = False
    """The bound itself is not a valid value (an HDOP of 0 is a receiver's placeholder)."""
    hi_open: bool = False

    def __contains__(self, value: float) -> bool:
        if not isfinite(value):
            return False
        above_lo = value > self.lo if self.lo_open else value >= self.lo
        below_hi = value < self.hi if self.hi_open else value <= self.hi
        return above_lo and below_hi


FIELDS: dict[str, Range] = {
    "lat": Range(-90, 90, "°", "WGS 84 latitude"),
    "lon": Range(-180, 180, "°", "WGS 84 longitude"),
    "speed_kmh": Range(0, 500, "km/h",
                       "ground speed; a receiver reports no faster than a land vehicle could be carried"),
    "course": Range(0, 360, "°", "true course over ground (some receivers say 360 for north)"),
    "alt_m": Range(-1000, 10_000, "m", "height above the geoid: below the Dead Sea shore to above any road"),
    "sats": Range(0, 128, "", "satellites used in the fix (four constellations at most ~60 above the horizon)"),
    "hdop": Range(0, 100, "", "horizontal dilution of precision; 0 is no value, 99.99 the receivers' 'unknown'",
                  lo_open=True),
    "sats_in_view": Range(0, 256, "", "satellites in view of one constellation"),
    "temperature_c": Range(-80, 150, "°C", "cargo temperature: beyond any reefer or sensor (DS18B20: -55..125)"),
    "battery_pct": Range(0, 100, "%", "an e-seal's or lock's battery charge, as its reader reports it"),
}


class OutOfRange(ValueError):
    """A required field outside its physical range: the reading is refused."""

    def __init__(self, field: str, value: object):
        self.field = field
        super().__init__(f"{field} {value!r} outside {describe(field)}")


def describe(field: str) -> str:
    r = FIELDS[field]
    lo = "(" if r.lo_open else "["
    hi = ")" if r.hi_open else "]"
    return f"{lo}{r.lo:g}, {r.hi:g}{hi} {r.unit}".rstrip()


def in_range(field: str, value: float) -> bool:
    return value in FIELDS[field]


class RangeCheck:
    """Checks values against ``FIELDS`` and counts each field's rejects (for ``status``)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        """Values dropped or readings refused, per field."""

    def keep(self, field: str, value: N | None) -> N | None:
        """The value if it is physically possible, else None (counted)."""
        if value is None or value in FIELDS[field]:
            return value
        self.counts[field] += 1
        return None

    def require(self, field: str, value: N) -> N:
        """The value, or OutOfRange (counted) when the reading cannot do without it."""
        if value in FIELDS[field]:
            return value
        self.counts[field] += 1
        raise OutOfRange(field, value)
