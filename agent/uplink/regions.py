"""Which streams the uplink may send right now, and what the link has cost this month.

The active profile follows the lorry's zones (``[[profiles]] zones``, geofence names): a
Chinese SIM at home, roaming in Vietnam or Laos, the depot's Wi-Fi. A profile sends some
streams live, some in bulk every N seconds, and holds the rest for a cheaper network;
`alarm` and `seal` always go at once (the catalogue's ``always_live``, agent/model/streams.py),
and so does a stream the catalogue does not know (no profile can name it, so none holds it).
Bytes are counted at the socket (agent/uplink/socketmeter.py) and charged to the active
profile per calendar month (UTC); past a profile's budget only evidence is sent. The usage
is kept in the store's state, so a restart does not reset it.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from agent.config.regions import UplinkProfileConfig
from agent.model import streams

DEFAULT = UplinkProfileConfig(name="default", live=list(streams.HOLDABLE))
STATE_KEY = "uplink_usage"


def month_of(wall: float) -> str:
    return time.strftime("%Y-%m", time.gmtime(wall))


class UplinkPlan:
    """Driven by the uplink thread; ``status`` and ``saved`` may be called from any thread."""

    def __init__(self, profiles: Sequence[UplinkProfileConfig], zones: Callable[[], Sequence[str]],
                 saved_usage: str | None = None, wall: Callable[[], float] = time.time,
                 mono: Callable[[], float] = time.monotonic):
        self.profiles = list(profiles)
        self.default = next((p for p in self.profiles if not p.zones), DEFAULT)
        self._zones = zones
        self._wall = wall
        self._mono = mono
        self.active = self.default
        self.generation = 0
        """Changes whenever what may be sent changes: the outbox looks again."""
        self._due: dict[str, float] = {}
        self.usage: dict[str, dict[str, int]] = {}
        """month → profile → bytes on the wire."""
        self._lock = threading.Lock()
        if saved_usage:
            try:
                self.usage = {m: {p: int(b) for p, b in v.items()} for m, v in json.loads(saved_usage).items()}
            except (ValueError, AttributeError, TypeError):
                self.usage = {}

    def tick(self) -> None:
        """Follow the zones and the clock; bump ``generation`` if anything changed."""
        inside = set(self._zones())
        active = next((p for p in self.profiles if p.zones and inside.intersection(p.zones)), self.default)
        now = self._mono()
        changed = active is not self.active
        if changed:
            self.active = active
            self._due = {}
        if any(due <= now for due in self._due.values()):
            self._due = {s: d for s, d in self._due.items() if d > now}
            changed = True
        if changed:
            self.generation += 1

    def over_budget(self) -> bool:
        budget = self.active.monthly_budget_mb
        return bool(budget) and self.used(self.active.name) >= budget * 1024 * 1024

    def allowed(self, stream: str) -> bool:
        row = streams.get(stream)
        if row.always_live:
            return True
        p = self.active
        if self.over_budget():
            return False
        if not row.catalogued:
            return True  # no profile can name it: live everywhere (agent/model/streams.py)
        if stream in p.every_s:
            return stream not in self._due
        return stream in p.live

    def drained(self, stream: str) -> None:
        """A bulk stream's backlog went out: next round after its interval."""
        every = self.active.every_s.get(stream)
        if every and stream not in self._due:
            self._due[stream] = self._mono() + every

    def charge(self, nbytes: int) -> None:
        if nbytes <= 0:
            return
        with self._lock:
            month = self.usage.setdefault(month_of(self._wall()), {})
            month[self.active.name] = month.get(self.active.name, 0) + nbytes
            if len(self.usage) > 3:  # this month and two before are plenty for a technician
                for old in sorted(self.usage)[:-3]:
                    del self.usage[old]

    def used(self, profile: str) -> int:
        with self._lock:
            return self.usage.get(month_of(self._wall()), {}).get(profile, 0)

    def saved(self) -> str:
        with self._lock:
            return json.dumps(self.usage, sort_keys=True, separators=(",", ":"))

    def snapshot(self) -> dict[str, Any]:
        month = month_of(self._wall())
        profiles = {}
        for p in self.profiles or [self.default]:
            used = self.used(p.name)
            budget = int(p.monthly_budget_mb * 1024 * 1024)
            profiles[p.name] = {"bytes": used, "budget_bytes": budget or None,
                                "over_budget": bool(budget) and used >= budget}
        return {"profile": self.active.name, "month": month, "profiles": profiles,
                "held": sorted(s for s in streams.NAMES if not self.allowed(s))}
