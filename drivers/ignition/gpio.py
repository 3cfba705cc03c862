"""Ignition from a GPIO input: its state when the agent starts, then every debounced change.

The pipeline switches the reporting policy on these readings (ignition off: `parked`). The
line handling (open, debounce, reopen with backoff) is drivers/gpio/input.py.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from agent.model.reading import Reading
from drivers.base import Emit
from drivers.gpio.input import GpioInputDriver
from drivers.gpio.lines import GpiodLine, LineSource
from drivers.ignition.config import IgnitionConfig

log = logging.getLogger(__name__)


class GpioIgnition(GpioInputDriver):
    kind = "ignition"
    config: IgnitionConfig

    def __init__(self, config: IgnitionConfig, emit: Emit, *, source_factory: Callable[[], LineSource] | None = None):
        super().__init__(config, emit, source_factory=source_factory)
        self.state: bool | None = None
        self.changes = 0

    def _counters(self) -> dict[str, Any]:
        return {"state": self.state, "changes": self.changes}

    def _level_at_open(self, state: bool) -> None:
        log.info("ignition: %s open, %s", self._line, "on" if state else "off")

    def _report(self, active: bool, mono_ns: int) -> None:
        if active == self.state:
            return
        if self.state is not None:
            self.changes += 1
        self.state = active
        data = {"on": active, "source": "gpio"}
        self.emit(Reading("ignition", None, data, meta={"mono_ns": mono_ns}))

    @property
    def _who(self) -> str:
        return "ignition"

    def _open_line(self) -> LineSource:
        c = self.config
        return GpiodLine(c.chip, c.line, active_low=c.active_low, bias=c.bias)
