"""Trusted time for readings on a computer without a real-time clock.

A Raspberry Pi boots with whatever time it saved at shutdown, days off until NTP (which needs
the network we often lack) or the GPS sets it. So readings are stamped from a monotonic
reference: GPS time observed at a known monotonic instant gives ``utc = mono + offset``,
immune to the system clock being wrong or jumping. Without GPS time the system clock is used
only when NTP has synchronised it (agent/model/ntpsync.py); otherwise the reading's time is *pending*:
the store holds it, and it is corrected once GPS time is known (same boot), or goes out
flagged as untrusted after ``max_hold_s``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from agent.model.ntpsync import kernel_clock_synchronised

TrustMode = Literal["auto", "always", "never"]
BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")

__all__ = ["BOOT_ID_PATH", "Stamp", "TimeKeeper", "TrustMode", "boot_id", "kernel_clock_synchronised"]


def boot_id() -> str:
    """Monotonic times are comparable only within one boot."""
    try:
        return BOOT_ID_PATH.read_text().strip()
    except OSError:
        return "unknown"


@dataclass(frozen=True, slots=True)
class Stamp:
    ts_ms: int | None
    """UTC milliseconds, or None while the time is not known."""
    source: Literal["gps", "system", "pending"]


class TimeKeeper:
    """Turns a monotonic instant into UTC; thread-safe."""

    def __init__(
        self,
        *,
        trust_system_clock: TrustMode = "auto",
        wall_ns: Callable[[], int] = time.time_ns,
        mono_ns: Callable[[], int] = time.monotonic_ns,
        synchronised: Callable[[], bool] = kernel_clock_synchronised,
        recheck_s: float = 60.0,
    ):
        self.trust = trust_system_clock
        self._wall_ns = wall_ns
        self._mono_ns = mono_ns
        self._synchronised = synchronised
        self._recheck_ns = int(recheck_s * 1e9)
        self._lock = threading.Lock()
        self._gps_offset_ns: int | None = None
        self._sync_checked_at: int | None = None
        self._sync = False
        self.gps_fixes = 0

    def mono_now(self) -> int:
        return self._mono_ns()

    def observe_gps(self, utc_ms: int, mono_ns: int) -> None:
        """A fix with GPS time ``utc_ms`` was received at ``mono_ns``."""
        with self._lock:
            self._gps_offset_ns = utc_ms * 1_000_000 - mono_ns
            self.gps_fixes += 1

    @property
    def has_gps_time(self) -> bool:
        return self._gps_offset_ns is not None

    def system_trusted(self) -> bool:
        if self.trust != "auto":
            return self.trust == "always"
        return self._kernel_synchronised()

    def ntp_now_ms(self) -> int | None:
        """The system clock's time if NTP has synchronised it, else None: independent evidence
        to judge a receiver's dates by. ``trust_system_clock = "always"`` is a technician's
        say-so, not evidence, so only the synchronisation itself counts here."""
        if self.trust == "never" or not self._kernel_synchronised():
            return None
        return self._wall_ns() // 1_000_000

    def _kernel_synchronised(self) -> bool:
        now = self._mono_ns()
        if self._sync_checked_at is None or now - self._sync_checked_at >= self._recheck_ns:
            self._sync = self._synchronised()
            self._sync_checked_at = now
        return self._sync

    def stamp(self, mono_ns: int | None = None) -> Stamp:
        """The UTC time of monotonic instant ``mono_ns`` (default: now)."""
        mono = self._mono_ns() if mono_ns is None else mono_ns
        offset = self._gps_offset_ns
        if offset is not None:
            return Stamp((mono + offset) // 1_000_000, "gps")
        if self.system_trusted():
            return Stamp((self._wall_ns() - (self._mono_ns() - mono)) // 1_000_000, "system")
        return Stamp(None, "pending")

    def system_clock_error_s(self) -> float | None:
        """How far the system clock is from GPS time (positive: system ahead)."""
        offset = self._gps_offset_ns
        if offset is None:
            return None
        return (self._wall_ns() - (self._mono_ns() + offset)) / 1e9

    def wall_ms(self, mono_ns: int) -> int:
        """The (untrusted) system clock's idea of ``mono_ns``: the last resort."""
        return (self._wall_ns() - (self._mono_ns() - mono_ns)) // 1_000_000
