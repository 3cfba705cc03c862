"""Logging for a device nobody watches: to journald (or stderr), and bounded in volume.

A GPS unplugged for a week, a broker refusing every minute: the same message again and
again would fill the journal and wear the SD card. Each distinct message (logger and format
string, not its arguments) may appear ``burst`` times per ``window_s``; after that it is
counted, and one line says how many were suppressed when the window ends.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable


class RateLimit(logging.Filter):
    def __init__(self, burst: int = 10, window_s: float = 300.0, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.burst = burst
        self.window_s = window_s
        self.clock = clock
        self._windows: dict[tuple[str, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        now = self.clock()
        start, count = self._windows.get(key, (now, 0))
        if now - start >= self.window_s:
            if count > self.burst:
                record.msg = f"{record.msg} (and {count - self.burst} more like it in the last {self.window_s:.0f} s)"
            start, count = now, 0
        count += 1
        self._windows[key] = (start, count)
        if len(self._windows) > 10_000:  # unbounded keys (a message with its data baked in)
            self._windows.clear()
        return count <= self.burst


def setup(level: str) -> None:
    # Under systemd, journald stamps the time itself.
    fmt = "%(levelname)s %(name)s: %(message)s"
    if "JOURNAL_STREAM" not in os.environ:
        fmt = "%(asctime)s " + fmt
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt))
    handler.addFilter(RateLimit())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    logging.getLogger("paho").setLevel(logging.WARNING)
