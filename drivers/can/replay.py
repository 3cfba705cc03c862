"""Pacing a replayed capture (``replay_speed > 0``) in batches, like the live bus is read.

Frame ``ts`` is due at ``anchor_mono + (ts - anchor_ts) / speed``. A frame that is not due yet
is waited for, but never for less than BATCH_S (drivers/can/live.py): after the wait every
frame due by then goes out at once, so a 1,500 frames/s capture costs ~20 wake-ups a second,
not 1,500, and each frame is at most BATCH_S late. Between waits no clock is read: a frame
is due when its time is within the bus time already elapsed (``horizon``). A wait is never
longer than MAX_PACE_S (a capture's gap or a jump; ``pacing_capped`` counts them); a time
going back starts the pacing afresh from that frame.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator

import can

from drivers.can.live import BATCH_S

# Replay pacing never waits longer than this for one frame, whatever gap the capture has.
MAX_PACE_S = 10.0


class Pacer:
    def __init__(self, speed: float, stop: threading.Event, counters: dict[str, int]):
        self.speed = speed
        self.stop = stop
        self.counters = counters
        self.anchor: tuple[float, float] | None = None
        """(monotonic time, bus time) the pacing counts from."""
        self._horizon = float("-inf")
        """Bus time up to which frames were due at the last look at the clock."""

    def frames(self, source: Iterable[can.Message | None]) -> Iterator[can.Message | None]:
        """``source`` paced; ends early when ``stop`` is set."""
        stop = self.stop
        for msg in source:
            if stop.is_set():
                return
            if msg is not None:
                ts = msg.timestamp
                anchor = self.anchor
                if (anchor is None or ts < anchor[1] or ts > self._horizon) and not self._wait_for(ts):
                    return
            yield msg

    def late_s(self, ts: float) -> float | None:
        """How long ago (agent's clock) bus time ``ts`` was due; None when the pacing does not
        say (before its first frame, or ``ts`` before the time it counts from)."""
        a = self.anchor
        if a is None or ts < a[1]:
            return None
        return max(0.0, time.monotonic() - (a[0] + (ts - a[1]) / self.speed))

    def _wait_for(self, ts: float) -> bool:
        now = time.monotonic()
        if self.anchor is None or ts < self.anchor[1]:
            self.anchor = (now, ts)
        start, bus0 = self.anchor
        delay = start + (ts - bus0) / self.speed - now
        if delay > MAX_PACE_S:
            self.counters["pacing_capped"] += 1
            delay = MAX_PACE_S
            self.anchor = start, bus0 = (now + delay, ts)
        if delay > 0:
            delay = max(delay, BATCH_S)
            if self.stop.wait(delay):
                return False
            now = time.monotonic()
        self._horizon = bus0 + (now - start) * self.speed
        return True
