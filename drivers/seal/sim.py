"""A scripted seal timeline (``events``) for the demo and tests, in the lorry's time.

Events follow the agent's clock, which is GPS time once a fix is seen, so with a replayed trip
a door opens at the same point of the route at any replay speed. Each event is emitted once,
stamped with its scripted time. Runs until stopped, alongside the GPS source it follows.

Until the clock has GPS time the system clock (when the agent trusts it) stands in, but only
after ``gps_grace_s``: a replay's first fix comes within moments, and on today's date a
scripted trip from the past would otherwise play out all at once before it.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from agent.model.reading import Reading, iso_ms
from drivers.base import Driver, Emit
from drivers.seal.config import SimSealConfig
from drivers.simtime import GPS_GRACE_S, POLL_S, LorryTime, utc_ms

log = logging.getLogger(__name__)


class SimSeal(Driver):
    kind = "seal"
    gps_grace_s = GPS_GRACE_S

    def __init__(self, config: SimSealConfig, emit: Emit):
        super().__init__(config, emit)
        # Stable: events scripted at the same time keep their order.
        self.script = sorted(((utc_ms(e.at), e.event) for e in config.events), key=lambda e: e[0])
        self.emitted = 0
        self.lorry_ms: int | None = None

    def run(self, stop: threading.Event) -> None:
        lorry = LorryTime(self.clock, self.gps_grace_s)
        while True:
            now = lorry.now_ms()
            if now is not None:
                self.lorry_ms = now
                while self.emitted < len(self.script) and self.script[self.emitted][0] <= now:
                    self._emit(*self.script[self.emitted])
                    self.emitted += 1
            if stop.wait(POLL_S):
                return

    def snapshot(self) -> dict[str, Any]:
        pending = self.script[self.emitted :]
        return {
            "events": len(self.script),
            "emitted": self.emitted,
            "next_at": iso_ms(pending[0][0]) if pending else None,
            "lorry_time": iso_ms(self.lorry_ms) if self.lorry_ms is not None else None,
        }

    def _emit(self, at_ms: int, event: str) -> None:
        log.info("seal %s (sim): %s at %s", self.config.name, event, iso_ms(at_ms))
        data = {"seal": self.config.name, "event": event, "seal_id": self.config.seal_id,
                "battery_pct": None, "source": "sim"}
        self.emit(Reading("seal", at_ms, data, urgent=True, meta={"replay": True}))
