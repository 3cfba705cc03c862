"""Which GNSS times to believe: the week-number rollover, and dates no receiver can mean.

A fix's time becomes the time of positions, the agent's trusted clock and so the time of
everything else; one bad epoch (an RMC dated ``..99``, a ZDA in year 3000) must neither be
published nor move anything. Each source judges its own times against the best evidence it
has, in this order:

1. **its own last believed fix** (the anchor): a receiver's time moves with the monotonic
   clock, so a new fix must lie within ``SLACK`` of the anchor plus the time elapsed since
   (replays run faster than real time: the elapsed time of a replay is unknown, ``SLACK``
   alone applies). ``REANCHOR`` consecutive fixes that agree with each other but not with the
   anchor are believed (the anchor was the bad one: a receiver that came up with a wrong date);
2. **the system clock**, for a live source, when the kernel says NTP synchronised it;
3. **the capture's own date** (a ``# Date:`` header), for a replay: the era around it;
4. **this release's date**: no correct receiver reports a time more than half a GPS era
   (512 weeks, 9.8 years) after it, nor, live, more than ``LIVE_BEFORE_RELEASE`` before it.

A time more than half an era behind the evidence is a victim of the 10-bit GPS week rollover
and moves forward by 1024 weeks (twice at most); a time before GPS time began (1980) is no
rollover but nonsense; a time outside the evidence's window is refused and counted by reason.
Times are plain integers (ms, days) throughout: no date arithmetic can overflow.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from agent.model.release import RELEASE_MS

DAY_MS = 86_400_000
ERA_MS = 1024 * 7 * DAY_MS
HALF_ERA_MS = ERA_MS // 2
SLACK_MS = DAY_MS
"""How far a fix may stray from what its anchor predicts (receiver glitches within a day are
possible but bounded; a replay's gaps and jumps are rarely longer)."""
REANCHOR = 5
LIVE_BEFORE_RELEASE_MS = 30 * DAY_MS
GPS_EPOCH_MS = 315_964_800_000  # 1980-01-06: no GNSS time is earlier
MAX_ROLLOVERS = 2
"""A 10-bit week counter has rolled over twice (1999, 2019): no receiver is further behind."""
EPOCH_ORDINAL = dt.date(1970, 1, 1).toordinal()


def day_ms(day: dt.date) -> int:
    return (day.toordinal() - EPOCH_ORDINAL) * DAY_MS



@dataclass(frozen=True, slots=True)
class Window:
    lo: int
    hi: int
    era: int
    """Times before ``era - HALF_ERA_MS`` are rollover victims."""
    why: str
    """The reason a time outside the window is refused under."""


class GnssTimeJudge:
    """One per GNSS source. ``judge`` returns the time to use, or None (refused, counted)."""

    def __init__(self, *, live: bool, system_now_ms: Callable[[], int | None] | None = None,
                 release_ms: int = RELEASE_MS):
        self.live = live
        self._system_now_ms = system_now_ms
        """The system clock's time when the kernel says it is synchronised, else None."""
        self.release_ms = release_ms
        self.capture_ms: int | None = None
        self._anchor: tuple[int, int] | None = None  # (fix time, monotonic ns when received)
        self._rivals: list[tuple[int, int]] = []
        self.refused: Counter[str] = Counter()
        self.rollover = 0
        self.reanchored = 0

    def capture_date(self, day: dt.date) -> bool:
        """A capture's ``# Date:`` header; ignored (False) unless it is a GNSS-era date that
        this release could have been run on."""
        ms = day_ms(day)
        if not GPS_EPOCH_MS <= ms <= self.release_ms + HALF_ERA_MS:
            self.refused["bad_capture_date"] += 1
            return False
        self.capture_ms = ms
        return True

    def era_reference_ms(self, mono_ns: int) -> int:
        return self._window(mono_ns).era

    def judge(self, ts_ms: int, mono_ns: int, *, measured: bool = True) -> int | None:
        """``measured``: False when the date is a guess (a GGA-only receiver dated by the
        system clock or a capture's header): such a time is checked, but is no evidence about
        the next one (it never becomes the anchor)."""
        window = self._window(mono_ns)
        if ts_ms < GPS_EPOCH_MS:
            self.refused["before_gnss_time"] += 1  # no receiver can mean it: not a rollover
            return None
        if ts_ms < window.era - HALF_ERA_MS:
            eras = -(-(window.era - HALF_ERA_MS - ts_ms) // ERA_MS)
            if eras > MAX_ROLLOVERS:
                self.refused["before_gnss_time"] += 1
                return None
            ts_ms += eras * ERA_MS
            self.rollover += 1
        if window.lo <= ts_ms <= window.hi:
            if measured:
                self._anchor = (ts_ms, mono_ns)
                self._rivals.clear()
            return ts_ms
        if measured and self._anchor is not None and window.why == "disagrees_with_last_fix" \
                and self._plausible(ts_ms):
            if self._rival(ts_ms, mono_ns):
                return ts_ms
        self.refused[window.why] += 1
        return None

    def _window(self, mono_ns: int) -> Window:
        if self._anchor is not None:
            t, m = self._anchor
            elapsed = max(0, (mono_ns - m) // 1_000_000) if self.live else 0
            return Window(t - SLACK_MS, t + elapsed + SLACK_MS, t, "disagrees_with_last_fix")
        now = self._system_now_ms() if self.live and self._system_now_ms is not None else None
        if now is not None:
            return Window(now - SLACK_MS, now + SLACK_MS, now, "disagrees_with_system_time")
        if not self.live and self.capture_ms is not None:
            c = self.capture_ms
            # Headers tell when a capture was shared, not always when it was recorded (years
            # apart in gpsd's collection): the capture's date only centres the era.
            return Window(c - HALF_ERA_MS, c + HALF_ERA_MS, c, "outside_capture_era")
        r = self.release_ms
        before = LIVE_BEFORE_RELEASE_MS if self.live else HALF_ERA_MS
        return Window(r - before, r + HALF_ERA_MS, r, "outside_release_era")

    def _plausible(self, ts_ms: int) -> bool:
        """Could a receiver mean this at all (whatever the anchor says)?"""
        before = LIVE_BEFORE_RELEASE_MS if self.live else HALF_ERA_MS
        return self.release_ms - before <= ts_ms <= self.release_ms + HALF_ERA_MS

    def _rival(self, ts_ms: int, mono_ns: int) -> bool:
        """Fixes that disagree with the anchor but agree with each other: after REANCHOR of
        them the anchor is taken to be the bad one."""
        if self._rivals:
            t, m = self._rivals[-1]
            elapsed = max(0, (mono_ns - m) // 1_000_000) if self.live else 0
            if not t - SLACK_MS <= ts_ms <= t + elapsed + SLACK_MS:
                self._rivals.clear()
        self._rivals.append((ts_ms, mono_ns))
        if len(self._rivals) < REANCHOR:
            return False
        self._anchor = (ts_ms, mono_ns)
        self._rivals.clear()
        self.reanchored += 1
        return True

    def snapshot(self) -> dict[str, object]:
        return {"refused": dict(self.refused), "rollover_corrected": self.rollover, "reanchored": self.reanchored}
