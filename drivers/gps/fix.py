"""A position fix as every GPS driver gives it, and what a GPS source adds to the health reading."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# A constellation not heard of for this long is no longer in view.
SKY_STALE_S = 10.0


@dataclass(slots=True)
class Fix:
    ts_ms: int
    lat: float
    lon: float
    speed_kmh: float | None
    course: float | None
    alt_m: float | None
    sats: int | None
    hdop: float | None
    fix: str
    mode: int | None = None
    """GSA fix mode: 2 = 2D, 3 = 3D; None when the receiver sends no GSA."""

    def as_data(self) -> dict[str, Any]:
        return {
            "lat": round(self.lat, 7),
            "lon": round(self.lon, 7),
            "speed_kmh": None if self.speed_kmh is None else round(self.speed_kmh, 2),
            "course": self.course,
            "alt_m": self.alt_m,
            "sats": self.sats,
            "hdop": self.hdop,
            "fix": self.fix,
        }


def health(status: dict[str, Any]) -> dict[str, Any]:
    """A GPS source's part of the `health` reading, from its ``snapshot()``."""
    return {"gps": {
        "connected": status.get("connected"),
        "last_fix_ts": status.get("last_fix_ts"),
        "satellites_in_view": status.get("satellites_in_view", {}),
        "bad_lines": status.get("bad_checksum", 0) + status.get("garbage", 0),
    }}
