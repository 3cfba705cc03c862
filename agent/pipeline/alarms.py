"""Alarms from readings: cold-chain excursions, lost sensors, seal openings, geofences.

Every alarm is a reading on the `alarm` stream (urgent: made durable at once and sent before
any backlog) with ``kind`` and ``state``; see docs/contract.md. Durations are measured on the
readings' own clock: the lorry's time for replayed or simulated sources, the monotonic clock
for live ones, so a wrong or jumping system clock cannot end an excursion early.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agent.config.cargo import TemperatureLimits
from agent.model.reading import Reading


def alarm(ts_ms: int | None, mono_ns: int | None, data: dict[str, Any], replay: bool = False) -> Reading:
    meta: dict[str, Any] = {"replay": replay}
    if mono_ns is not None:
        meta["mono_ns"] = mono_ns
    return Reading("alarm", ts_ms, data, urgent=True, meta=meta)


def reading_clock_ms(r: Reading) -> float:
    """When a reading was taken, on a clock that only moves forward for this source."""
    if r.meta.get("replay") and r.ts_ms is not None:
        return float(r.ts_ms)
    mono = r.meta.get("mono_ns")
    return mono / 1e6 if mono is not None else float(r.ts_ms or 0)


@dataclass
class _Excursion:
    side: str  # "high" or "low"
    limit: float
    started: float | None = None  # clock ms of the first reading outside
    active: bool = False
    extreme: float | None = None


class TemperatureWatch:
    """One sensor: excursion above ``high_c`` / below ``low_c`` lasting ``min_duration_s``,
    its end once back inside by ``hysteresis_c``, and the sensor going silent or faulty."""

    def __init__(self, name: str, limits: TemperatureLimits, interval_s: float):
        self.name = name
        self.limits = limits
        self.lost_after_ms = (limits.lost_after_s or 3 * interval_s) * 1000
        self.sides = [
            _Excursion(side, limit)
            for side, limit in (("high", limits.high_c), ("low", limits.low_c))
            if limit is not None
        ]
        self.last_valid: float | None = None
        self.first_seen: float | None = None
        self.lost = False

    def update(self, r: Reading) -> list[dict[str, Any]]:
        t = reading_clock_ms(r)
        if self.first_seen is None:
            self.first_seen = t
        c = r.data.get("c")
        if c is None:
            since = self.last_valid if self.last_valid is not None else self.first_seen
            if not self.lost and t - since >= self.lost_after_ms:
                self.lost = True
                return [{"kind": "sensor_lost", "state": "active", "sensor": self.name,
                         "error": r.data.get("error"), "silent_s": round((t - since) / 1000)}]
            return []
        out = []
        if self.lost:
            self.lost = False
            out.append({"kind": "sensor_lost", "state": "cleared", "sensor": self.name, "c": c})
        self.last_valid = t
        for x in self.sides:
            out += self._excursion(x, t, c)
        return out

    def _excursion(self, x: _Excursion, t: float, c: float) -> list[dict[str, Any]]:
        outside = c > x.limit if x.side == "high" else c < x.limit
        worse = max if x.side == "high" else min
        if not x.active:
            if not outside:
                x.started = None
                return []
            if x.started is None:
                x.started, x.extreme = t, c
            x.extreme = worse(x.extreme if x.extreme is not None else c, c)
            if t - x.started >= self.limits.min_duration_s * 1000:
                x.active = True
                return [{"kind": "temperature", "state": "active", "sensor": self.name, "side": x.side,
                         "limit_c": x.limit, "c": c, "duration_s": round((t - x.started) / 1000)}]
            return []
        x.extreme = worse(x.extreme if x.extreme is not None else c, c)
        back = c <= x.limit - self.limits.hysteresis_c if x.side == "high" else c >= x.limit + self.limits.hysteresis_c
        if not back:
            return []
        x.active = False
        started, x.started = x.started or t, None
        return [{"kind": "temperature", "state": "cleared", "sensor": self.name, "side": x.side,
                 "limit_c": x.limit, "c": c, "duration_s": round((t - started) / 1000),
                 "extreme_c": x.extreme}]


SEAL_ALARMS = {"opened": "seal_opened", "tampered": "seal_cut", "battery_low": "seal_battery_low"}


def seal_alarm(event: dict[str, Any]) -> dict[str, Any] | None:
    """The alarm for an (already enriched) seal event, if it is one.

    An opening or cut outside every authorised zone is `critical`: that is what customs act
    on. Inside an authorised zone (a customs yard, the consignee's depot) it is `info`."""
    kind = SEAL_ALARMS.get(event.get("event", ""))
    if kind is None:
        return None
    authorised = bool(event.get("authorised"))
    severity = "warning" if kind == "seal_battery_low" else ("info" if authorised else "critical")
    return {
        "kind": kind, "state": "raised", "severity": severity, "seal": event.get("seal"),
        "seal_id": event.get("seal_id"), "authorised": authorised, "zones": event.get("zones", []),
        "position": event.get("position"),
    }
