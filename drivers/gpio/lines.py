"""GPIO inputs (ignition, door contacts, wire-loop seals): edges from the kernel, debounced here.

Lines are read through the GPIO character device with libgpiod v2 and edge events stamped by
the kernel on the monotonic clock, so an event's time is when the contact moved, not when
this process got round to reading it, and compares directly with ``time.monotonic_ns()``.
Debouncing is done here rather than by the kernel's ``debounce_period``, which stamps an
event when the debounce period ends instead of at the edge that began the stable level.
"""

from __future__ import annotations

import errno
import glob
import time
from collections.abc import Callable
from typing import Any, Protocol

# Edges the kernel buffers between two reads (its default is 16; on overflow the oldest go).
EVENT_BUFFER = 64
_BIAS = {"as-is": "AS_IS", "pull-up": "PULL_UP", "pull-down": "PULL_DOWN", "disabled": "DISABLED"}


class GpioError(OSError):
    """A line that cannot be used, said so that a technician can act on it."""


class LineSource(Protocol):
    """One input line, in logical terms: True is active (after ``active_low``)."""

    def level(self) -> bool: ...

    def wait_edges(self, timeout_s: float) -> list[tuple[int, bool]]:
        """Edges as (monotonic ns, active after the edge), oldest first; [] on timeout."""
        ...

    def close(self) -> None: ...


class GpiodLine:
    """A line requested through libgpiod v2 as an input with edge events on both edges."""

    def __init__(
        self,
        chip: str,
        line: int | str,
        *,
        active_low: bool = False,
        bias: str = "as-is",
        consumer: str = "lorry-agent",
    ):
        # Imported here: the rest of this module (and its tests) must work without libgpiod.
        import gpiod
        from gpiod.line import Bias, Clock, Direction, Edge

        path = chip if chip.startswith("/dev/") else _find_chip(gpiod, chip)
        try:
            handle = gpiod.Chip(path)
        except OSError as e:
            raise GpioError(f"cannot open GPIO chip {path}: {e.strerror or e}") from e
        with handle:
            self.offset = _offset(handle, path, line)
            settings = gpiod.LineSettings(
                direction=Direction.INPUT,
                edge_detection=Edge.BOTH,
                bias=getattr(Bias, _BIAS[bias]),
                active_low=active_low,
                event_clock=Clock.MONOTONIC,
            )
            try:
                self._request = handle.request_lines(
                    {self.offset: settings}, consumer=consumer, event_buffer_size=EVENT_BUFFER
                )
            except OSError as e:
                if e.errno == errno.EBUSY:
                    owner = handle.get_line_info(self.offset).consumer
                    msg = f"GPIO line {self.offset} on {path} is in use by {owner!r}"
                    raise GpioError(msg) from e
                raise GpioError(f"cannot request GPIO line {self.offset} on {path}: {e}") from e
        self.path = path
        self._rising = gpiod.EdgeEvent.Type.RISING_EDGE

    def level(self) -> bool:
        return bool(self._request.get_value(self.offset))

    def wait_edges(self, timeout_s: float) -> list[tuple[int, bool]]:
        if not self._request.wait_edge_events(max(0.0, timeout_s)):
            return []
        events = self._request.read_edge_events()
        return [(e.timestamp_ns, e.event_type is self._rising) for e in events]

    def close(self) -> None:
        self._request.release()


def _find_chip(gpiod: Any, label: str) -> str:
    """The chip's path by its label: numbering differs between Pi models and kernels."""
    found = []
    for path in sorted(glob.glob("/dev/gpiochip*"), key=lambda p: (len(p), p)):
        if not gpiod.is_gpiochip_device(path):
            continue
        try:
            with gpiod.Chip(path) as c:
                name = c.get_info().label
        except OSError as e:
            found.append(f"{path} (cannot open: {e.strerror or e})")
            continue
        if name == label:
            return path
        found.append(f"{path} {name!r}")
    raise GpioError(f"no GPIO chip labelled {label!r} (found: {', '.join(found) or 'none'})")


def _offset(chip: Any, path: str, line: int | str) -> int:
    try:
        offset: int = chip.line_offset_from_id(line)
        return offset
    except (OSError, ValueError):
        if isinstance(line, str):
            raise GpioError(f"GPIO chip {path} has no line named {line!r}") from None
        n = chip.get_info().num_lines
        raise GpioError(f"GPIO chip {path} has no line {line} (it has {n} lines)") from None


class DebouncedInput:
    """Stable state changes from the raw edges of a LineSource.

    A new level counts once it has held for ``debounce_s``; the change carries the time of the
    edge that began it. Two edges in a row to the same level mean the kernel lost or merged
    the one between (it reads the level after a bounce, which may already have bounced back),
    so the level is taken to start again at the later one.
    """

    def __init__(
        self, source: LineSource, debounce_s: float, *, clock: Callable[[], int] = time.monotonic_ns
    ):
        self.source = source
        self._debounce_ns = int(debounce_s * 1e9)
        self._clock = clock
        self._state = self._raw = source.level()
        self._since = clock()
        self.missed = 0
        """Level changes found by reading the line, with no edge for them (buffer overflow)."""

    @property
    def state(self) -> bool:
        return self._state

    def poll(self, timeout_s: float) -> list[tuple[int, bool]]:
        """Wait up to ``timeout_s`` (less when a level is about to count); the stable changes
        as (monotonic ns of their first edge, state), oldest first."""
        wait = timeout_s
        if self._raw != self._state:
            due_ns = self._since + self._debounce_ns - self._clock()
            wait = min(wait, max(0.0, due_ns / 1e9))
        edges = self.source.wait_edges(wait)
        changes: list[tuple[int, bool]] = []
        for t, level in edges:
            self._settle(t, changes)  # a batch read late may hold a level that already counted
            self._raw, self._since = level, t
        if not edges:
            level = self.source.level()
            if level != self._raw:
                self.missed += 1
                self._raw, self._since = level, self._clock()
        self._settle(self._clock(), changes)
        return changes

    def _settle(self, now_ns: int, changes: list[tuple[int, bool]]) -> None:
        if self._raw != self._state and now_ns - self._since >= self._debounce_ns:
            self._state = self._raw
            changes.append((self._since, self._raw))
