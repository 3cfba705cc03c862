"""A door contact or a wire-loop seal on a GPIO input: its state when the agent starts, then
every debounced change, as urgent `seal` events.

The line is requested with ``active_low`` set from ``opened_when``, so "active" always means
open (door) or cut (wire loop), whichever level the wiring gives it. The line handling (open,
debounce, reopen with backoff) is drivers/gpio/input.py.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from agent.model.reading import Reading
from drivers.base import Emit
from drivers.gpio.input import GpioInputDriver
from drivers.gpio.lines import GpiodLine, LineSource
from drivers.seal.config import GpioSealConfig

log = logging.getLogger(__name__)


class GpioSeal(GpioInputDriver):
    kind = "seal"
    config: GpioSealConfig

    def __init__(self, config: GpioSealConfig, emit: Emit, *, source_factory: Callable[[], LineSource] | None = None):
        super().__init__(config, emit, source_factory=source_factory)
        self.state: str | None = None
        """The last event reported: sealed, opened or tampered."""
        self.events = 0

    def _counters(self) -> dict[str, Any]:
        return {"state": self.state, "events": self.events}

    def _report(self, active: bool, mono_ns: int) -> None:
        event = ("opened" if self.config.kind == "door" else "tampered") if active else "sealed"
        if event == self.state:
            return
        self.state = event
        self.events += 1
        log.info("seal %s: %s", self.config.name, event)
        data = {"seal": self.config.name, "event": event, "seal_id": None, "battery_pct": None, "source": "gpio"}
        self.emit(Reading("seal", None, data, urgent=True, meta={"mono_ns": mono_ns}))

    @property
    def _who(self) -> str:
        return f"seal {self.config.name}"

    def _open_line(self) -> LineSource:
        c = self.config
        return GpiodLine(c.chip, c.line, active_low=c.opened_when == "low", bias=c.bias)
