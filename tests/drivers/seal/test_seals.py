"""Seal drivers with real parts: a GPIO contact on a scripted fake line, the generic e-seal
protocol (fuzzed), an e-seal reader on a real serial line (a pseudo-terminal, and loop://)
that carries damage, disappears and comes back, and a scripted timeline in the lorry's time."""

from __future__ import annotations

import datetime as dt
import glob
import os
import threading
import time
import tty
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.model.clock import TimeKeeper
from agent.model.reading import Reading
from drivers.gpio.lines import GpioError
from drivers.seal.config import GpioSealConfig, SerialSealConfig, SimSealConfig
from drivers.seal.eseal import BadLine, EsealMessage, UnknownProtocol, protocol_class
from drivers.seal.eseal.generic import GenericProtocol, sentence
from drivers.seal.gpio import GpioSeal
from drivers.seal.serial import SerialSeal
from drivers.seal.sim import SimSeal
from gpiofake import FakeChip, FakeLine, wait_for
from support import Collector as _Collector
from support import Running

MS = 1_000_000


class Collector(_Collector):
    def events(self) -> list[str]:
        return [r.data["event"] for r in self.snapshot()]

    def pairs(self) -> list[tuple[str | None, str]]:
        return [(r.data["seal_id"], r.data["event"]) for r in self.snapshot()]




# -- GPIO contacts ------------------------------------------------------------------------------

def gpio_seal(emit: Collector, factory: object, kind: str = "door") -> GpioSeal:
    config = GpioSealConfig(name="rear_door", driver="gpio", kind=kind, line=17, debounce_ms=50)
    driver = GpioSeal(config, emit, source_factory=factory)  # type: ignore[arg-type]
    driver.reopen_min_s, driver.reopen_max_s = 0.01, 0.04
    return driver


def test_a_door_reports_its_state_then_each_debounced_change() -> None:
    line = FakeLine(False)  # not active: closed
    got = Collector()
    driver = gpio_seal(got, lambda: line)
    before = time.monotonic_ns()
    with Running(driver):
        wait_for(lambda: got.events() == ["sealed"], "the initial state")
        assert got.readings[0] == Reading(
            "seal", None,
            {"seal": "rear_door", "event": "sealed", "seal_id": None, "battery_pct": None, "source": "gpio"},
            urgent=True,
        )
        assert before <= got.readings[0].meta["mono_ns"] <= time.monotonic_ns()

        t_open = line.push(True)
        line.push(False, at_ns=t_open + 10 * MS)  # the contact bounces
        t_held = line.push(True, at_ns=t_open + 20 * MS)
        wait_for(lambda: got.events() == ["sealed", "opened"], "opened")
        line.push(False, at_ns=time.monotonic_ns())
        line.push(True, at_ns=time.monotonic_ns() + 10 * MS)  # a 10 ms blip is no change
        time.sleep(0.15)
        t_closed = line.push(False)
        wait_for(lambda: got.events() == ["sealed", "opened", "sealed"], "closed again")
        time.sleep(0.1)
        st_ = driver.snapshot()
    assert got.events() == ["sealed", "opened", "sealed"]
    assert [r.meta["mono_ns"] for r in got.readings[1:]] == [t_held, t_closed]
    assert all(r.urgent and r.stream == "seal" and r.ts_ms is None for r in got.readings)
    assert st_["state"] == "sealed" and st_["events"] == 3 and st_["connected"] is True
    assert st_["opens"] == 1 and st_["open_failures"] == 0 and st_["last_error"] is None
    assert line.closed and driver.snapshot()["connected"] is False


def test_a_cut_wire_loop_is_tampered() -> None:
    line = FakeLine(True)  # active: the loop is broken already when the agent starts
    got = Collector()
    driver = gpio_seal(got, lambda: line, kind="wire_loop")
    with Running(driver):
        wait_for(lambda: got.events() == ["tampered"], "the initial state")
        line.push(False)
        wait_for(lambda: got.events() == ["tampered", "sealed"], "loop intact")
        line.push(True)
        wait_for(lambda: got.events() == ["tampered", "sealed", "tampered"], "loop cut")
    assert driver.snapshot()["state"] == "tampered"


