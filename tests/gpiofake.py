"""Scripted GPIO lines and a stand-in for gpiod.Chip, for tests on machines without a GPIO chip
(the real kernel's gpio-sim is tests/vm/test_vm_hardware.py)."""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable, Iterable

WAIT_S = 5.0


MS = 1_000_000


class FakeLine:
    """A LineSource with scripted edges ((seconds from its start, level), or ``push``).

    On the real monotonic clock, ``wait_edges`` blocks until an edge is due, as the kernel's
    does; with ``virtual=True`` it jumps its own clock instead, so debounce tests take no time.
    ``level`` is the level after the edges delivered so far. Thread-safe; ``fail`` makes the
    next call raise, like a line whose chip has gone.
    """

    def __init__(self, level: bool = False, script: Iterable[tuple[float, bool]] = (), *, virtual: bool = False):
        self._cond = threading.Condition()
        self.virtual = virtual
        self.now_ns = 0
        self.t0 = self.clock()
        self._pending = sorted(((self.t0 + round(s * 1e9), lv) for s, lv in script), key=lambda e: e[0])
        self._level = level
        self._error: Exception | None = None
        self.closed = False

    def clock(self) -> int:
        return self.now_ns if self.virtual else time.monotonic_ns()

    def push(self, level: bool, at_ns: int | None = None) -> int:
        """An edge now (or at ``at_ns``); its timestamp."""
        with self._cond:
            t = self.clock() if at_ns is None else at_ns
            self._pending.append((t, level))
            self._pending.sort(key=lambda e: e[0])
            self._cond.notify_all()
        return t

    def fail(self, error: Exception | None = None) -> None:
        with self._cond:
            self._error = error or OSError(errno.ENODEV, "No such device")
            self._cond.notify_all()

    def level(self) -> bool:
        with self._cond:
            self._check()
            return self._level

    def wait_edges(self, timeout_s: float) -> list[tuple[int, bool]]:
        with self._cond:
            if self.virtual:
                self._check()
                deadline = self.now_ns + round(timeout_s * 1e9)
                nxt = self._pending[0][0] if self._pending else deadline + 1
                self.now_ns = max(self.now_ns, min(nxt, deadline))
                return self._take(self.now_ns)
            deadline = time.monotonic_ns() + round(timeout_s * 1e9)
            while True:
                self._check()
                now = time.monotonic_ns()
                if due := self._take(now):
                    return due
                if now >= deadline:
                    return []
                wake = min(deadline, self._pending[0][0]) if self._pending else deadline
                self._cond.wait((wake - now) / 1e9)

    def close(self) -> None:
        self.closed = True

    def _take(self, now: int) -> list[tuple[int, bool]]:
        due = [e for e in self._pending if e[0] <= now]
        del self._pending[: len(due)]
        if due:
            self._level = due[-1][1]
        return due

    def _check(self) -> None:
        if self._error is not None:
            raise self._error
        if self.closed:
            raise OSError(errno.EBADF, "closed")


def wait_for(cond: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)


class FakeChip:
    """Stands in for gpiod.Chip, to check what GpiodLine asks libgpiod for (no GPIO here)."""

    chips = {"/dev/gpiochip0": ("pinctrl-bcm2711", 58, {"GPIO17": 17}),
             "/dev/gpiochip1": ("raspberrypi-exp-gpio", 8, {})}
    busy: set[int] = set()
    requests: list[FakeChip] = []

    def __init__(self, path: str):
        if path not in self.chips:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory")
        self.path = path
        self.label, self.num_lines, self.names = self.chips[path]

    def __enter__(self) -> FakeChip:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def get_info(self) -> object:
        import gpiod
        return gpiod.ChipInfo(name=self.path[5:], label=self.label, num_lines=self.num_lines)

    def line_offset_from_id(self, id: int | str) -> int:  # as gpiod 2.x: a name, else a number
        if isinstance(id, str):
            if id in self.names:
                return self.names[id]
            if not id.isdigit():
                raise OSError(errno.ENOENT, "No such file or directory")
        if int(id) >= self.num_lines:
            raise ValueError("line offset of out range")
        return int(id)

    def get_line_info(self, offset: int) -> object:
        return type("LineInfo", (), {"consumer": "pigpiod"})()

    def request_lines(self, config: dict, consumer: str, event_buffer_size: int) -> FakeChip:
        ((offset, settings),) = config.items()
        if offset in self.busy:
            raise OSError(errno.EBUSY, "Device or resource busy")
        self.offset, self.settings, self.consumer, self.buffer = offset, settings, consumer, event_buffer_size
        self.released = False
        self.requests.append(self)
        return self

    # the request's side
    def get_value(self, offset: int) -> object:
        from gpiod.line import Value
        return Value.ACTIVE

    def wait_edge_events(self, timeout: float) -> bool:
        return True

    def read_edge_events(self) -> list[object]:
        import gpiod
        rising, falling = (gpiod.EdgeEvent.Type.RISING_EDGE.value, gpiod.EdgeEvent.Type.FALLING_EDGE.value)
        return [gpiod.EdgeEvent(rising, 5, self.offset, 1, 1), gpiod.EdgeEvent(falling, 7, self.offset, 2, 2)]

    def release(self) -> None:
        self.released = True
