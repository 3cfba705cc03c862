"""Fix quality: which fixes are good enough to be positions (any GPS source).

Thresholds from ``[gps]``: too few satellites, too high an HDOP, a weaker fix mode than asked,
or a jump no lorry can make (multipath in a city, a receiver glitching after a tunnel). Values
the receiver did not send pass: an RMC-only receiver has no satellite count.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from agent.config import GpsConfig
from agent.model.geo import haversine_m

# A jump is judged against the last good fix allowing this much position error either side.
JUMP_SLACK_M = 30.0
# After this many jumps in a row the receiver is believed: the lorry really is there (after a
# ferry, a long tunnel, a receiver reset far from the last fix).
JUMP_BELIEVE_AFTER = 5


class FixFilter:
    def __init__(self, config: GpsConfig):
        self.config = config
        self.rejected: Counter[str] = Counter()
        self._last: tuple[int, float, float] | None = None
        self._jumps = 0

    def reject_reason(self, ts_ms: int, fix: dict[str, Any], mode: int | None) -> str | None:
        """None if the fix is a good position, else why not (and it is counted)."""
        reason = self._quality(fix, mode) or self._jump(ts_ms, fix)
        if reason:
            self.rejected[reason] += 1
        else:
            self._last = (ts_ms, fix["lat"], fix["lon"])
        return reason

    def _quality(self, fix: dict[str, Any], mode: int | None) -> str | None:
        c = self.config
        sats, hdop = fix.get("sats"), fix.get("hdop")
        if c.min_sats and sats is not None and sats < c.min_sats:
            return "few_sats"
        if c.max_hdop and hdop is not None and hdop > c.max_hdop:
            return "high_hdop"
        if c.min_mode == "3d" and mode == 2:
            return "2d_only"
        return None

    def _jump(self, ts_ms: int, fix: dict[str, Any]) -> str | None:
        if not self.config.max_speed_kmh or self._last is None:
            return None
        last_ts, lat, lon = self._last
        dt_s = (ts_ms - last_ts) / 1000
        if dt_s <= 0:
            return None  # a receiver reset or a replayed capture: judge from here on
        moved = max(0.0, haversine_m(lat, lon, fix["lat"], fix["lon"]) - JUMP_SLACK_M)
        if moved / dt_s * 3.6 <= self.config.max_speed_kmh:
            self._jumps = 0
            return None
        self._jumps += 1
        if self._jumps >= JUMP_BELIEVE_AFTER:
            self._jumps = 0
            return None
        return "jump"
