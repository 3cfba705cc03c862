"""Which fixes become position readings: the reporting policy of docs/configuration.md."""

from __future__ import annotations

from typing import Any

from agent.config import ReportingConfig
from agent.geo import angle_diff, haversine_m


class ReportingPolicy:
    """Report a fix when any enabled threshold (time, distance, heading) is met since the
    last reported one; with every threshold 0, report every fix."""

    def __init__(self, config: ReportingConfig):
        self.config = config
        self._last: dict[str, Any] | None = None
        self._last_ts = 0
        self.considered = 0
        self.reported = 0

    def accept(self, ts_ms: int, fix: dict[str, Any]) -> bool:
        self.considered += 1
        if self._due(ts_ms, fix):
            self._last, self._last_ts = fix, ts_ms
            self.reported += 1
            return True
        return False

    def _due(self, ts_ms: int, fix: dict[str, Any]) -> bool:
        c, last = self.config, self._last
        if last is None or ts_ms < self._last_ts:
            return True  # first fix, or GPS time went back (receiver reset): start afresh
        enabled = False
        if c.min_period_s > 0:
            enabled = True
            if ts_ms - self._last_ts >= c.min_period_s * 1000:
                return True
        if c.min_distance_m > 0:
            enabled = True
            if haversine_m(last["lat"], last["lon"], fix["lat"], fix["lon"]) >= c.min_distance_m:
                return True
        if c.min_heading_deg > 0:
            enabled = True
            a, b = last.get("course"), fix.get("course")
            if a is not None and b is not None and angle_diff(a, b) >= c.min_heading_deg:
                return True
        return not enabled
