"""DS18B20 1-Wire temperature sensors through the kernel's w1_therm driver (sysfs).

Every interval gives one reading, valid or not: a failing sensor is reported with its reason,
never skipped, so the cold chain can tell a broken probe from a steady temperature. The
failures a cargo probe really shows: a CRC error on a long or noisy cable (``crc``; an
all-zero scratchpad passes the CRC, a shorted data line, and counts as one too); 85.000 °C
exactly, the power-on value read before any conversion after a brown-out (``reset_value``); a
probe gone from the bus (``missing``); a read the kernel fails (``io_error``); and anything
unparseable or outside the sensor's range (``garbage``). ``w1_root`` is configurable so that
tests read a fake tree through the same code.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from agent.cargo_config import Ds18b20Config
from agent.reading import Reading
from drivers.base import Driver, Emit

log = logging.getLogger(__name__)

ERRORS = ("crc", "reset_value", "missing", "io_error", "garbage")
RESET_MILLI_C = 85_000
RANGE_MILLI_C = (-55_000, 125_000)  # the DS18B20's; beyond it is a misread


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

    def status(self) -> dict[str, Any]:
        return {
            "path": str(self.config.w1_root / self.config.sensor_id),
            "reads": self.reads,
            "ok": self.ok,
            **self.errors,
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
            text = (device / name).read_bytes().decode("ascii")
        except FileNotFoundError:
            continue
        except UnicodeDecodeError:
            raise BadRead("garbage", f"{device / name}: not text") from None
        except OSError as e:
            raise BadRead("io_error", f"cannot read {device / name}: {e.strerror or e}") from None
        return parse(text, device / name)
    if not w1_root.is_dir():
        raise BadRead("missing", f"no 1-Wire bus at {w1_root} (dtoverlay=w1-gpio?)")
    raise BadRead("missing", f"no sensor {sensor_id} on the 1-Wire bus ({w1_root})")


def _w1_slave(text: str, path: Path) -> float:
    """``72 01 4b 46 7f ff 0e 10 57 : crc=57 YES`` then ``72 01 ... 57 t=23125``."""
    lines = text.splitlines()
    if len(lines) < 2 or " : crc=" not in lines[0]:
        raise BadRead("garbage", f"{path}: unexpected content {text[:80]!r}")
    scratchpad, _, verdict = lines[0].partition(" : crc=")
    if verdict.split()[-1:] != ["YES"]:
        raise BadRead("crc", f"{path}: CRC error ({lines[0].strip()})")
    if set(scratchpad.split()) == {"00"}:
        raise BadRead("crc", f"{path}: all-zero scratchpad (data line shorted?)")
    _, found, value = lines[1].rpartition("t=")
    if not found:
        raise BadRead("garbage", f"{path}: no t= in {lines[1][:80]!r}")
    return _millidegrees(value, path)


def _millidegrees(text: str, path: Path) -> float:
    try:
        milli = int(text.strip())
    except ValueError:
        raise BadRead("garbage", f"{path}: not a temperature: {text.strip()[:40]!r}") from None
    if milli == RESET_MILLI_C:
        raise BadRead("reset_value", f"{path}: 85.000 °C, the power-on value (no conversion done)")
    if not RANGE_MILLI_C[0] <= milli <= RANGE_MILLI_C[1]:
        raise BadRead("garbage", f"{path}: {milli / 1000} °C is outside the sensor's range")
    return round(milli / 1000, 2)
