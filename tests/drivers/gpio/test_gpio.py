"""GPIO inputs and the ignition driver, against a scripted fake line (this machine has no GPIO
chip): debouncing, the driver's readings and its recovery, and ignition through the pipeline."""

from __future__ import annotations

import glob
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.config import parse
from agent.model.clock import TimeKeeper
from agent.model.reading import Reading, now_ms
from agent.pipeline.pipeline import Pipeline
from agent.store.buffer import Store
from drivers.gpio.lines import DebouncedInput, GpiodLine, GpioError
from drivers.ignition.config import IgnitionConfig
from drivers.ignition.gpio import GpioIgnition
from gpiofake import MS, FakeChip, FakeLine, wait_for
from support import Collector as _Collector
from support import Running


def changes(line: FakeLine, debounce_s: float, until_s: float) -> list[tuple[float, bool]]:
    """Every stable change up to ``until_s``, as (seconds from the line's start, state)."""
    d = DebouncedInput(line, debounce_s, clock=line.clock)
    out = []
    while line.clock() - line.t0 < until_s * 1e9:
        out += [(round((t - line.t0) / 1e9, 6), s) for t, s in d.poll(0.5)]
    return out


# -- debouncing ---------------------------------------------------------------------------------

def test_bounces_shorter_than_the_debounce_time_are_ignored() -> None:
    # Cranking: the line chatters for 40 ms at a time, then settles back off.
    script = [(1.0, True), (1.04, False), (1.05, True), (1.09, False), (1.2, True), (1.25, False)]
    assert changes(FakeLine(False, script, virtual=True), 0.3, 5) == []


def test_a_held_level_counts_from_its_first_edge() -> None:
    line = FakeLine(False, [(1.0, True), (10.0, False)], virtual=True)
    d = DebouncedInput(line, 0.3, clock=line.clock)
    assert d.state is False
    assert d.poll(2.0) == []  # woke at the edge: not held yet
    assert line.now_ns - line.t0 == 1_000_000_000
    got = d.poll(2.0)  # wakes when the level has held 0.3 s, not after the whole timeout
    assert got == [(line.t0 + 1_000_000_000, True)]
    assert line.now_ns - line.t0 == 1_300_000_000
    assert d.state is True
    assert changes(line, 0.3, 12) == [(10.0, False)]


def test_bounces_restart_the_hold_and_the_change_is_stamped_at_the_last_one() -> None:
    script = [(1.0, True), (1.1, False), (1.15, True), (1.2, False), (1.22, True)]
    assert changes(FakeLine(False, script, virtual=True), 0.3, 3) == [(1.22, True)]


def test_a_level_that_flips_back_before_the_debounce_ends_is_no_change() -> None:
    line = FakeLine(True, [(1.0, False), (1.29, True)], virtual=True)
    assert changes(line, 0.3, 3) == []
    assert line.level() is True


def test_two_edges_to_the_same_level_restart_the_hold() -> None:
    # The kernel reports each edge with the level it read after it: a fast bounce can come as
    # two rising edges, the falling one between them lost.
    assert changes(FakeLine(False, [(1.0, True), (1.2, True)], virtual=True), 0.3, 3) == [(1.2, True)]


def test_edges_read_late_in_one_batch_give_every_change() -> None:
    line = FakeLine(False, [(1.0, True), (1.5, False), (1.6, True), (1.65, False)], virtual=True)
    d = DebouncedInput(line, 0.3, clock=line.clock)
    line.now_ns = line.t0 + 3_000_000_000  # the reader was busy: all four edges wait in the buffer
    assert d.poll(1.0) == [(line.t0 + 1_000_000_000, True), (line.t0 + 1_650_000_000, False)]


def test_zero_debounce_reports_every_edge() -> None:
    script = [(1.0, True), (1.01, False), (1.02, True)]
    assert changes(FakeLine(False, script, virtual=True), 0, 2) == [(1.0, True), (1.01, False), (1.02, True)]


def test_the_state_is_the_active_level() -> None:
    """Active-low is applied by the line (the kernel); the debouncer reports what it is given."""
    line = FakeLine(True, virtual=True)
    d = DebouncedInput(line, 0.3, clock=line.clock)
    assert d.state is True and d.poll(1.0) == []
    line.push(False, at_ns=line.now_ns + 100 * MS)
    assert d.poll(1.0) == [] and d.poll(1.0) == [(line.t0 + 1_100_000_000, False)]
    assert d.state is False


def test_a_lost_edge_is_found_by_reading_the_level() -> None:
    line = FakeLine(False, virtual=True)
    d = DebouncedInput(line, 0.3, clock=line.clock)
    line._level = True  # the kernel's buffer overflowed and the last edge went with it
    assert d.poll(0.1) == [] and d.missed == 1
    assert d.poll(1.0) == [(line.t0 + 100 * MS, True)]


# -- the driver ---------------------------------------------------------------------------------



class Collector(_Collector):
    def states(self) -> list[bool]:
        return [r.data["on"] for r in self.snapshot()]




