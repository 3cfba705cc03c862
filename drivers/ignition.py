"""Ignition from a GPIO input: its state when the agent starts, then every debounced change.

The pipeline switches the reporting policy on these readings (ignition off: `parked`). Each
change carries the monotonic time of the edge that began it, so its timestamp is when the key
turned, even though it is only known a debounce period later.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from agent.backoff import backoff_delay
from agent.config import IgnitionConfig
from agent.reading import Reading
from drivers.base import Driver, Emit
from drivers.gpio import DebouncedInput, GpiodLine, LineSource

log = logging.getLogger(__name__)

# How long one wait for edges may block: the longest it takes to notice `stop`.
POLL_S = 0.5


class GpioIgnition(Driver):
    kind = "ignition"
    reopen_min_s = 1.0
    reopen_max_s = 30.0

    def __init__(
        self,
        config: IgnitionConfig,
        emit: Emit,
        *,
        source_factory: Callable[[], LineSource] | None = None,
    ):
        super().__init__(config, emit)
        self.source_factory = source_factory or self._open_line
        self.connected = False
        self.opens = 0
        self.open_failures = 0
        self.last_error: str | None = None
        self.state: bool | None = None
        self.changes = 0
        self._missed_before = 0
        self._debounced: DebouncedInput | None = None

    def run(self, stop: threading.Event) -> None:
        failures = 0
        while not stop.is_set():
            try:
                source = self.source_factory()
            except Exception as e:  # noqa: BLE001 - a missing chip or a busy line: retry, never die
                self.open_failures += 1
                failures += 1
                self._error(f"cannot open {self._line}: {e}", e, loud=failures == 1)
                stop.wait(backoff_delay(failures, self.reopen_min_s, self.reopen_max_s))
                continue
            failures = 0
            self.opens += 1
            self.connected = True
            lost = False
            try:
                self._watch(source, stop)
            except Exception as e:  # noqa: BLE001 - a vanished line is reopened, never fatal
                self._error(f"{self._line} lost: {e}", e, loud=True)
                lost = True
            finally:
                self.connected = False
                try:
                    source.close()
                except Exception:  # noqa: BLE001 - closing a vanished line may fail; it is gone
                    pass
            if lost:
                stop.wait(backoff_delay(1, self.reopen_min_s, self.reopen_max_s))

    def status(self) -> dict[str, Any]:
        return {
            "line": self._line,
            "connected": self.connected,
            "opens": self.opens,
            "open_failures": self.open_failures,
            "last_error": self.last_error,
            "state": self.state,
            "changes": self.changes,
            "missed_edges": self._missed_before + (d.missed if (d := self._debounced) else 0),
        }

    def _watch(self, source: LineSource, stop: threading.Event) -> None:
        debounced = self._debounced = DebouncedInput(source, self.config.debounce_ms / 1000)
        log.info("ignition: %s open, %s", self._line, "on" if debounced.state else "off")
        # After a reopen only a change is news: the level may have moved while the line was gone.
        self._report(debounced.state, time.monotonic_ns())
        try:
            while not stop.is_set():
                for mono_ns, on in debounced.poll(POLL_S):
                    self._report(on, mono_ns)
        finally:
            self._missed_before += debounced.missed
            self._debounced = None

    def _report(self, on: bool, mono_ns: int) -> None:
        if on == self.state:
            return
        if self.state is not None:
            self.changes += 1
        self.state = on
        data = {"on": on, "source": "gpio"}
        self.emit(Reading("ignition", None, data, meta={"mono_ns": mono_ns}))

    def _error(self, message: str, error: Exception, loud: bool) -> None:
        self.last_error = message
        # A traceback only for the unexpected: OSError is the hardware talking.
        if loud:
            log.warning("ignition: %s", message, exc_info=not isinstance(error, OSError))
        else:
            log.debug("ignition: %s", message)

    @property
    def _line(self) -> str:
        return f"GPIO {self.config.chip} line {self.config.line}"

    def _open_line(self) -> LineSource:
        c = self.config
        return GpiodLine(c.chip, c.line, active_low=c.active_low, bias=c.bias)
