"""A door contact or a wire-loop seal on a GPIO input: its state when the agent starts, then
every debounced change, as urgent `seal` events.

The line is requested with ``active_low`` set from ``opened_when``, so "active" always means
open (door) or cut (wire loop), whichever level the wiring gives it. Each event carries the
monotonic time of the edge that began it: when the door moved, not when the debounce ended.
The reopen loop follows drivers/ignition.py.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from agent.backoff import backoff_delay
from agent.cargo_config import GpioSealConfig
from agent.reading import Reading
from drivers.base import Driver, Emit
from drivers.gpio import DebouncedInput, GpiodLine, LineSource

log = logging.getLogger(__name__)

# How long one wait for edges may block: the longest it takes to notice `stop`.
POLL_S = 0.5


class GpioSeal(Driver):
    kind = "seal"
    reopen_min_s = 1.0
    reopen_max_s = 30.0

    def __init__(
        self,
        config: GpioSealConfig,
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
        self.state: str | None = None
        """The last event reported: sealed, opened or tampered."""
        self.events = 0
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
            "events": self.events,
            "missed_edges": self._missed_before + (d.missed if (d := self._debounced) else 0),
        }

    def _watch(self, source: LineSource, stop: threading.Event) -> None:
        debounced = self._debounced = DebouncedInput(source, self.config.debounce_ms / 1000)
        # After a reopen only a change is news: the contact may have moved while the line was gone.
        self._report(debounced.state, time.monotonic_ns())
        try:
            while not stop.is_set():
                for mono_ns, active in debounced.poll(POLL_S):
                    self._report(active, mono_ns)
        finally:
            self._missed_before += debounced.missed
            self._debounced = None

    def _report(self, active: bool, mono_ns: int) -> None:
        event = ("opened" if self.config.kind == "door" else "tampered") if active else "sealed"
        if event == self.state:
            return
        self.state = event
        self.events += 1
        log.info("seal %s: %s", self.config.name, event)
        data = {"seal": self.config.name, "event": event, "seal_id": None, "battery_pct": None, "source": "gpio"}
        self.emit(Reading("seal", None, data, urgent=True, meta={"mono_ns": mono_ns}))

    def _error(self, message: str, error: Exception, loud: bool) -> None:
        self.last_error = message
        # A traceback only for the unexpected: OSError is the hardware talking.
        if loud:
            log.warning("seal %s: %s", self.config.name, message, exc_info=not isinstance(error, OSError))
        else:
            log.debug("seal %s: %s", self.config.name, message)

    @property
    def _line(self) -> str:
        return f"GPIO {self.config.chip} line {self.config.line}"

    def _open_line(self) -> LineSource:
        c = self.config
        return GpiodLine(c.chip, c.line, active_low=c.opened_when == "low", bias=c.bias)