def test_a_missing_chip_is_retried_then_the_state_reported() -> None:
    line = FakeLine(False)
    present = threading.Event()

    def factory() -> FakeLine:
        if not present.is_set():
            raise GpioError("no GPIO chip labelled 'pinctrl-bcm2711' (found: none)")
        return line

    got = Collector()
    driver = gpio_seal(got, factory)
    with Running(driver):
        wait_for(lambda: driver.snapshot()["open_failures"] >= 3, "retries")
        st_ = driver.snapshot()
        assert st_["connected"] is False and st_["state"] is None and st_["opens"] == 0
        assert "no GPIO chip labelled" in st_["last_error"] and got.readings == []
        present.set()
        wait_for(lambda: got.events() == ["sealed"], "the state once the chip is there")
        line.push(True)
        wait_for(lambda: got.events() == ["sealed", "opened"], "opened")
    assert driver.snapshot()["opens"] == 1


def test_a_line_lost_while_running_reports_only_a_change_after_reopening() -> None:
    lines = [FakeLine(False), FakeLine(True), FakeLine(True)]
    opened: list[FakeLine] = []

    def factory() -> FakeLine:
        opened.append(lines[len(opened)])
        return opened[-1]

    got = Collector()
    driver = gpio_seal(got, factory)
    with Running(driver):
        wait_for(lambda: got.events() == ["sealed"], "the initial state")
        lines[0].fail()  # gone; back open: the door was opened meanwhile
        wait_for(lambda: got.events() == ["sealed", "opened"], "the change while it was gone")
        assert "lost" in driver.snapshot()["last_error"]
        lines[1].fail()  # gone; back still open: nothing new
        wait_for(lambda: len(opened) == 3 and driver.snapshot()["connected"], "the second reopen")
        time.sleep(0.05)
    assert got.events() == ["sealed", "opened"] and driver.snapshot()["opens"] == 3


@pytest.mark.parametrize("opened_when, active_low", [("high", False), ("low", True)])
def test_the_line_is_requested_so_that_active_means_open(
    monkeypatch: pytest.MonkeyPatch, opened_when: str, active_low: bool
) -> None:
    gpiod = pytest.importorskip("gpiod")
    from gpiod.line import Bias

    monkeypatch.setattr(gpiod, "Chip", FakeChip)
    monkeypatch.setattr(gpiod, "is_gpiochip_device", lambda p: p in FakeChip.chips)
    monkeypatch.setattr(glob, "glob", lambda pattern: ["/dev/gpiochip0"])
    monkeypatch.setattr(FakeChip, "requests", [])
    config = GpioSealConfig(name="d", driver="gpio", line=17, opened_when=opened_when, bias="pull-up")
    GpioSeal(config, Collector())._open_line()
    (req,) = FakeChip.requests
    assert (req.offset, req.settings.active_low, req.settings.bias) == (17, active_low, Bias.PULL_UP)


# -- the generic e-seal protocol ----------------------------------------------------------------

def parse(line: bytes) -> EsealMessage | None:
    return GenericProtocol().parse(line)


def reason(line: bytes) -> str:
    with pytest.raises(BadLine) as e:
        parse(line)
    return e.value.reason


def framed(body: str) -> bytes:
    """``$body*hh`` with a correct checksum, whatever the body says."""
    cs = 0
    for b in body.encode("latin-1"):
        cs ^= b
    return b"$" + body.encode("latin-1") + b"*%02X" % cs


@pytest.mark.parametrize("state, want", [
    ("SEALED", "sealed"), ("OPEN", "opened"), ("TAMPER", "tampered"), ("CUT", "tampered"), ("open", "opened"),
])
def test_generic_states(state: str, want: str) -> None:
    assert parse(sentence("ES-001234", state, 87)) == EsealMessage("ES-001234", want, 87)  # type: ignore[arg-type]


def test_generic_good_lines() -> None:
    assert parse(b"$SEAL,ES-001234,SEALED,87*1D") == EsealMessage("ES-001234", "sealed", 87)  # the docstring's
    assert parse(sentence("L7", "SEALED", None)) == EsealMessage("L7", "sealed", None)  # no battery
    assert parse(b"\xff\x00$$" + sentence("L7", "OPEN", 0)) == EsealMessage("L7", "opened", 0)  # power-up noise
    assert parse(b"$SEAL,ES-001234,SEALED,87*1d\r") == EsealMessage("ES-001234", "sealed", 87)  # lower-case hex
    assert parse(b"") is None and parse(b" \r") is None


def test_generic_heartbeat_changes_no_state() -> None:
    assert parse(sentence("ES-9", "HB", 55)) == EsealMessage("ES-9", None, 55)
    assert parse(sentence("ES-9", "HB")) == EsealMessage("ES-9", None, None)


