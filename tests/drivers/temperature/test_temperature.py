"""Temperature drivers with real parts: DS18B20 sensors read from a fake 1-Wire sysfs tree (the
kernel's two file layouts, CRC errors, the 85 °C power-on value, a probe unplugged and plugged
back, garbage), and a simulated profile in the lorry's time."""

from __future__ import annotations

import datetime as dt
import shutil
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.model.clock import TimeKeeper
from agent.model.reading import Reading
from drivers.temperature.config import SimTemperatureConfig
from drivers.temperature.ds18b20 import ERRORS
from drivers.temperature.sim import SimTemperature
from gpiofake import wait_for
from support import Collector as _Collector
from support import Running
from w1fake import SENSOR, ds18b20, sensor, w1_slave


class Collector(_Collector):
    def values(self) -> list[tuple[float | None, str | None]]:
        return [(r.data["c"], r.data["error"]) for r in self.snapshot()]








@pytest.mark.parametrize("files, want", [
    ({"w1_slave": w1_slave(23187)}, (23.19, None)),
    ({"w1_slave": w1_slave(-18125)}, (-18.12, None)),  # a freezer; to 0.01, half to even
    ({"w1_slave": w1_slave(0, scratchpad="00 00 00 08 00 00 00 00 96")}, (0.0, None)),  # 0 °C is real
    ({"w1_slave": w1_slave(23187, crc_ok=False)}, (None, "crc")),
    ({"w1_slave": w1_slave(0, scratchpad="00 00 00 00 00 00 00 00 00")}, (None, "crc")),  # shorted line
    ({"w1_slave": w1_slave(85000)}, (None, "reset_value")),
    ({"w1_slave": w1_slave(85062)}, (85.06, None)),
    ({"w1_slave": w1_slave("abc")}, (None, "garbage")),
    ({"w1_slave": w1_slave(250000)}, (None, "garbage")),  # beyond the sensor's range
    ({"w1_slave": "72 01 4b 46 7f ff 0e 10 57 : crc=57 YES\n"}, (None, "garbage")),  # cut short
    ({"w1_slave": ""}, (None, "garbage")),
    ({"w1_slave": b"\xff\xfe\x00junk"}, (None, "garbage")),
    ({"temperature": "4500\n"}, (4.5, None)),  # newer kernels: millidegrees, no CRC line
    ({"temperature": "85000\n"}, (None, "reset_value")),
    ({"temperature": "\n"}, (None, "garbage")),
    ({"w1_slave": w1_slave(7000), "temperature": "9999"}, (7.0, None)),  # w1_slave, with its CRC, first
    ({}, (None, "missing")),  # the directory without either file
])
def test_a_read_gives_a_value_or_the_reason(tmp_path: Path, files: dict[str, str], want: tuple) -> None:
    sensor(tmp_path, files)
    got = Collector()
    driver = ds18b20(tmp_path, got)
    reading = driver.sample()
    assert reading == Reading("temperature", None, {"sensor": "reefer", "c": want[0], "error": want[1]})
    assert got.readings == [reading] and isinstance(reading.meta["mono_ns"], int)
    st_ = driver.snapshot()
    assert st_["reads"] == 1 and st_["ok"] == (want[1] is None) and st_["error"] == want[1]
    assert {k: st_[k] for k in ERRORS} == {k: int(k == want[1]) for k in ERRORS}


def test_missing_sensor_and_missing_bus_say_which(tmp_path: Path) -> None:
    (tmp_path / "w1").mkdir()
    driver = ds18b20(tmp_path / "w1", Collector())
    assert driver.sample().data["error"] == "missing"
    assert f"no sensor {SENSOR} on the 1-Wire bus" in driver.snapshot()["last_error"]
    driver = ds18b20(tmp_path / "no-bus", Collector())
    assert driver.sample().data["error"] == "missing"
    assert "no 1-Wire bus at" in driver.snapshot()["last_error"] and "w1-gpio" in driver.snapshot()["last_error"]


def test_an_unreadable_file_is_an_io_error(tmp_path: Path) -> None:
    (sensor(tmp_path, {}) / "w1_slave").mkdir()  # reading it fails with an OSError (EISDIR)
    driver = ds18b20(tmp_path, Collector())
    assert driver.sample().data == {"sensor": "reefer", "c": None, "error": "io_error"}
    assert "cannot read" in driver.snapshot()["last_error"]


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=60)
@given(content=st.binary(max_size=200), name=st.sampled_from(["w1_slave", "temperature"]))
def test_any_file_content_gives_a_reading_never_an_exception(tmp_path: Path, content: bytes, name: str) -> None:
    sensor(tmp_path, {name: content})
    reading = ds18b20(tmp_path, Collector()).sample()
    c, error = reading.data["c"], reading.data["error"]
    assert (error in ERRORS and c is None) or (error is None and -55 <= c <= 125)


