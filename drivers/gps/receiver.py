"""GPS over NMEA 0183: a serial port (any pyserial URL) or a replayed capture file."""

from __future__ import annotations

import glob
import gzip
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import serial

from agent.model.reading import Reading, iso_ms
from drivers.base import Emit, ReconnectingDriver
from drivers.devices import serial_port
from drivers.gps import fix as gps_fix
from drivers.gps.config import GpsConfig
from drivers.gps.fix import Fix
from drivers.gps.gnsstime import GnssTimeJudge
from drivers.gps.nmea import NmeaAssembler

log = logging.getLogger(__name__)

# NMEA sentences are at most 82 characters; anything much longer is noise or a lost newline.
MAX_LINE = 256
# With no data for this long, the epoch in progress is complete (the receiver went quiet).
QUIET_S = 1.5
# A replay paced at its own times waits out gaps up to this long (real seconds) between fixes.
MAX_PACING_WAIT_S = 60.0


class NmeaGps(ReconnectingDriver):
    kind = "gps"
    open_errors = (serial.SerialException, OSError, ValueError)
    lost_errors = (serial.SerialException, OSError)

    def __init__(self, config: GpsConfig, emit: Emit):
        super().__init__(config, emit)
        self.finite = config.replay is not None
        # A live receiver's dates are judged against NTP time when the kernel has it; a
        # capture's against its own date (drivers/gps/gnsstime.py).
        judge = GnssTimeJudge(live=not self.finite, system_now_ms=self._ntp_now_ms)
        self.nmea = NmeaAssembler(judge=judge)
        self.overlong = 0
        self.device: str | None = None
        """The device actually open (a glob in `port` picks one)."""
        self.last_fix: Fix | None = None

    @classmethod
    def check(cls, config: GpsConfig) -> list[str]:
        """A replayed capture must read to its end (a ``.gz`` must be whole gzip) before the
        run starts: a replay that fails on the way ends its source early."""
        if config.replay is None:
            return []
        if not config.replay.is_file():  # a device or a pipe would be read for ever
            return [f"[gps] replay: {config.replay} is not a file; must be a NMEA capture (optionally .gz)"]
        try:
            with _open_capture(config.replay) as f:
                while f.read(1 << 20):
                    pass
        except (OSError, EOFError, ValueError) as e:  # gzip.BadGzipFile is an OSError
            return [f"[gps] replay: cannot read {config.replay}: {e}; must be a NMEA capture (optionally .gz)"]
        return []

    @classmethod
    def devices(cls, config: GpsConfig) -> list[str]:
        return serial_port(config.port) if config.port else []

    def run(self, stop: threading.Event) -> None:
        if self.config.replay is not None:
            self._replay(self.config.replay, stop)
        else:
            super().run(stop)

    def snapshot(self) -> dict[str, Any]:
        c = self.nmea.counters
        fix = self.last_fix
        return {
            "source": str(self.config.replay or self.config.port),
            "device": self.device,
            "connected": self.connected,
            "opens": self.opens,
            "open_failures": self.open_failures,
            "last_error": self.last_error,
            "last_fix_ts": iso_ms(fix.ts_ms) if fix else None,
            "lines": c.lines,
            "fixes": c.fixes,
            "bad_checksum": c.bad_checksum,
            "garbage": c.garbage + self.overlong,
            "bad_field": c.bad_field,
            "no_fix": c.no_fix,
            "no_date": c.no_date,
            "bad_date": c.bad_date,
            "ignored": c.ignored,
            "internal_errors": c.internal_errors,
            "rollover_corrected": self.nmea.judge.rollover,
            "dates": self.nmea.judge.snapshot(),
            "out_of_range": dict(self.nmea.ranges.counts),
            "satellites_in_view": self.nmea.satellites_in_view,
        }

    def health(self, status: dict[str, Any]) -> dict[str, Any]:
        return gps_fix.health(status)

    def _ntp_now_ms(self) -> int | None:
        return self.clock.ntp_now_ms() if self.clock is not None else None

    def _emit(self, fixes: Iterator[Fix]) -> None:
        for fix in fixes:
            self.last_fix = fix
            meta = {"mono_ns": time.monotonic_ns(), "mode": fix.mode, "replay": self.finite}
            self.emit(Reading("position", fix.ts_ms, fix.as_data(), meta=meta))

    # -- replay -------------------------------------------------------------------------------

    def _replay(self, path: Path, stop: threading.Event) -> None:
        speed = self.config.replay_speed
        clock: tuple[float, int] | None = None  # (monotonic start, first fix time)
        self.connected = True
        try:
            with _open_capture(path) as f:
                for line in f:
                    if stop.is_set():
                        return
                    for fix in self.nmea.feed(line):
                        if speed > 0:
                            now = time.monotonic()
                            if clock is None:
                                clock = (now, fix.ts_ms)
                            wait = clock[0] + (fix.ts_ms - clock[1]) / 1000 / speed - now
                            if not -1.0 <= wait <= MAX_PACING_WAIT_S:
                                # Time went back, or a gap longer than any worth waiting out:
                                # pace the rest of the capture from here.
                                clock, wait = (now, fix.ts_ms), 0.0
                            if stop.wait(max(0.0, wait)):
                                return
                        self._emit(iter((fix,)))
            self._emit(self.nmea.finish())
        finally:
            self.connected = False

    # -- serial (the loop: drivers/base.py ReconnectingDriver) -----------------------------------

    def _open(self) -> serial.SerialBase:
        path = _resolve(self.config.port)
        port = serial.serial_for_url(path, baudrate=self.config.baudrate, timeout=0.5)
        self.device = path
        return port

    def _opened(self, port: serial.SerialBase) -> None:
        log.info("GPS %s open", self.device)

    def _closed(self, port: serial.SerialBase) -> None:
        self._emit(self.nmea.finish())

    def _open_failed(self, error: BaseException) -> str:
        return f"cannot open {self.config.port}: {error}"

    def _lost(self, error: BaseException) -> str:
        return f"{self.config.port} lost: {error}"

    def _log_problem(self, message: str, error: BaseException | None, loud: bool) -> None:
        (log.warning if loud else log.debug)("GPS: %s", message)

    def _read(self, port: serial.SerialBase, stop: threading.Event) -> None:
        buf = b""
        quiet_since = time.monotonic()
        while not stop.is_set():
            chunk = port.read(max(1, port.in_waiting))
            now = time.monotonic()
            if not chunk:
                if now - quiet_since >= QUIET_S:
                    self._emit(self.nmea.finish())
                    quiet_since = now
                continue
            quiet_since = now
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                self._emit(self.nmea.feed(line))
            if len(buf) > MAX_LINE:
                self.overlong += 1
                buf = b""


def _resolve(port: str) -> str:
    """A glob (``/dev/serial/by-id/usb-u-blox*``) names whichever matching device is plugged
    in now: a USB receiver may come back under another name after a replug."""
    if not any(c in port for c in "*?[") or "://" in port:
        return port
    matches = sorted(glob.glob(port))
    if not matches:
        raise serial.SerialException(f"no device matches {port}")
    return matches[0]


def _open_capture(path: Path) -> IO[bytes] | gzip.GzipFile:
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    return open(path, "rb")

