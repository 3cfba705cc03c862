"""Which fixes become position readings: the reporting policy (docs/reporting.md).

Like the trackers fleets know (min period / min distance / min angle), with two additions:
a *corridor* (no fix in between may stray more than ``max_deviation_m`` from the reported
track: where the road bends, the fix before the bend is reported) and a motion state:
*moving*, *stopped* (below ``stop_speed_kmh`` for ``stop_after_s``) and *parked* (ignition
off, when an ignition source is configured). Always reported: the first fix, the fix at which
the lorry is declared stopped, the first fix moving again, the first fix after the ignition
changes; those carry ``event`` ("stop", "start", "ignition_on", "ignition_off").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agent.config import ProfileConfig, ReportingConfig
from agent.model.geo import angle_diff, haversine_m, local_xy, segment_distance_m

Fix = dict[str, Any]


@dataclass(slots=True, frozen=True)
class Decision:
    report: bool
    event: str | None = None
    """Why this fix must be reported regardless of thresholds."""
    corner: tuple[int, Fix] | None = None
    """An earlier fix (time, data) to report first: the last one before the track left the
    corridor."""


class ReportingPolicy:
    def __init__(self, config: ReportingConfig):
        self.config = config
        m = config.moving
        self._moving_profile = m
        # All three moving thresholds at 0 is the documented "report every fix" setting.
        self._every_fix = not (m.min_period_s or m.min_distance_m or m.min_heading_deg)
        self._corridor = bool(config.max_deviation_m) and not self._every_fix
        self._last: Fix | None = None
        self._last_ts = 0
        self._since_last: list[tuple[int, Fix]] = []
        """Unreported fixes since the last report, for the corridor rule."""
        self._stopped = False
        self._slow_since: int | None = None
        self._ignition: bool | None = None
        """What the profiles follow: the sensed ignition, or a remote override."""
        self._sensed: bool | None = None
        self._forced: bool | None = None
        self._pending_event: str | None = None
        self.considered = 0
        self.reported = 0

    @property
    def state(self) -> str:
        if self._ignition is False:
            return "parked"
        return "stopped" if self._stopped else "moving"

    def set_ignition(self, on: bool | None) -> None:
        """From CAN or a GPIO; None when unknown (no source). A change is reported at once."""
        self._sensed = on
        self._apply(on if self._forced is None else self._forced)

    def force(self, profile: str) -> None:
        """A remote command: "moving" or "parked" whatever the ignition says; "auto" again."""
        self._forced = {"moving": True, "parked": False, "auto": None}[profile]
        self._apply(self._sensed if self._forced is None else self._forced)

    def _apply(self, on: bool | None) -> None:
        if on is not None and on != self._ignition and self._ignition is not None:
            self._pending_event = "ignition_on" if on else "ignition_off"
        self._ignition = on

    def decide(self, ts_ms: int, fix: Fix) -> Decision:
        self.considered += 1
        was_moving = self.state == "moving"
        event = self._motion(ts_ms, fix.get("speed_kmh"))
        if self._ignition is False:
            event = None  # parked: stopping and creeping are not news; the parked profile rules
        if self._pending_event and event is None:
            event, self._pending_event = self._pending_event, None
        corner = self._corner(fix) if was_moving else None
        if corner is not None:
            self._mark_reported(*corner)
        report = event is not None or self._due(ts_ms, fix)
        if report:
            self._mark_reported(ts_ms, fix)
        elif self._corridor and self.state == "moving":
            self._since_last.append((ts_ms, fix))
        else:
            self._since_last.clear()  # stopped or parked: nothing to keep in a corridor
        return Decision(report, event, corner)

    def _mark_reported(self, ts_ms: int, fix: Fix) -> None:
        self._last, self._last_ts = fix, ts_ms
        self._since_last = [(t, f) for t, f in self._since_last if t > ts_ms]
        self.reported += 1

    # -- rules ----------------------------------------------------------------------------------

    def _motion(self, ts_ms: int, speed: float | None) -> str | None:
        """Update moving/stopped; the event when it changes."""
        c = self.config
        if speed is None:
            return None  # no speed (GGA-only receiver): distance and time rules still apply
        if self._stopped:
            if speed >= c.start_speed_kmh:
                self._stopped, self._slow_since = False, None
                return "start"
            return None
        if speed >= c.stop_speed_kmh:
            self._slow_since = None
            return None
        if self._slow_since is None or ts_ms < self._slow_since:
            self._slow_since = ts_ms
        if ts_ms - self._slow_since >= c.stop_after_s * 1000:
            self._stopped = True
            return "stop"
        return None

    def _corner(self, fix: Fix) -> tuple[int, Fix] | None:
        """If the line from the last report to this fix leaves a fix in between out of the
        corridor, the fix just before this one (the last that kept them all in)."""
        tolerance = self.config.max_deviation_m
        last = self._last
        if not self._corridor or last is None or not self._since_last:
            return None
        a = (0.0, 0.0)
        b = local_xy(last["lat"], last["lon"], fix["lat"], fix["lon"])
        for _ts, f in self._since_last:
            p = local_xy(last["lat"], last["lon"], f["lat"], f["lon"])
            if segment_distance_m(p, a, b) > tolerance:
                return self._since_last[-1]
        return None

    def _profile(self) -> tuple[ProfileConfig, bool]:
        """The thresholds now, and whether the heading rule applies."""
        c = self.config
        if self._ignition is False:
            return c.parked, c.parked.min_heading_deg > 0
        if self._stopped:
            return ProfileConfig(min_period_s=c.stopped_period_s, min_distance_m=c.min_distance_m,
                                 min_heading_deg=0), False
        return self._moving_profile, c.min_heading_deg > 0

    def _due(self, ts_ms: int, fix: Fix) -> bool:
        last = self._last
        if self._every_fix or last is None or ts_ms < self._last_ts:
            return True  # every fix asked for; first fix; GPS time went back (receiver reset)
        p, heading_rule = self._profile()
        if p.min_period_s and ts_ms - self._last_ts >= p.min_period_s * 1000:
            return True
        if p.min_distance_m and haversine_m(last["lat"], last["lon"], fix["lat"], fix["lon"]) >= p.min_distance_m:
            return True
        if heading_rule and p.min_heading_deg:
            speed = fix.get("speed_kmh")
            a, b = last.get("course"), fix.get("course")
            if (speed is not None and speed >= self.config.heading_min_speed_kmh
                    and a is not None and b is not None and angle_diff(a, b) >= p.min_heading_deg):
                return True
        return False