def test_generic_bad_lines_say_why() -> None:
    good = sentence("ES-1", "SEALED", 80).strip()
    assert reason(good[:-2] + b"00") == "bad_checksum"
    assert reason(good.replace(b"80", b"81")) == "bad_checksum"
    assert reason(framed("SEAL,ES-1,AJAR,80")) == "unknown_state"
    assert reason(framed("SEAL,ES-1,,80")) == "unknown_state"
    for garbage in (b"hello", b"$SEAL,ES-1,SEALED,80", b"$SEAL,ES-1,SEALED,80*4", b"$SEAL*ZZ",
                    framed("GPRMC,1,2,3"), b"$\xe9\xff*16", b"*00$"):
        assert reason(garbage) == "garbage", garbage
    for bad_field in ("SEAL,ES-1,SEALED,101", "SEAL,ES-1,SEALED,-1", "SEAL,ES-1,SEALED,8x",
                      "SEAL,ES-1,SEALED", "SEAL,ES-1,SEALED,80,extra", "SEAL,,SEALED,80", "SEAL,a b,OPEN,1"):
        assert reason(framed(bad_field)) == "bad_field", bad_field


@given(st.binary(max_size=120))
def test_generic_never_raises_anything_but_badline(line: bytes) -> None:
    try:
        msg = parse(line)
    except BadLine as e:
        assert e.reason in ("bad_checksum", "garbage", "unknown_state", "bad_field")
    else:
        assert msg is None or isinstance(msg, EsealMessage)


@given(
    st.from_regex(r"[A-Za-z0-9._:-]{1,32}", fullmatch=True),
    st.sampled_from(["SEALED", "OPEN", "TAMPER", "CUT", "HB"]),
    st.none() | st.integers(0, 100),
    st.binary(max_size=8).filter(lambda b: b"$" not in b),
)
def test_generic_round_trip(seal_id: str, state: str, battery: int | None, noise: bytes) -> None:
    msg = parse(noise + sentence(seal_id, state, battery))
    assert msg is not None and (msg.seal_id, msg.battery_pct) == (seal_id, battery)


def test_protocol_registry_names_the_known_ones() -> None:
    assert protocol_class("generic") is GenericProtocol
    with pytest.raises(UnknownProtocol, match="unknown e-seal protocol 'acme'; known: generic"):
        protocol_class("acme")
    config = SerialSealConfig(name="lock", driver="serial", port="/dev/ttyUSB0", protocol="acme")
    assert SerialSeal.check(config) == ["[seals (lock)] protocol: unknown e-seal protocol 'acme'; known: generic"]
    assert SerialSeal.check(config.model_copy(update={"protocol": "generic"})) == []


# -- an e-seal reader on a serial line ----------------------------------------------------------

