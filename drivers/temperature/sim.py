"""A scripted temperature profile for the demo and tests, in the lorry's time.

Like the simulated seal (drivers/seal/sim.py) it follows the agent's clock (drivers/simtime.py), a replayed trip's
GPS time, so a reefer's excursion lands at the same point of the route at any replay speed,
including as fast as possible (every interval is given, however far the time moved between two
looks). Readings fall on multiples of ``interval_s`` of that time, which makes a replay's
output the same on every run.
"""

from __future__ import annotations

import bisect
import threading
from typing import Any

from agent.model.reading import Reading, iso_ms
from drivers.base import Driver, Emit
from drivers.simtime import GPS_GRACE_S, POLL_S, LorryTime, utc_ms
from drivers.temperature.config import SimTemperatureConfig

# A leap further than this many intervals (a system clock that was years off before GPS time)
# gives the last ones only, not a flood.
MAX_CATCH_UP = 1000


class SimTemperature(Driver):
    kind = "temperature"
    gps_grace_s = GPS_GRACE_S

    def __init__(self, config: SimTemperatureConfig, emit: Emit):
        super().__init__(config, emit)
        points = sorted((utc_ms(p.at), p.c) for p in config.profile)
        self.times = [t for t, _ in points]
        self.values = [c for _, c in points]
        self.step_ms = max(1, round(config.interval_s * 1000))
        self.next_ms: int | None = None
        self.readings = 0

    def value_at(self, ts_ms: int) -> float:
        """The profile at ``ts_ms``: linear between points, held flat before and after them."""
        t, v = self.times, self.values
        i = bisect.bisect_right(t, ts_ms)
        if i == 0:
            return v[0]
        if i == len(t):
            return v[-1]
        frac = (ts_ms - t[i - 1]) / (t[i] - t[i - 1])
        return round(v[i - 1] + frac * (v[i] - v[i - 1]), 2)

    def due(self, now_ms: int) -> list[int]:
        """The reading times that have come by ``now_ms`` and were not given yet."""
        step = self.step_ms
        if self.next_ms is None or now_ms < self.next_ms - step:  # the start, or time went back
            self.next_ms = -(-now_ms // step) * step
        if now_ms - self.next_ms > MAX_CATCH_UP * step:
            self.next_ms = (now_ms // step - MAX_CATCH_UP + 1) * step
        out = []
        while self.next_ms <= now_ms:
            out.append(self.next_ms)
            self.next_ms += step
        return out

    def run(self, stop: threading.Event) -> None:
        lorry = LorryTime(self.clock, self.gps_grace_s)
        while True:
            now = lorry.now_ms()
            if now is not None and self.times:
                for ts in self.due(now):
                    self.readings += 1
                    data = {"sensor": self.config.name, "c": self.value_at(ts), "error": None}
                    self.emit(Reading("temperature", ts, data, meta={"replay": True}))
            if stop.wait(POLL_S):
                return

    def snapshot(self) -> dict[str, Any]:
        return {
            "points": len(self.times),
            "readings": self.readings,
            "next_at": iso_ms(self.next_ms) if self.next_ms is not None else None,
        }