def ignition(emit: Callable[[Reading], None], factory: Callable[[], FakeLine], debounce_ms: int = 50) -> GpioIgnition:
    driver = GpioIgnition(IgnitionConfig(debounce_ms=debounce_ms), emit, source_factory=factory)
    driver.reopen_min_s, driver.reopen_max_s = 0.01, 0.04
    return driver


def test_the_driver_reports_the_state_then_each_debounced_change() -> None:
    line = FakeLine(False)
    got = Collector()
    driver = ignition(got, lambda: line)
    before = time.monotonic_ns()
    with Running(driver):
        wait_for(lambda: len(got.readings) == 1, "the initial state")
        first = got.readings[0]
        assert first == Reading("ignition", None, {"on": False, "source": "gpio"})
        assert before <= first.meta["mono_ns"] <= time.monotonic_ns()

        t_on = line.push(True)
        line.push(False, at_ns=t_on + 10 * MS)  # the key bounces while cranking
        t_held = line.push(True, at_ns=t_on + 20 * MS)
        wait_for(lambda: len(got.readings) == 2, "ignition on")
        t_off = line.push(False)
        wait_for(lambda: len(got.readings) == 3, "ignition off")
        time.sleep(0.1)  # nothing more comes
        st = driver.snapshot()

    assert got.states() == [False, True, False]
    assert [r.meta["mono_ns"] for r in got.readings[1:]] == [t_held, t_off]
    assert all(r.stream == "ignition" and r.ts_ms is None for r in got.readings)
    assert st["connected"] is True and st["opens"] == 1 and st["open_failures"] == 0
    assert st["state"] is False and st["changes"] == 2 and st["last_error"] is None
    assert driver.snapshot()["connected"] is False and line.closed


def test_a_missing_chip_is_retried_and_reported_until_it_appears() -> None:
    line = FakeLine(True)
    present = threading.Event()
    calls = []

    def factory() -> FakeLine:
        calls.append(time.monotonic())
        if not present.is_set():
            raise GpioError("no GPIO chip labelled 'pinctrl-bcm2711' (found: none)")
        return line

    got = Collector()
    driver = ignition(got, factory)
    with Running(driver):
        wait_for(lambda: driver.snapshot()["open_failures"] >= 3, "retries")
        st = driver.snapshot()
        assert st["connected"] is False and st["state"] is None and st["opens"] == 0
        assert "no GPIO chip labelled 'pinctrl-bcm2711'" in st["last_error"]
        assert got.readings == []
        present.set()
        wait_for(lambda: got.states() == [True], "the initial state")
        t_off = line.push(False)
        wait_for(lambda: got.states() == [True, False], "ignition off")
        assert driver.snapshot()["connected"] is True and driver.snapshot()["opens"] == 1
    assert got.readings[-1].meta["mono_ns"] == t_off


def test_the_default_source_names_the_missing_chip() -> None:
    if glob.glob("/dev/gpiochip*"):
        pytest.skip("this machine has GPIO chips")
    pytest.importorskip("gpiod")
    driver = GpioIgnition(IgnitionConfig(chip="no-such-label"), Collector())
    with Running(driver):
        wait_for(lambda: driver.snapshot()["open_failures"] >= 1, "an open failure")
    assert "no GPIO chip labelled 'no-such-label' (found: none)" in driver.snapshot()["last_error"]


def test_a_line_that_fails_while_running_is_closed_and_reopened() -> None:
    # off; the line goes; it comes back on (a change while it was gone); it goes again and
    # comes back still on (nothing new); then it turns off.
    lines = [FakeLine(False), FakeLine(True), FakeLine(True)]
    opened: list[FakeLine] = []

    def factory() -> FakeLine:
        opened.append(lines[len(opened)])
        return opened[-1]

    got = Collector()
    driver = ignition(got, factory)
    with Running(driver):
        wait_for(lambda: got.states() == [False], "the initial state")
        lines[0].fail()
        wait_for(lambda: got.states() == [False, True], "the state after the reopen")
        assert lines[0].closed
        assert "lost" in driver.snapshot()["last_error"] and "No such device" in driver.snapshot()["last_error"]
        lines[1].fail()
        wait_for(lambda: len(opened) == 3 and driver.snapshot()["connected"], "the second reopen")
        time.sleep(0.05)
        assert got.states() == [False, True]
        t_off = lines[2].push(False)
        wait_for(lambda: got.states() == [False, True, False], "ignition off")
        st = driver.snapshot()
    assert lines[1].closed and got.readings[-1].meta["mono_ns"] == t_off
    assert st["opens"] == 3 and st["open_failures"] == 0 and st["changes"] == 2


# -- libgpiod on a machine without GPIO ---------------------------------------------------------

@pytest.mark.skipif(bool(glob.glob("/dev/gpiochip*")), reason="this machine has GPIO chips")
def test_gpiod_line_names_a_missing_chip() -> None:
    pytest.importorskip("gpiod")
    with pytest.raises(GpioError, match=r"no GPIO chip labelled 'no-such-label' \(found: none\)"):
        GpiodLine("no-such-label", 17, active_low=False, bias="as-is")
    with pytest.raises(GpioError, match="cannot open GPIO chip /dev/gpiochip9: No such file"):
        GpiodLine("/dev/gpiochip9", 17)




