"""What happens to a reading between its driver and the store.

Positions: GPS time feeds the time keeper; fix quality filter; geofences; reporting policy.
Every other reading without a time is stamped from the time keeper, or held in the store
(time pending) until a trusted time is known. Seal events get the last known position and the
zones the lorry is in, are made durable before anything else happens, then raise their
alarm; temperatures feed the cold-chain watch. Called from driver threads.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import threading
from collections import deque
from collections.abc import Sequence
from typing import Any

from agent.config import Config
from agent.model.clock import TimeKeeper, boot_id
from agent.model.reading import Reading, iso_ms
from agent.model.streams import IGNITION, POSITION, SEAL, TEMPERATURE
from agent.pipeline.alarms import TemperatureWatch, alarm, seal_alarm
from agent.pipeline.fixfilter import FixFilter
from agent.pipeline.geofence import Geofences
from agent.pipeline.reporting import ReportingPolicy
from agent.store.buffer import Store

log = logging.getLogger(__name__)

# Good fixes kept to place a seal event where the lorry was *when it happened* (a scripted or
# slow source may report it a little after newer fixes arrived).
TRACK_KEPT = 3600


class Pipeline:
    def __init__(self, config: Config, store: Store, clock: TimeKeeper):
        self.config = config
        self.store = store
        self.clock = clock
        self.boot_id = boot_id()
        self.fix_filter = FixFilter(config.gps) if config.gps is not None else None
        self.policy = ReportingPolicy(config.reporting)
        self.last_fix: Reading | None = None
        """The last good fix (reported or not): where the lorry is."""
        self.rejected = 0
        self._position_lock = threading.Lock()
        self.geofences = Geofences(list(config.geofences))
        self._track: deque[tuple[int, float, float]] = deque(maxlen=TRACK_KEPT)
        self.seal_states: dict[str, str] = {}
        self.sensor_values: dict[str, dict[str, Any]] = {}
        self.watches = {t.name: TemperatureWatch(t.name, t, t.interval_s) for t in config.temperature}
        self._alarm_lock = threading.Lock()

    def emit(self, reading: Reading) -> None:
        stream = reading.stream
        if stream == POSITION:
            with self._position_lock:
                out = self._position(reading)
            self._store(out)
            return
        if reading.ts_ms is None:
            reading = self._stamp(reading)
        if stream == SEAL:
            self._seal(reading)
        elif stream == TEMPERATURE:
            self.sensor_values[str(reading.data.get("sensor"))] = {
                "c": reading.data.get("c"), "error": reading.data.get("error")}
            self._store([reading])
            watch = self.watches.get(reading.data.get("sensor", ""))
            if watch is not None:
                with self._alarm_lock:
                    found = watch.update(reading)
                self._alarms(reading, found)
        else:
            if stream == IGNITION:
                self.set_ignition(bool(reading.data.get("on")))
            self._store([reading])

    def _store(self, readings: list[Reading]) -> None:
        for r in readings:
            try:
                self.store.append(r)
            except (ValueError, TypeError) as e:
                self.rejected += 1
                log.error("reading rejected (%s): %r", e, r)

    def _seal(self, reading: Reading) -> None:
        """Where and whether authorised, made durable, then the alarm."""
        with self._position_lock:
            position = self._position_at(reading.ts_ms)
            zones: Sequence[str] = self.geofences.inside  # a list from _zones_at: the same JSON
            authorised = self.geofences.seal_opening_authorised()
            if position is not None and reading.ts_ms is not None and self.last_fix is not None \
                    and (self.last_fix.ts_ms or 0) > reading.ts_ms + 1000:
                # Newer fixes already moved the zones on: judge the zones where it happened.
                zones, authorised = self._zones_at(position["lat"], position["lon"])
        self.seal_states[str(reading.data.get("seal"))] = str(reading.data.get("event"))
        data = {**reading.data, "position": position, "zones": zones, "authorised": authorised}
        reading = dataclasses.replace(reading, data=data, urgent=True)
        self._store([reading])
        self.store.flush()  # on disk before anything else happens
        found = seal_alarm(data)
        self._alarms(reading, [found] if found else [])

    def _position_at(self, ts_ms: int | None) -> dict[str, Any] | None:
        """The last good fix at or before ``ts_ms`` (the first after, if none), and its age."""
        track = self._track
        if not track:
            return None
        if ts_ms is None:
            t, lat, lon = track[-1]
        else:
            i = bisect.bisect_right(track, (ts_ms, float("inf"), float("inf")))
            t, lat, lon = track[i - 1] if i else track[0]
        age = None if ts_ms is None else round((ts_ms - t) / 1000)
        return {"lat": lat, "lon": lon, "ts": iso_ms(t), "age_s": age}

    def _zones_at(self, lat: float, lon: float) -> tuple[list[str], bool]:
        inside = [z for z in self.geofences.zones if z.contains(lat, lon)]
        return [z.name for z in inside], any(z.seal_opening == "authorised" for z in inside)

    def _alarms(self, cause: Reading, found: list[dict[str, Any]]) -> None:
        for data in found:
            self.emit(alarm(cause.ts_ms, cause.meta.get("mono_ns"), data, bool(cause.meta.get("replay"))))

    def set_ignition(self, on: bool | None) -> None:
        with self._position_lock:
            self.policy.set_ignition(on)

    def force_profile(self, profile: str) -> None:
        with self._position_lock:
            self.policy.force(profile)

    def _position(self, reading: Reading) -> list[Reading]:
        assert reading.ts_ms is not None, "positions carry GPS time"
        mono = reading.meta.get("mono_ns")
        if mono is not None:
            self.clock.observe_gps(reading.ts_ms, mono)
        if self.fix_filter is not None and self.fix_filter.reject_reason(
            reading.ts_ms, reading.data, reading.meta.get("mode")
        ):
            return []
        self.last_fix = reading
        if not self._track or reading.ts_ms > self._track[-1][0]:
            self._track.append((reading.ts_ms, reading.data["lat"], reading.data["lon"]))
        elif reading.ts_ms < self._track[-1][0]:
            self._track.clear()  # GPS time went back (a receiver reset, another replay)
            self._track.append((reading.ts_ms, reading.data["lat"], reading.data["lon"]))
        out = [
            alarm(reading.ts_ms, None, {"kind": "geofence", "state": e.kind, "zone": e.zone, "zone_kind": e.zone_kind,
                                        "seal_opening": e.seal_opening, "lat": reading.data["lat"],
                                        "lon": reading.data["lon"]}, True)
            for e in self.geofences.update(reading.ts_ms, reading.data["lat"], reading.data["lon"])
        ]
        decision = self.policy.decide(reading.ts_ms, reading.data)
        if decision.corner is not None:
            out.append(Reading(POSITION, *decision.corner))
        if decision.report:
            if decision.event:
                reading = dataclasses.replace(reading, data={**reading.data, "event": decision.event})
            out.append(reading)
        return out

    def _stamp(self, reading: Reading) -> Reading:
        mono = reading.meta.get("mono_ns") or self.clock.mono_now()
        stamp = self.clock.stamp(mono)
        if stamp.ts_ms is not None:
            return dataclasses.replace(reading, ts_ms=stamp.ts_ms)
        meta = {**reading.meta, "mono_ns": mono, "boot_id": self.boot_id, "wall_ms": self.clock.wall_ms(mono)}
        return dataclasses.replace(reading, meta=meta)

    def resolve_held(self, mono_ns: int, boot: str, wall_ms: int) -> tuple[int, bool] | None:
        """The time of a held reading now, and whether it is trusted; None: keep holding."""
        if boot != self.boot_id:
            return wall_ms, False  # taken before a reboot: its monotonic reference is gone
        stamp = self.clock.stamp(mono_ns)
        if stamp.ts_ms is not None:
            return stamp.ts_ms, True
        if self.clock.mono_now() - mono_ns >= self.config.time.max_hold_s * 1e9:
            return wall_ms, False
        return None

    def snapshot(self) -> dict[str, Any]:
        fix = self.last_fix
        return {
            "zones": self.geofences.inside,
            "seals": dict(self.seal_states),
            "sensors": dict(self.sensor_values),
            "last_fix": None if fix is None else {"ts": iso_ms(fix.ts_ms or 0), **fix.data},
            "rejected_readings": self.rejected,
            "reporting": {
                "state": self.policy.state,
                "fixes": self.policy.considered,
                "reported": self.policy.reported,
            },
            "fix_filter": dict(self.fix_filter.rejected) if self.fix_filter else {},
        }