class Pty:
    """A pseudo-terminal: the test writes to the master, the driver reads the slave path."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        self.path = os.ttyname(self.slave)
        self.closed = False

    def write(self, data: bytes) -> None:
        os.write(self.master, data)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.master)
            os.close(self.slave)


def serial_seal(port: str, got: Collector) -> SerialSeal:
    config = SerialSealConfig(name="lock", driver="serial", port=port, battery_low_pct=20,
                              reopen_min_s=0.05, reopen_max_s=0.2)
    return SerialSeal(config, got)


def test_reader_state_changes_battery_low_and_bad_lines() -> None:
    pty = Pty()
    got = Collector()
    driver = serial_seal(pty.path, got)
    try:
        with Running(driver):
            wait_for(lambda: driver.snapshot()["connected"], "port open")
            before = time.monotonic_ns()
            pty.write(sentence("ES-1", "SEALED", 80))
            wait_for(lambda: got.events() == ["sealed"], "the first state heard")
            assert got.readings[0] == Reading(
                "seal", None,
                {"seal": "lock", "event": "sealed", "seal_id": "ES-1", "battery_pct": 80, "source": "serial"},
                urgent=True,
            )
            assert before <= got.readings[0].meta["mono_ns"] <= time.monotonic_ns()
            good = sentence("ES-1", "OPEN", 78)
            assert not good.endswith(b"*00\r\n")
            pty.write(sentence("ES-1", "HB", 80) + sentence("ES-1", "SEALED", 79))  # no change
            pty.write(good[:-4] + b"00\r\n")  # bad checksum
            pty.write(b"\x00\xff line noise\r\n")  # garbage
            pty.write(framed("SEAL,ES-1,AJAR,79") + b"\r\n")  # unknown state
            pty.write(framed("SEAL,ES-1,SEALED,180") + b"\r\n")  # bad field
            pty.write(good[:10])
            time.sleep(0.1)
            pty.write(good[10:])  # a line in two pieces is one line
            for pct in (19, 18, 22, 19, 25, 15):  # low; 22 is not recovered (rearms at 25); low again
                pty.write(sentence("ES-1", "HB", pct))
            pty.write(sentence("ES-1", "CUT", 15) + sentence("ES-2", "SEALED", None))
            want = [("ES-1", "sealed"), ("ES-1", "opened"), ("ES-1", "battery_low"),
                    ("ES-1", "battery_low"), ("ES-1", "tampered"), ("ES-2", "sealed")]
            wait_for(lambda: got.pairs() == want, f"events {want}, have {got.pairs()}")
            time.sleep(0.2)
            st_ = driver.snapshot()
        assert got.pairs() == want
        assert [r.data["battery_pct"] for r in got.readings] == [80, 78, 19, 15, 15, None]
        assert all(r.urgent and r.ts_ms is None and "mono_ns" in r.meta for r in got.readings)
        assert (st_["bad_checksum"], st_["garbage"], st_["unknown_state"], st_["bad_field"]) == (1, 1, 1, 1)
        assert st_["messages"] == 12 and st_["heartbeats"] == 7 and st_["events"] == 6 and st_["lines"] == 16
        assert st_["seals"] == {
            "ES-1": {"state": "tampered", "battery_pct": 15, "battery_low": True},
            "ES-2": {"state": "sealed", "battery_pct": None, "battery_low": False},
        }
        assert st_["silent_s"] is not None and st_["silent_s"] < 1
    finally:
        pty.close()


def test_noise_without_line_ends_is_dropped_and_counted() -> None:
    pty = Pty()
    got = Collector()
    driver = serial_seal(pty.path, got)
    try:
        with Running(driver):
            wait_for(lambda: driver.snapshot()["connected"], "port open")
            pty.write(b"x" * 1000)
            pty.write(b"\r\n" + sentence("ES-1", "OPEN", 50))
            wait_for(lambda: got.events() == ["opened"], "the event after the noise")
            assert driver.snapshot()["garbage"] >= 1
    finally:
        pty.close()


def test_a_vanished_reader_is_reopened_and_its_seals_remembered(tmp_path: Path) -> None:
    link = tmp_path / "ttyESEAL"
    first, second = Pty(), None
    link.symlink_to(first.path)
    got = Collector()
    driver = serial_seal(str(link), got)
    try:
        with Running(driver):
            wait_for(lambda: driver.snapshot()["connected"], "port open")
            first.write(sentence("ES-1", "SEALED", 90))
            wait_for(lambda: got.events() == ["sealed"], "the first state")

            link.unlink()  # unplugged: the node goes and the line hangs up
            first.close()
            wait_for(lambda: driver.snapshot()["open_failures"] >= 2, "failed reopens")
            st_ = driver.snapshot()
            assert st_["connected"] is False and st_["opens"] == 1
            assert "cannot open" in st_["last_error"] and str(link) in st_["last_error"]

            second = Pty()
            link.symlink_to(second.path)
            wait_for(lambda: driver.snapshot()["connected"], "reconnected")
            second.write(sentence("ES-1", "SEALED", 90) + sentence("ES-1", "OPEN", 90))
            wait_for(lambda: got.events() == ["sealed", "opened"], "only the change after reopening")
            assert driver.snapshot()["opens"] == 2
    finally:
        first.close()
        if second is not None:
            second.close()


def test_a_port_that_never_existed_is_retried_and_a_silent_reader_is_fine(tmp_path: Path) -> None:
    got = Collector()
    driver = serial_seal(str(tmp_path / "nothing"), got)
    with Running(driver):
        wait_for(lambda: driver.snapshot()["open_failures"] >= 3, "retries")
    assert driver.snapshot()["opens"] == 0 and got.readings == []

    pty = Pty()
    driver = serial_seal(pty.path, got)
    try:
        with Running(driver):
            wait_for(lambda: driver.snapshot()["connected"], "port open")
            time.sleep(1.2)  # more than two read timeouts with nothing said
            st_ = driver.snapshot()
        assert st_["connected"] and st_["last_error"] is None and st_["silent_s"] is None and got.readings == []
    finally:
        pty.close()


def test_loop_url_through_the_open_port() -> None:
    got = Collector()
    driver = serial_seal("loop://", got)
    with Running(driver):
        wait_for(lambda: driver.port is not None, "port open")
        port = driver.port
        assert port is not None
        port.write(sentence("ES-7", "TAMPER", 40))
        wait_for(lambda: got.pairs() == [("ES-7", "tampered")], "tampered")
    assert driver.port is None


# -- a scripted timeline in the lorry's time ----------------------------------------------------

T0 = dt.datetime(2026, 11, 21, 16, 0, tzinfo=dt.UTC)
T0_MS = int(T0.timestamp() * 1000)


def test_sim_events_come_at_their_time_in_the_replayed_trip() -> None:
    config = SimSealConfig(name="rear", driver="sim", seal_id="SIM-1", events=[
        {"at": T0 + dt.timedelta(seconds=60), "event": "tampered"},
        {"at": T0 + dt.timedelta(seconds=10), "event": "sealed"},
        {"at": T0 + dt.timedelta(seconds=21), "event": "opened"},
        {"at": T0 + dt.timedelta(seconds=21), "event": "battery_low"},
    ])
    got = Collector()
    driver = SimSeal(config, got)
    clock = driver.clock = TimeKeeper(trust_system_clock="never")
    assert driver.finite is False

    def replay_at(offset_s: float) -> None:
        """The replayed GPS says it is T0 + offset now."""
        clock.observe_gps(T0_MS + round(offset_s * 1000), time.monotonic_ns())

    with Running(driver):
        time.sleep(0.15)
        assert got.readings == [] and driver.snapshot()["lorry_time"] is None  # no time yet
        replay_at(0)
        time.sleep(0.15)
        assert got.readings == []
        replay_at(15)  # a fast replay: 15 s of the trip in a moment
        wait_for(lambda: got.events() == ["sealed"], "sealed")
        replay_at(20)
        time.sleep(0.15)
        assert got.events() == ["sealed"]  # opened is due at 21 s
        replay_at(22)
        wait_for(lambda: got.events() == ["sealed", "opened", "battery_low"], "opened and battery_low")
        time.sleep(0.15)
        st_ = driver.snapshot()
    assert got.events() == ["sealed", "opened", "battery_low"]
    assert [r.ts_ms for r in got.readings] == [T0_MS + 10_000, T0_MS + 21_000, T0_MS + 21_000]
    assert got.readings[0] == Reading(
        "seal", T0_MS + 10_000,
        {"seal": "rear", "event": "sealed", "seal_id": "SIM-1", "battery_pct": None, "source": "sim"},
        urgent=True,
    )
    assert all(r.meta == {"replay": True} for r in got.readings)
    assert st_["emitted"] == 3 and st_["events"] == 4 and st_["next_at"] == "2026-11-21T16:01:00.000Z"


def test_sim_on_the_system_clock_and_naive_times_are_utc() -> None:
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=0.3)
    naive = soon.replace(tzinfo=None) + dt.timedelta(seconds=0.2)
    config = SimSealConfig(name="rear", driver="sim", events=[
        {"at": soon, "event": "opened"}, {"at": naive, "event": "sealed"},
    ])
    got = Collector()
    driver = SimSeal(config, got)
    driver.clock = TimeKeeper(trust_system_clock="always")
    driver.gps_grace_s = 0  # no GPS source to wait for
    with Running(driver):
        time.sleep(0.1)
        assert got.readings == []
        wait_for(lambda: got.events() == ["opened", "sealed"], "both events", timeout=2)
        stamped = time.time() * 1000
    assert got.readings[1].ts_ms - got.readings[0].ts_ms == 200
    assert stamped - got.readings[1].ts_ms < 500


def test_sim_waits_for_the_replay_time_rather_than_play_a_past_trip_on_todays_date() -> None:
    """A demo replays a trip from the past on a machine whose clock is trusted: before the
    replay's first fix the script must not see today's date and fire every event at once."""
    config = SimSealConfig(name="rear", driver="sim", events=[{"at": T0 + dt.timedelta(minutes=5), "event": "opened"}])
    got = Collector()
    driver = SimSeal(config, got)
    clock = driver.clock = TimeKeeper(trust_system_clock="always")
    assert clock.stamp().ts_ms > T0_MS + 300_000  # today is after the scripted trip
    with Running(driver):
        time.sleep(0.3)
        assert got.readings == [] and driver.snapshot()["lorry_time"] is None
        clock.observe_gps(T0_MS, time.monotonic_ns())  # the replay's first fix
        time.sleep(0.15)
        assert got.readings == [] and driver.snapshot()["lorry_time"].startswith("2026-11-21T16:00:00")
        clock.observe_gps(T0_MS + 301_000, time.monotonic_ns())
        wait_for(lambda: got.events() == ["opened"], "the event at its trip time")
    assert got.readings[0].ts_ms == T0_MS + 300_000
