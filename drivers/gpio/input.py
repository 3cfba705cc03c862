"""A driver on one GPIO input line (ignition, a door contact, a wire-loop seal): open the
line, report its debounced level at start and every debounced change, and reopen it with
backoff when the chip is missing or the line vanishes. Subclasses say what a level means.

Each change carries the monotonic time of the edge that began it, so a reading's time is when
the key turned or the door moved, not when the debounce ended.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import abstractmethod
from collections.abc import Callable
from typing import Any

from agent.model.backoff import backoff_delay
from drivers.base import Driver, Emit
from drivers.gpio.lines import DebouncedInput, LineSource

# How long one wait for edges may block: the longest it takes to notice `stop`.
POLL_S = 0.5


class GpioInputDriver(Driver):
    reopen_min_s = 1.0
    reopen_max_s = 30.0

    def __init__(self, config: Any, emit: Emit, *, source_factory: Callable[[], LineSource] | None = None):
        super().__init__(config, emit)
        self.source_factory = source_factory or self._open_line
        self.connected = False
        self.opens = 0
        self.open_failures = 0
        self.last_error: str | None = None
        self._missed_before = 0
        self._debounced: DebouncedInput | None = None
        # Messages go to the subclass's module logger, as they did before the split.
        self.log = logging.getLogger(type(self).__module__)

    @abstractmethod
    def _report(self, active: bool, mono_ns: int) -> None:
        """The debounced level (True: active); reports only what is news."""

    @abstractmethod
    def _open_line(self) -> LineSource: ...

    @property
    @abstractmethod
    def _who(self) -> str:
        """How log lines name this input: ``ignition``, ``seal rear_door``."""

    def _counters(self) -> dict[str, Any]:
        """The subclass's part of ``status``."""
        return {}

    def _opened(self, state: bool) -> None:
        """The line has just been opened at this level."""

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
            **self._counters(),
            "missed_edges": self._missed_before + (d.missed if (d := self._debounced) else 0),
        }

    def _watch(self, source: LineSource, stop: threading.Event) -> None:
        debounced = self._debounced = DebouncedInput(source, self.config.debounce_ms / 1000)
        self._opened(debounced.state)
        # After a reopen only a change is news: the level may have moved while the line was gone.
        self._report(debounced.state, time.monotonic_ns())
        try:
            while not stop.is_set():
                for mono_ns, active in debounced.poll(POLL_S):
                    self._report(active, mono_ns)
        finally:
            self._missed_before += debounced.missed
            self._debounced = None

    def _error(self, message: str, error: Exception, loud: bool) -> None:
        self.last_error = message
        # A traceback only for the unexpected: OSError is the hardware talking.
        if loud:
            self.log.warning("%s: %s", self._who, message, exc_info=not isinstance(error, OSError))
        else:
            self.log.debug("%s: %s", self._who, message)

    @property
    def _line(self) -> str:
        return f"GPIO {self.config.chip} line {self.config.line}"