def test_gpiod_line_requests_an_input_with_edges_on_the_monotonic_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    gpiod = pytest.importorskip("gpiod")
    from gpiod.line import Bias, Clock, Direction, Edge

    monkeypatch.setattr(gpiod, "Chip", FakeChip)
    monkeypatch.setattr(gpiod, "is_gpiochip_device", lambda p: p in FakeChip.chips)
    monkeypatch.setattr(glob, "glob", lambda pattern: ["/dev/gpiochip1", "/dev/gpiochip0", "/dev/gpiochipX"])
    monkeypatch.setattr(FakeChip, "requests", [])
    monkeypatch.setattr(FakeChip, "busy", {4})

    line = GpiodLine("pinctrl-bcm2711", "GPIO17", active_low=True, bias="pull-up")
    (req,) = FakeChip.requests
    assert (line.path, line.offset, req.consumer, req.buffer) == ("/dev/gpiochip0", 17, "lorry-agent", 64)
    s = req.settings
    assert (s.direction, s.edge_detection, s.bias, s.active_low, s.event_clock) == (
        Direction.INPUT, Edge.BOTH, Bias.PULL_UP, True, Clock.MONOTONIC)
    assert line.level() is True
    assert line.wait_edges(0.1) == [(5, True), (7, False)]
    line.close()
    assert req.released

    with pytest.raises(GpioError, match=r"no GPIO chip labelled 'pinctrl-rp1' \(found: "
                       r"/dev/gpiochip0 'pinctrl-bcm2711', /dev/gpiochip1 'raspberrypi-exp-gpio'\)"):
        GpiodLine("pinctrl-rp1", 17)
    with pytest.raises(GpioError, match="GPIO chip /dev/gpiochip0 has no line named 'IGN'"):
        GpiodLine("pinctrl-bcm2711", "IGN")
    with pytest.raises(GpioError, match=r"GPIO chip /dev/gpiochip1 has no line 17 \(it has 8 lines\)"):
        GpiodLine("/dev/gpiochip1", 17)
    with pytest.raises(GpioError, match="GPIO line 4 on /dev/gpiochip0 is in use by 'pigpiod'"):
        GpiodLine("pinctrl-bcm2711", 4)


# -- through the pipeline -----------------------------------------------------------------------

def test_ignition_off_parks_the_lorry_through_the_pipeline(tmp_path: Path) -> None:
    cfg = parse({
        "device": {"id": "lorry-7"},
        "store": {"path": str(tmp_path / "buffer.db"), "sync_interval_s": 0},
        "gps": {"replay": str(tmp_path / "none.nmea")},
        "ignition": {"debounce_ms": 50},
    })
    store = Store(cfg.store.path, device=cfg.device.id, sync_interval_s=cfg.store.sync_interval_s)
    store.start()
    try:
        pipeline = Pipeline(cfg, store, TimeKeeper(trust_system_clock="always"))
        # GPS time an hour ahead of the system clock, to tell which one stamped a reading.
        gps0_ms, mono0 = now_ms() + 3_600_000, time.monotonic_ns()

        def gps_ms(mono_ns: int) -> int:
            return gps0_ms + (mono_ns - mono0) // MS

        def position(lat: float) -> None:
            mono = time.monotonic_ns()
            data = {"lat": lat, "lon": 16.37, "speed_kmh": 50.0, "course": 0.0, "sats": 9, "hdop": 0.9}
            pipeline.emit(Reading("position", gps_ms(mono), data, meta={"mono_ns": mono}))

        line = FakeLine(True)
        driver = GpioIgnition(cfg.ignition, pipeline.emit, source_factory=lambda: line)
        with Running(driver):
            wait_for(lambda: driver.snapshot()["state"] is True, "the initial state")
            position(48.2000)  # the first fix: always reported
            time.sleep(0.01)
            position(48.2001)  # 11 m on, a moment later: not reported
            assert pipeline.policy.state == "moving"
            t_off = line.push(False)
            wait_for(lambda: pipeline.policy.state == "parked", "parked")
            position(48.2002)  # the first fix after the key turned: reported, with the event
            position(48.2003)  # parked: one an hour
        assert store.flush()

        positions = [json.loads(r.body) for r in store.fetch("position", 0, 100)]
        assert [p["lat"] for p in positions] == [48.2000, 48.2002]
        assert "event" not in positions[0] and positions[1]["event"] == "ignition_off"

        rows = store.fetch("ignition", 0, 100)
        bodies = [json.loads(r.body) for r in rows]
        assert [(b["on"], b["source"], b["seq"]) for b in bodies] == [(True, "gpio", 1), (False, "gpio", 2)]
        assert abs(rows[0].ts_ms - now_ms()) < 10_000  # before any fix: the (trusted) system clock
        assert abs(rows[1].ts_ms - gps_ms(t_off)) <= 1  # GPS time at the edge, not at the debounce's end
        assert "ts_trusted" not in bodies[1]
    finally:
        store.close()