def test_every_interval_a_reading_through_unplug_and_replug(tmp_path: Path) -> None:
    device = sensor(tmp_path, {"w1_slave": w1_slave(4250)})
    got = Collector()
    driver = ds18b20(tmp_path, got, interval_s=0.05)
    with Running(driver):
        time.sleep(0.5)
        n = len(got.readings)
        assert 6 <= n <= 12, f"{n} readings in 0.5 s at 0.05 s"
        assert set(got.values()) == {(4.25, None)}
        sensor(tmp_path, {"w1_slave": w1_slave(4250, crc_ok=False)})
        wait_for(lambda: got.values()[-1] == (None, "crc"), "a CRC error")
        shutil.rmtree(device)  # the probe's cable pulled out
        wait_for(lambda: got.values()[-3:] == [(None, "missing")] * 3, "missing, every interval")
        sensor(tmp_path, {"w1_slave": w1_slave(85000)})  # back, not converted yet
        wait_for(lambda: got.values()[-1] == (None, "reset_value"), "the power-on value")
        sensor(tmp_path, {"w1_slave": w1_slave(4312)})
        wait_for(lambda: got.values()[-1] == (4.31, None), "readings again")
        st_ = driver.snapshot()
    assert st_["crc"] >= 1 and st_["missing"] >= 3 and st_["reset_value"] >= 1
    assert st_["reads"] == st_["ok"] + sum(st_[k] for k in ERRORS)
    assert st_["last_c"] == 4.31 and st_["error"] is None and "power-on value" in st_["last_error"]
    assert all(r.ts_ms is None and r.stream == "temperature" and not r.urgent for r in got.readings)


# -- the simulated profile ----------------------------------------------------------------------

T0 = dt.datetime(2026, 11, 21, 16, 0, tzinfo=dt.UTC)
T0_MS = int(T0.timestamp() * 1000)


def sim(interval_s: float = 60) -> tuple[SimTemperature, Collector]:
    config = SimTemperatureConfig(name="reefer", driver="sim", interval_s=interval_s, profile=[
        {"at": T0 + dt.timedelta(minutes=10), "c": 10.0},
        {"at": T0, "c": 4.0},
        {"at": T0 + dt.timedelta(minutes=20), "c": -2.0},
    ])
    got = Collector()
    return SimTemperature(config, got), got


def test_sim_profile_is_interpolated_and_held_flat_outside() -> None:
    driver, _ = sim()
    minute = 60_000
    assert driver.value_at(T0_MS - 3600_000) == 4.0
    assert driver.value_at(T0_MS) == 4.0
    assert driver.value_at(T0_MS + 1 * minute) == 4.6
    assert driver.value_at(T0_MS + 5 * minute) == 7.0
    assert driver.value_at(T0_MS + 10 * minute) == 10.0
    assert driver.value_at(T0_MS + 15 * minute) == 4.0
    assert driver.value_at(T0_MS + 20 * minute) == -2.0
    assert driver.value_at(T0_MS + 9 * 3600_000) == -2.0


def test_sim_reading_times_follow_the_lorry_time() -> None:
    driver, _ = sim()
    assert driver.due(T0_MS - 30_000) == []  # the first on the next whole minute
    assert driver.due(T0_MS + 150_000) == [T0_MS, T0_MS + 60_000, T0_MS + 120_000]
    assert driver.due(T0_MS + 170_000) == []
    # A replay as fast as possible: every interval, however far the time moved.
    assert driver.due(T0_MS + 3600_000) == [T0_MS + m * 60_000 for m in range(3, 61)]
    # Back in time (a replay's GPS time after the system clock's): start again from there.
    assert driver.due(T0_MS + 60_000) == [T0_MS + 60_000]
    # A leap of days (a clock that was far off) gives the last 1000 intervals, not a flood.
    day = 24 * 3600_000
    assert driver.due(T0_MS + 3 * day) == [T0_MS + 3 * day - m * 60_000 for m in range(999, -1, -1)]


def test_sim_emits_readings_at_sim_times() -> None:
    driver, got = sim()
    clock = driver.clock = TimeKeeper(trust_system_clock="always")
    driver.gps_grace_s = 0.3  # the system clock would say today: the replay's fix comes first
    with Running(driver):
        time.sleep(0.15)
        assert got.readings == []  # no lorry time yet
        clock.observe_gps(T0_MS - 30_000, time.monotonic_ns())
        time.sleep(0.3)  # past the grace: GPS time it is
        time.sleep(0.15)
        assert got.readings == []
        clock.observe_gps(T0_MS + 150_000, time.monotonic_ns())
        wait_for(lambda: len(got.readings) == 3, "three minutes of the trip")
        clock.observe_gps(T0_MS + 660_000, time.monotonic_ns())
        wait_for(lambda: len(got.readings) == 12, "eleven minutes of the trip")
        time.sleep(0.15)
    assert [r.ts_ms for r in got.readings] == [T0_MS + m * 60_000 for m in range(12)]
    assert got.values() == [(round(4.0 + 0.6 * m, 2), None) for m in range(11)] + [(8.8, None)]
    assert got.readings[0] == Reading("temperature", T0_MS, {"sensor": "reefer", "c": 4.0, "error": None})
    assert all(r.meta == {"replay": True} for r in got.readings)
    assert driver.finite is False and driver.snapshot()["readings"] == 12
