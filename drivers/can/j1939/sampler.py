"""Per-signal sampling: a few values a minute out of thousands of frames a second.

A value is sent when at least ``min_interval_s`` passed since the last one sent AND it moved
by ``deadband`` or more (or ``max_interval_s`` passed: a heartbeat, so the backend knows the
value is still what it was). Between checks a signal is not even decoded: ``next_check`` is
what the frame loop compares against, which keeps the hot path to a dict lookup and a test.
"""

from __future__ import annotations

from dataclasses import dataclass

# A signal whose value did not move is looked at again this much later, not on every frame
# (a little under a second, so a 1 Hz parameter arriving a hair early is not skipped).
RECHECK_S = 0.9


@dataclass(slots=True)
class Sampled:
    min_interval_s: float
    max_interval_s: float
    deadband: float
    last_value: float | None = None
    last_sent: float = float("-inf")
    next_check: float = float("-inf")

    def offer(self, ts: float, value: float | None) -> bool:
        """Whether ``value`` at frame time ``ts`` is to be sent (and remember it if so)."""
        if value is None:
            self.next_check = ts + RECHECK_S
            return False
        if ts < self.last_sent:  # a capture restarted, or the clock went back: start afresh
            self.last_sent = float("-inf")
        last = self.last_value
        moved = last is None or (abs(value - last) >= self.deadband if self.deadband > 0 else value != last)
        stale = self.max_interval_s > 0 and ts - self.last_sent >= self.max_interval_s
        if (moved or stale) and ts - self.last_sent >= self.min_interval_s:
            self.last_value, self.last_sent = value, ts
            self.next_check = ts + max(self.min_interval_s, 0.0)
            return True
        self.next_check = max(ts + min(RECHECK_S, self.min_interval_s or RECHECK_S),
                              self.last_sent + self.min_interval_s)
        return False
