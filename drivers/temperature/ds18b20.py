"""DS18B20 1-Wire temperature sensors through the kernel's w1_therm driver (sysfs).

Every interval gives one reading, valid or not: a failing sensor is reported with its reason,
never skipped, so the cold chain can tell a broken probe from a steady temperature. The
failures a cargo probe really shows: a CRC error on a long or noisy cable (``crc``; an
all-zero scratchpad, a shorted data line, and an all-ones one, nothing answering on an open
line (``t=-62``), count as one too, even when the verdict says YES); 85.000 °C exactly, the
power-on value read before any conversion after a brown-out (``reset_value``); a probe gone
from the bus, its files vanished (``missing``); a read the kernel fails, permission denied, or
something that is not a file where the attribute should be, a FIFO or a device that would block
or never end (``io_error``); and anything unparseable, malformed (a scratchpad that is not 9
bytes, a second line that does not repeat it, a number as only Python would read it:
``4_500``, ``+4500``), longer than a sysfs page, or outside the sensor's range (``garbage``).
A value is published only inside agent/model/ranges.py ``temperature_c`` as well. ``w1_root`` is
configurable so that tests read a fake tree through the same code.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import threading
import time
from pathlib import Path
from typing import Any

from agent.model.ranges import RangeCheck, describe
from agent.model.reading import Reading
from drivers.base import Driver, Emit
from drivers.temperature.config import Ds18b20Config

log = logging.getLogger(__name__)

ERRORS = ("crc", "reset_value", "missing", "io_error", "garbage")
RESET_MILLI_C = 85_000
RANGE_MILLI_C = (-55_000, 125_000)  # the DS18B20's; beyond it is a misread
# A sysfs attribute is at most a page; anything longer is not what the kernel wrote.
MAX_FILE = 4096
MILLI = re.compile(r"-?[0-9]{1,9}")
NOT_FILES = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
HEX_BYTE = re.compile(r"[0-9a-fA-F]{2}")


class BadRead(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


class Ds18b20(Driver):
    kind = "temperature"

    def __init__(self, config: Ds18b20Config, emit: Emit):
        super().__init__(config, emit)
        self.reads = 0
        self.ok = 0
        self.errors = dict.fromkeys(ERRORS, 0)
        self.ranges = RangeCheck()
        """Values refused by agent/model/ranges.py (a guard behind the sensor's own range)."""
        self.last_c: float | None = None
        self.error: str | None = None
        """The current failure, None while readings are good."""
        self.last_error: str | None = None

    def run(self, stop: threading.Event) -> None:
        due = time.monotonic()
        while not stop.is_set():
            self.sample()
            # A slow bus (each read converts, ~750 ms) may overrun a short interval: no burst after.
            due = max(due + self.config.interval_s, time.monotonic())
            if stop.wait(due - time.monotonic()):
                return

    def snapshot(self) -> dict[str, Any]:
        return {
            "path": str(self.config.w1_root / self.config.sensor_id),
            "reads": self.reads,
            "ok": self.ok,
            **self.errors,
            "out_of_range": dict(self.ranges.counts),
            "last_c": self.last_c,
            "error": self.error,
            "last_error": self.last_error,
        }

    def sample(self) -> Reading:
        """Read the sensor once and emit the reading."""
        mono = time.monotonic_ns()
        c: float | None = None
        error: str | None = None
        try:
            c = read_celsius(self.config.w1_root, self.config.sensor_id)
            if self.ranges.keep("temperature_c", c) is None:
                value, c = c, None
                raise BadRead("garbage",
                              f"{self.config.name}: {value} °C outside temperature_c {describe('temperature_c')}")
        except BadRead as e:
            error, detail = e.reason, str(e)
        except Exception as e:  # noqa: BLE001 - a reading that cannot be made is reported, never fatal
            log.warning("temperature %s: unexpected failure", self.config.name, exc_info=True)
            error, detail = "garbage", f"{type(e).__name__}: {e}"
        self.reads += 1
        if error is None:
            self.ok += 1
            self.last_c = c
            if self.error is not None:
                log.info("temperature %s: reading again (%.2f °C)", self.config.name, c)
        else:
            self.errors[error] += 1
            self.last_error = detail
            if error != self.error:  # once per kind of trouble, not every interval
                log.warning("temperature %s: %s", self.config.name, detail)
        self.error = error
        reading = Reading("temperature", None, {"sensor": self.config.name, "c": c, "error": error},
                          meta={"mono_ns": mono})
        self.emit(reading)
        return reading


def read_celsius(w1_root: Path, sensor_id: str) -> float:
    """The sensor's temperature in °C (to 0.01), from ``w1_slave`` (with the CRC verdict), else
    from ``temperature`` (millidegrees, newer kernels); BadRead says why not."""
    device = w1_root / sensor_id
    for name, parse in (("w1_slave", _w1_slave), ("temperature", _millidegrees)):
        try:
            data = _read_attribute(device / name)
        except FileNotFoundError:
            continue
        except OSError as e:
            raise BadRead("io_error", f"cannot read {device / name}: {e.strerror or e}") from None
        if len(data) > MAX_FILE:
            raise BadRead("garbage", f"{device / name}: more than {MAX_FILE} bytes, not a sysfs attribute")
        try:
            text = data.decode("ascii")
        except UnicodeDecodeError:
            raise BadRead("garbage", f"{device / name}: not text") from None
        return parse(text, device / name)
    if not w1_root.is_dir():
        raise BadRead("missing", f"no 1-Wire bus at {w1_root} (dtoverlay=w1-gpio?)")
    raise BadRead("missing", f"no sensor {sensor_id} on the 1-Wire bus ({w1_root})")


def _read_attribute(path: Path) -> bytes:
    """The file's bytes, at most ``MAX_FILE`` + 1 of them; OSError for anything that is not a
    regular file (a FIFO would block for ever, /dev/zero never end), FileNotFoundError if gone."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((k for test, k in NOT_FILES if test(mode)), "not a regular file")
            raise OSError(f"{kind}, not a regular file")
        data = b""
        while len(data) <= MAX_FILE:
            chunk = os.read(fd, MAX_FILE + 1 - len(data))
            if not chunk:
                break
            data += chunk
        return data
    finally:
        os.close(fd)


def _w1_slave(text: str, path: Path) -> float:
    """``72 01 4b 46 7f ff 0e 10 57 : crc=57 YES`` then ``72 01 ... 57 t=23125``: the 9 bytes of
    the scratchpad, the kernel's CRC and its verdict, then the same 9 bytes and the value."""
    lines = text.splitlines()
    if len(lines) != 2 or " : crc=" not in lines[0]:
        raise BadRead("garbage", f"{path}: unexpected content {text[:80]!r}")
    scratchpad, _, verdict = lines[0].partition(" : crc=")
    pad = scratchpad.split()
    if len(pad) != 9 or not all(HEX_BYTE.fullmatch(b) for b in pad):
        raise BadRead("garbage", f"{path}: not a 9-byte scratchpad: {scratchpad[:40]!r}")
    crc = verdict.split()
    if len(crc) == 2 and HEX_BYTE.fullmatch(crc[0]) and crc[1] == "NO":
        raise BadRead("crc", f"{path}: CRC error ({lines[0].strip()})")
    if len(crc) != 2 or not HEX_BYTE.fullmatch(crc[0]) or crc[1] != "YES":
        raise BadRead("garbage", f"{path}: no CRC verdict in {lines[0][:80]!r}")
    if {b.lower() for b in pad} == {"00"}:
        raise BadRead("crc", f"{path}: all-zero scratchpad (data line shorted?)")
    if {b.lower() for b in pad} == {"ff"}:
        raise BadRead("crc", f"{path}: all-ones scratchpad, nothing answered (data line open? pull-up missing?)")
    second = lines[1].split()
    if len(second) != 10 or second[:9] != pad or not second[9].startswith("t="):
        raise BadRead("garbage", f"{path}: second line is not the scratchpad and t=: {lines[1][:80]!r}")
    return _millidegrees(second[9][2:], path)


def _millidegrees(text: str, path: Path) -> float:
    """A whole number of millidegrees as the kernel prints it (``-?[0-9]+``), nothing Python's
    int() would also take (``4_500``, ``+4500``, ``٤٥``)."""
    if not MILLI.fullmatch(text.strip()):
        raise BadRead("garbage", f"{path}: not a temperature: {text.strip()[:40]!r}")
    milli = int(text.strip())
    if milli == RESET_MILLI_C:
        raise BadRead("reset_value", f"{path}: 85.000 °C, the power-on value (no conversion done)")
    if not RANGE_MILLI_C[0] <= milli <= RANGE_MILLI_C[1]:
        raise BadRead("garbage", f"{path}: {milli / 1000} °C is outside the sensor's range")
    return round(milli / 1000, 2)
