"""A driver on one GPIO input line (ignition, a door contact, a wire-loop seal): open the
line, report its debounced level at start and every debounced change, and reopen it with
backoff when the chip is missing or the line vanishes. Subclasses say what a level means.

Each change carries the monotonic time of the edge that began it, so a reading's time is when
the key turned or the door moved, not when the debounce ended.
"""

from __future__ import annotations

import threading
import time
from abc import abstractmethod
from collections.abc import Callable
from typing import Any

from agent.model.backoff import backoff_delay
from drivers.base import Emit, ReconnectingDriver
from drivers.devices import GPIOCHIP
from drivers.gpio.lines import DebouncedInput, LineSource

# How long one wait for edges may block: the longest it takes to notice `stop`.
POLL_S = 0.5


class GpioInputDriver(ReconnectingDriver):
    reopen_min_s = 1.0
    reopen_max_s = 30.0
    # A missing chip, a busy line, a line that vanished: whatever it is, retry, never die.
    open_errors = (Exception,)
    lost_errors = (Exception,)

    def __init__(self, config: Any, emit: Emit, *, source_factory: Callable[[], LineSource] | None = None):
        super().__init__(config, emit)
        self.source_factory = source_factory or self._open_line
        self._missed_before = 0
        self._debounced: DebouncedInput | None = None

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

    def _level_at_open(self, state: bool) -> None:
        """The line has just been opened at this level."""

    @classmethod
    def devices(cls, config: Any) -> list[str]:
        return [GPIOCHIP]

    # -- the line (the loop: drivers/base.py ReconnectingDriver) --------------------------------

    def _open(self) -> LineSource:
        return self.source_factory()

    def _read(self, source: LineSource, stop: threading.Event) -> None:
        self._watch(source, stop)

    def _open_failed(self, error: BaseException) -> str:
        return f"cannot open {self._line}: {error}"

    def _lost(self, error: BaseException) -> str:
        return f"{self._line} lost: {error}"

    def _reopen_delay(self) -> float:
        return backoff_delay(1, self.reopen_min_s, self.reopen_max_s)

    def snapshot(self) -> dict[str, Any]:
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
        self._level_at_open(debounced.state)
        # After a reopen only a change is news: the level may have moved while the line was gone.
        self._report(debounced.state, time.monotonic_ns())
        try:
            while not stop.is_set():
                for mono_ns, active in debounced.poll(POLL_S):
                    self._report(active, mono_ns)
        finally:
            self._missed_before += debounced.missed
            self._debounced = None

    def _log_problem(self, message: str, error: BaseException | None, loud: bool) -> None:
        # A traceback only for the unexpected: OSError is the hardware talking.
        if loud:
            self.log.warning("%s: %s", self._who, message, exc_info=not isinstance(error, OSError))
        else:
            self.log.debug("%s: %s", self._who, message)

    @property
    def _line(self) -> str:
        return f"GPIO {self.config.chip} line {self.config.line}"
