"""The GPS driver with real parts: replayed capture files (plain and gzip, paced and not) and a
real serial line (a pseudo-terminal) that carries damage, disappears and comes back."""

from __future__ import annotations

import datetime as dt
import os
import threading
import time
import tty
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.demo import trip
from agent.model.reading import Reading
from drivers.gps.config import GpsConfig
from drivers.gps.receiver import NmeaGps
from support import Running, wait_until

WAIT_S = 5.0


def wait_for(cond: Callable[[], bool], timeout: float = WAIT_S, what: str = "condition") -> None:
    wait_until(cond, timeout, what, poll_s=0.01)


class Collector:
    def __init__(self) -> None:
        self.readings: list[Reading] = []
        self.times: list[float] = []
        self._lock = threading.Lock()

    def __call__(self, reading: Reading) -> None:
        with self._lock:
            self.readings.append(reading)
            self.times.append(time.monotonic())

    def ts(self) -> list[int]:
        with self._lock:
            return [r.ts_ms for r in self.readings]



TRUTH = list(trip.drive(interval_s=1, max_hours=0.01))  # 36 fixes, 1 s apart


def ms(t: dt.datetime) -> int:
    return round(t.timestamp() * 1000)


# -- replay -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["t.nmea", "t.nmea.gz"])
def test_replay_yields_one_reading_per_fix(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    truth = trip.write(path, interval_s=1, max_hours=0.05)
    assert len(truth) >= 150
    got = Collector()
    driver = NmeaGps(GpsConfig(replay=path, replay_speed=0), got)
    assert driver.finite
    with Running(driver) as r:
        r.join()
    assert [x.stream for x in got.readings] == ["position"] * len(truth)
    assert got.ts() == [ms(f.ts) for f in truth]
    for reading, f in zip(got.readings, truth):
        assert reading.data["lat"] == pytest.approx(f.lat, abs=1e-6)
        assert reading.data["lon"] == pytest.approx(f.lon, abs=1e-6)
        assert reading.data["speed_kmh"] == pytest.approx(f.speed_kmh, abs=0.02)
        assert reading.data["alt_m"] == f.alt_m and reading.data["sats"] == f.sats
        assert reading.data["fix"] == "gps"
    st = driver.snapshot()
    header = 3  # the '#' comment lines of a capture file
    assert st["fixes"] == len(truth) and st["lines"] == 2 * len(truth) + header
    assert st["garbage"] == st["bad_checksum"] == st["bad_field"] == 0
    assert st["last_fix_ts"] == truth[-1].ts.strftime("%Y-%m-%dT%H:%M:%S.000Z")
    assert st["connected"] is False  # the file is done


def test_replay_speed_1_paces_in_real_time(tmp_path: Path) -> None:
    truth = TRUTH[:4]
    path = tmp_path / "four.nmea"
    path.write_text("# four fixes, 1 s apart\n" + "".join(trip.nmea_lines(iter(truth))), newline="")
    got = Collector()
    driver = NmeaGps(GpsConfig(replay=path, replay_speed=1), got)
    start = time.monotonic()
    with Running(driver) as r:
        r.join(timeout=10)
    elapsed = time.monotonic() - start
    assert got.ts() == [ms(f.ts) for f in truth]
    assert 2.5 <= elapsed < 6, elapsed
    gaps = [b - a for a, b in zip(got.times, got.times[1:])]
    assert all(0.7 < g < 1.5 for g in gaps), gaps


def test_replay_stops_when_asked(tmp_path: Path) -> None:
    path = tmp_path / "t.nmea"
    trip.write(path, interval_s=1, max_hours=0.05)
    got = Collector()
    with Running(NmeaGps(GpsConfig(replay=path, replay_speed=1), got)) as r:
        wait_for(lambda: len(got.readings) >= 1, what="first reading")
        r.stop.set()
        r.join(timeout=2)
    assert len(got.readings) <= 3


# -- serial over a pseudo-terminal ----------------------------------------------------------------

class Pty:
    """A pseudo-terminal: the test writes to the master, the driver reads the slave path."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)  # no echo, no newline translation until the driver opens it
        self.path = os.ttyname(self.slave)
        self.closed = False

    def write(self, data: str | bytes) -> None:
        os.write(self.master, data.encode("latin-1") if isinstance(data, str) else data)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.master)
            os.close(self.slave)


def epoch_lines(f: trip.TruthFix) -> str:
    return trip.rmc(f) + trip.gga(f)


def corrupt(line: str) -> str:
    body, cs = line.rstrip("\r\n").rsplit("*", 1)
    return f"{body}*{(int(cs, 16) ^ 0x21):02X}\r\n"


def gps_config(port: str) -> GpsConfig:
    return GpsConfig(port=port, baudrate=9600, reopen_min_s=0.05, reopen_max_s=0.2)


def test_serial_pty_readings_and_damage_counted() -> None:
    pty = Pty()
    got = Collector()
    driver = NmeaGps(gps_config(pty.path), got)
    try:
        with Running(driver):
            wait_for(lambda: driver.snapshot()["connected"], what="port open")
            st = driver.snapshot()
            assert st["opens"] == 1 and st["open_failures"] == 0 and st["source"] == pty.path
            good = [TRUTH[0], TRUTH[1], TRUTH[3], TRUTH[4]]
            pty.write(epoch_lines(TRUTH[0]))
            pty.write(b"\xff\xfe\x00\x13binary noise\x80\r\n")  # garbage
            pty.write(epoch_lines(TRUTH[1]))
            pty.write("no nmea here at all\r\n")  # garbage
            pty.write(corrupt(trip.rmc(TRUTH[2])) + corrupt(trip.gga(TRUTH[2])))  # whole epoch lost
            pty.write("$GPGSV,3,1,11,03,03,111,00,04,15,270,00,06,01,010,00,13,06,292,00*74\r\n")
            pty.write(trip.sentence("PGRME,15.0,M,45.0,M,25.0,M"))  # proprietary: ignored
            # Split writes: a sentence arriving in pieces must still be one line.
            half = len(epoch_lines(TRUTH[3])) // 2
            pty.write(epoch_lines(TRUTH[3])[:half])
            time.sleep(0.1)
            pty.write(epoch_lines(TRUTH[3])[half:])
            pty.write(epoch_lines(TRUTH[4]))
            want = [ms(f.ts) for f in good]
            wait_for(lambda: got.ts() == want, what=f"readings {want}, have {got.ts()}")
            st = driver.snapshot()
            assert st["bad_checksum"] == 2
            assert st["garbage"] == 2
            assert st["ignored"] == 1
            assert st["satellites_in_view"] == {"GPS": 11}
            assert st["fixes"] == 4 and st["connected"] is True
            assert st["last_fix_ts"] == TRUTH[4].ts.strftime("%Y-%m-%dT%H:%M:%S.000Z")
            for reading, f in zip(got.readings, good):
                assert reading.data["lat"] == pytest.approx(f.lat, abs=1e-6)
                assert reading.data["lon"] == pytest.approx(f.lon, abs=1e-6)
            time.sleep(0.3)
            assert got.ts() == want, "damaged epoch or garbage produced a reading"
    finally:
        pty.close()


def test_serial_overlong_line_is_counted_as_garbage() -> None:
    pty = Pty()
    got = Collector()
    driver = NmeaGps(gps_config(pty.path), got)
    try:
        with Running(driver):
            wait_for(lambda: driver.snapshot()["connected"], what="port open")
            pty.write(b"x" * 1000)  # a lost newline: never one line
            pty.write("\r\n" + epoch_lines(TRUTH[0]) + epoch_lines(TRUTH[1]))
            wait_for(lambda: len(got.readings) >= 1, what="reading after noise")
            assert got.ts()[0] == ms(TRUTH[0].ts)
            assert driver.snapshot()["garbage"] >= 1
    finally:
        pty.close()


def test_last_epoch_comes_out_when_the_receiver_goes_quiet() -> None:
    pty = Pty()
    got = Collector()
    driver = NmeaGps(gps_config(pty.path), got)
    try:
        with Running(driver):
            wait_for(lambda: driver.snapshot()["connected"], what="port open")
            pty.write(epoch_lines(TRUTH[0]))  # first epoch: its sentence set is not known yet
            wait_for(lambda: got.ts() == [ms(TRUTH[0].ts)], timeout=4, what="fix after quiet")
    finally:
        pty.close()


def test_vanished_device_is_reported_and_reopened(tmp_path: Path) -> None:
    link = tmp_path / "gps"
    first = Pty()
    second: Pty | None = None
    link.symlink_to(first.path)
    got = Collector()
    driver = NmeaGps(gps_config(str(link)), got)
    try:
        with Running(driver):
            wait_for(lambda: driver.snapshot()["connected"], what="port open")
            first.write(epoch_lines(TRUTH[0]) + epoch_lines(TRUTH[1]))
            wait_for(lambda: got.ts() == [ms(TRUTH[0].ts), ms(TRUTH[1].ts)], what="first readings")

            # Unplugged: the device node goes away and the line hangs up.
            link.unlink()
            first.close()
            wait_for(lambda: not driver.snapshot()["connected"], what="connected False")
            wait_for(lambda: driver.snapshot()["open_failures"] >= 2, what="failed reopens")
            st = driver.snapshot()
            assert st["connected"] is False
            assert st["opens"] == 1
            assert st["last_error"] and str(link) in st["last_error"]
            assert "cannot open" in st["last_error"]

            # Plugged in again: a new device behind the same name.
            second = Pty()
            link.symlink_to(second.path)
            wait_for(lambda: driver.snapshot()["connected"], what="reconnected")
            assert driver.snapshot()["opens"] == 2
            second.write(epoch_lines(TRUTH[2]) + epoch_lines(TRUTH[3]))
            want = [ms(f.ts) for f in TRUTH[:4]]
            wait_for(lambda: got.ts() == want, what=f"readings resume: {want}, have {got.ts()}")
            assert driver.snapshot()["fixes"] == 4
    finally:
        first.close()
        if second is not None:
            second.close()


def test_port_that_never_existed_is_retried_and_reported(tmp_path: Path) -> None:
    got = Collector()
    driver = NmeaGps(gps_config(str(tmp_path / "nothing")), got)
    with Running(driver):
        wait_for(lambda: driver.snapshot()["open_failures"] >= 3, what="retries")
        st = driver.snapshot()
        assert st["connected"] is False and st["opens"] == 0
        assert "cannot open" in st["last_error"]
    assert got.readings == []


def test_replugged_receiver_under_another_name_is_found_by_glob(tmp_path: Path) -> None:
    """A USB puck comes back as another /dev/serial/by-id/ name (or ttyUSB1 instead of ttyUSB0):
    a glob in `port` picks whichever matching device is present."""
    by_id = tmp_path / "by-id"
    by_id.mkdir()
    first, second = Pty(), None
    (by_id / "usb-u-blox_GNSS_receiver-if00-port0").symlink_to(first.path)
    got = Collector()
    driver = NmeaGps(gps_config(str(by_id / "usb-u-blox*")), got)
    try:
        with Running(driver):
            wait_for(lambda: driver.snapshot()["connected"], what="port open")
            assert driver.snapshot()["device"] == str(by_id / "usb-u-blox_GNSS_receiver-if00-port0")
            first.write(epoch_lines(TRUTH[0]))
            first.write(epoch_lines(TRUTH[1]))
            wait_for(lambda: len(got.readings) == 2, what="first readings")
            (by_id / "usb-u-blox_GNSS_receiver-if00-port0").unlink()
            first.close()
            wait_for(lambda: "no device matches" in (driver.snapshot()["last_error"] or ""), what="reported gone")
            second = Pty()
            (by_id / "usb-u-blox_GNSS_receiver-if01-port0").symlink_to(second.path)
            wait_for(lambda: driver.snapshot()["connected"], what="found again")
            assert driver.snapshot()["device"].endswith("if01-port0")
            second.write(epoch_lines(TRUTH[2]) + epoch_lines(TRUTH[3]))
            wait_for(lambda: len(got.readings) == 4, what="readings resume")
    finally:
        first.close()
        if second is not None:
            second.close()
