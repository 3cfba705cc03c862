"""The lorry's time for simulated sources (drivers/seal/sim.py, drivers/temperature/sim.py):
they follow the agent's clock, GPS time once a fix is seen, so a scripted event lands at the
same point of a replayed trip at any replay speed.
"""

from __future__ import annotations

import datetime as dt
import time

from agent.model.clock import TimeKeeper

POLL_S = 0.05
GPS_GRACE_S = 5.0
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def utc_ms(at: dt.datetime) -> int:
    """Unix milliseconds of a scripted time, exactly; one without an offset is UTC (GPS time),
    not this machine's local time."""
    if at.tzinfo is None:
        at = at.replace(tzinfo=dt.UTC)
    return (at - _EPOCH) // dt.timedelta(milliseconds=1)


class LorryTime:
    """Now in the lorry's time for a simulated source, or None while it is not known."""

    def __init__(self, clock: TimeKeeper | None, gps_grace_s: float):
        # The runner sets the agent's clock; alone (a test, a tool) the trusted system clock.
        self.clock = clock if clock is not None else TimeKeeper()
        self._system_from = time.monotonic() + gps_grace_s

    def now_ms(self) -> int | None:
        if not self.clock.has_gps_time and time.monotonic() < self._system_from:
            return None
        return self.clock.stamp().ts_ms
