"""The CAN driver (drivers/can/bus.py) with real parts: captures written by tests/canlog.py and
replayed through can.LogReader (candump .log and Vector .asc), the CSS Electronics J1939 DBC
decoded with cantools, python-can's virtual bus for the live path (receiving, requests, error
frames, an interface that is down or fails mid-run), and the real agent process publishing a
replayed capture to a real mosquitto."""

from __future__ import annotations

import errno
import re
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import can
import pytest

import canlog as cl
from agent.demo.broker import Mosquitto
from agent.model.reading import Reading, iso_ms
from conftest import SHARED_DATA
from drivers.can.bus import CanBus
from drivers.can.config import CanConfig, SignalConfig
from support import AgentProcess, Backend, Running, agent_config, wait_until
from support import Collector as _Collector

WAIT_S = 5.0
CAN_DATA = SHARED_DATA / "can"
DEMO_DBC = CAN_DATA / "CSS-Electronics-SAE-J1939-DEMO.dbc"
SPN_NOTES = CAN_DATA / "j1939-spn-notes.md"
# Sampling used for the truck capture: frequent enough to see every signal a few times.
TRUCK_SAMPLING = {"min_interval_s": 2, "max_interval_s": 10}
# The capture's sampled values stay within what the truck really did (n/a and error raw
# values, e.g. 8191.875 or 8128 rpm, a parking brake state of 2 or 3, are far outside).
TRUCK_RANGES = {
    "engine_speed": (600, 1800), "driver_demand_torque": (0, 40), "actual_engine_torque": (0, 35),
    "wheel_speed": (0, 80.5), "parking_brake": (0, 1), "brake_switch": (0, 0), "coolant_temp": (60, 85),
    "oil_temp": (90, 97), "fuel_level": (60, 62.4), "trip_distance": (12.5, 13.5), "total_distance": (184_000.125,) * 2,
    "total_distance_hr": (184_000_125, 184_001_175), "trip_distance_hr": (12_500, 13_550),
    "engine_hours": (12_345.6, 12_345.62), "engine_revolutions": (58_000_000,) * 2,
    "trip_fuel": (40.5, 75), "total_fuel_used": (98_000, 98_035), "fuel_rate": (10, 22),
}


class Collector(_Collector):
    def stream(self, name: str) -> list[Reading]:
        return [r for r in self.snapshot() if r.stream == name]

    def values(self, name: str | None = None) -> list[dict[str, Any]]:
        return [v for r in self.stream("can") for v in r.data["values"] if name is None or v["name"] == name]




def wait_for(cond: Callable[[], bool], timeout: float = WAIT_S, what: str = "condition") -> None:
    wait_until(cond, timeout, what, poll_s=0.01)


def replay(path: Path, **config: Any) -> tuple[Collector, CanBus]:
    got = Collector()
    driver = CanBus(CanConfig(interface="replay", replay=path, replay_speed=0, **config), got)
    assert driver.finite
    driver.run(threading.Event())
    return got, driver


def frame_ms(frames: list[cl.Frame]) -> set[int]:
    return {cl.ms(f.ts) for f in frames}


@pytest.fixture(scope="module")
def truck() -> cl.Truck:
    return cl.truck()


@pytest.fixture(scope="module")
def truck_log(truck: cl.Truck, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cl.write_log(tmp_path_factory.mktemp("can") / "truck.log", truck.frames)


@pytest.fixture(scope="module")
def truck_replay(truck_log: Path) -> tuple[Collector, CanBus]:
    return replay(truck_log, ignition=True, **TRUCK_SAMPLING)


@pytest.fixture
def demo_dbc() -> Path:
    if not DEMO_DBC.is_file():
        pytest.skip(f"CSS Electronics J1939 demo DBC not found at {DEMO_DBC} (set LORRY_SHARED_DATA)")
    return DEMO_DBC


# -- the log builder itself -----------------------------------------------------------------------


def test_canlog_writes_candump_lines_the_reader_reads_back(truck: cl.Truck, truck_log: Path) -> None:
    lines = truck_log.read_text().splitlines()
    assert lines[0] == "(1700000000.000000) can0 0CF00400#FF7D7DC012FFF0FF"  # EEC1, 600 rpm
    assert cl.log_line(cl.Frame(cl.at(123_456), 0x0CF00400, cl.eec1_data(700))) == \
        "(1700000000.123456) can0 0CF00400#FF7D7DE015FFF0FF"  # the notes' worked example
    assert "(1700000012.400000) can0 20000040#0000000000000000" in lines  # bus-off error frame
    assert any(re.fullmatch(r"\(\d+\.\d{6}\) can0 123#[0-9A-F]{8}", line) for line in lines)
    msgs = list(can.LogReader(str(truck_log)))
    assert len(msgs) == len(truck.frames)
    ok = [(m.timestamp, m.arbitration_id, bytes(m.data), m.is_extended_id) for m in msgs if not m.is_error_frame]
    want = [(f.ts, f.can_id, f.data, f.extended) for f in truck.frames if not f.error]
    assert ok[:100] == want[:100]
    # The VIN over BAM: TP.CM BAM (18 bytes, 3 packets, PGN 65260) then 3 TP.DT 50 ms apart.
    vin = [f for f in truck.frames
           if f.can_id in (0x1CECFF00, 0x1CEBFF00) and cl.at(3_400_000) < f.ts < cl.at(3_700_000)]
    assert [f.data.hex(" ").upper() for f in vin] == [
        "20 12 00 03 FF EC FE 00", "01 4C 5A 5A 35 43 4C 56", "02 42 38 4A 57 31 32 33", "03 34 35 36 2A FF FF FF"]
    assert [round(f.ts - vin[0].ts, 6) for f in vin] == [0, 0.05, 0.1, 0.15]


# -- replay of a candump log ------------------------------------------------------------------------


def test_replay_keeps_the_capture_times(truck: cl.Truck, truck_replay: tuple[Collector, CanBus]) -> None:
    got, driver = truck_replay
    assert got.readings and all(r.meta.get("replay") for r in got.readings)
    times = frame_ms(truck.frames)
    for r in got.readings:
        assert r.ts_ms in times, f"{r.stream} reading at {r.ts_ms}: not the time of a frame in the capture"
    assert min(r.ts_ms for r in got.readings) == cl.ms(truck.first)
    assert max(r.ts_ms for r in got.readings) <= cl.ms(truck.last)
    assert driver.snapshot()["frames"] == len(truck.frames)
    assert driver.snapshot()["connected"] is False  # the capture is done


def test_replay_values_are_named_numbers_never_na_or_error(truck_replay: tuple[Collector, CanBus]) -> None:
    got, _driver = truck_replay
    values = got.values()
    assert values
    for v in values:
        assert set(v) == {"name", "value", "unit", "spn", "sa"}, v
        assert isinstance(v["value"], (int, float)) and not isinstance(v["value"], bool)
        lo, hi = TRUCK_RANGES[v["name"]]
        assert lo <= v["value"] <= hi, f"{v}: outside what the truck sent (a n/a or error value?)"
    units = {v["name"]: (v["spn"], v["unit"]) for v in values}
    assert units["engine_speed"] == (190, "rpm") and units["wheel_speed"] == (84, "km/h")
    assert units["coolant_temp"] == (110, "°C") and units["fuel_level"] == (96, "%")
    assert units["total_distance_hr"] == (917, "m") and units["fuel_rate"] == (183, "L/h")
    assert units["engine_hours"] == (247, "h") and units["total_fuel_used"] == (250, "L")
    # Always not available in the capture (cruise set speed, fuel level 2): never sent.
    assert "cruise_set_speed" not in units and "fuel_level_2" not in units
    # Error values of the oil temperature (15-17 s) and engine speed (31-31.5 s) are skipped, the
    # parking brake's n/a and error states (12-14 s) too: every value sent is in range (above).
    assert {v["sa"] for v in got.values("wheel_speed")} == {cl.ENGINE, cl.TACHO}, "the same PGN per source address"
    assert {v["sa"] for v in got.values("fuel_level")} == {cl.CAB}


def test_replay_dm1_changes_become_urgent_alarms(truck: cl.Truck, truck_replay: tuple[Collector, CanBus]) -> None:
    got, driver = truck_replay
    alarms = got.stream("alarm")
    assert [(r.ts_ms, r.data["state"], r.data["spn"], r.data["fmi"], r.data["oc"], r.data["source_address"])
            for r in alarms] == [(cl.ms(t), *rest) for t, *rest in truck.alarms]
    assert any(r.data["spn"] > 65535 for r in alarms), "SPN bits 17-19 from byte 3 of the DTC"
    for r in alarms:
        assert r.urgent and r.data["kind"] == "dtc"
        assert set(r.data) == {"kind", "state", "spn", "fmi", "oc", "source_address", "lamps"}
    engine = [r for r in alarms if r.data["source_address"] == cl.ENGINE]
    assert all(r.data["lamps"] == {"mil": "off", "red_stop": "off", "amber_warning": "on", "protect": "off"}
               for r in engine)
    st = driver.snapshot()
    assert st["vin"] == truck.vin == "LZZ5CLVB8JW123456"
    assert sorted((d["spn"], d["fmi"], d["oc"], d["source_address"]) for d in st["active_dtcs"]) == \
        sorted((d.spn, d.fmi, None if d.oc == 127 else d.oc, cl.ENGINE) for d in cl.ENGINE_DTCS_LATER)
    dm1_bams = sum(1 for f in truck.frames if f.can_id == 0x1CECFF00 and f.data[5:8] == bytes.fromhex("CAFE00"))
    assert st["transport"]["completed_bam"] == dm1_bams + 1  # and the VIN
    assert st["transport"]["completed_cmdt"] == 1  # brakes → cab, overheard
    assert st["transport"]["timeouts"] == st["transport"]["missing_packets"] == st["transport"]["bad_frames"] == 0


def test_replay_counts_unknown_11bit_and_error_frames(truck: cl.Truck, truck_replay: tuple[Collector, CanBus]) -> None:
    got, driver = truck_replay
    st = driver.snapshot()
    assert st["non_j1939_frames"] == truck.std_frames
    assert st["unknown_frames"] >= truck.unknown_ids >= 2
    assert st["error_frames"] >= 1  # the bus error frame (CAN_ERR_BUSERROR in its id)
    assert st["decoded_values"] == len(got.values())


def test_replay_ignition_from_bus_silence(truck: cl.Truck, truck_replay: tuple[Collector, CanBus]) -> None:
    got, driver = truck_replay
    ign = got.stream("ignition")
    assert [r.data for r in ign] == [{"on": True, "source": "can"}, {"on": False, "source": "can"},
                                     {"on": True, "source": "can"}]
    assert ign[0].ts_ms == cl.ms(truck.first)
    last_before, first_after = truck.gap
    # Off when the bus fell silent (the driver notes frame times at most every 0.25-0.5 s).
    assert cl.ms(last_before) - 500 <= ign[1].ts_ms <= cl.ms(last_before) + 10_000
    assert ign[2].ts_ms == cl.ms(first_after)
    assert driver.snapshot()["ignition"] is True


def test_no_ignition_readings_unless_configured(truck_log: Path) -> None:
    got, driver = replay(truck_log, **TRUCK_SAMPLING)
    assert got.stream("ignition") == [] and driver.snapshot()["ignition"] is None


def et1_sequence(coolant: list[cl.Value], sa: int = cl.ENGINE, offset_us: int = 0) -> list[cl.Frame]:
    return [cl.Frame(cl.at(i * cl.S + offset_us), cl.j1939_id(6, cl.ET1, sa), cl.et1_data(c, None))
            for i, c in enumerate(coolant)]


# Coolant temperature, one ET1 a second; min 5 s, deadband 3 °C, heartbeat every 12 s.
COOLANT = (
    [60, 61, 70, cl.NA, cl.ERR, 70, 71, 72, 72, 73, 72, 74]  # 0-11 s
    + [75] * 12                                              # 12-23 s
    + [90, 90, 90, 90, 90]                                   # 24-28 s
    + [cl.NA, cl.NA, cl.NA, cl.ERR, 90, 90, 90, 90]           # 29-36 s
    + [cl.NA] * 16                                           # 37-52 s: n/a is no heartbeat
    + [91, 92]                                               # 53-54 s
)
COOLANT_SENT = [(0, 60), (5, 70), (11, 74), (23, 75), (28, 90), (53, 91)]


def test_sampling_min_interval_deadband_heartbeat_on_capture_time(tmp_path: Path) -> None:
    log = cl.write_log(tmp_path / "et1.log", et1_sequence(COOLANT))
    got, _driver = replay(log, signals={"coolant_temp": SignalConfig(min_interval_s=5, deadband=3, max_interval_s=12)})
    sent = [(round(r.ts_ms / 1000 - cl.T0_US / 1e6), v["value"]) for r in got.stream("can") for v in r.data["values"]]
    # 60 first; 70 at 5 s (min interval, not at 2 s); 72 at 10 s moved only 2; 74 at 11 s;
    # 75 held: heartbeat 12 s after 11 s; 90 at 28 s (5 s after 23 s); 90 held from 28 s, n/a
    # from 37 s: no heartbeat of a value that is not there; 91 at 53 s moved 1 but 25 s stale.
    assert sent == COOLANT_SENT
    assert [v["name"] for v in got.values()] == ["coolant_temp"] * len(COOLANT_SENT)  # oil temp: n/a


def test_sampling_only_on_change_and_per_source_address(tmp_path: Path) -> None:
    engine = et1_sequence([80, 80, 80, 80, 81, 81, 81, 85, 85, 85])
    second = et1_sequence([70, 70, 70, 70, 70, 70, 70, 70, 70, 70], sa=0x01, offset_us=500_000)
    log = cl.write_log(tmp_path / "et1.log", cl.merge(engine, second))
    got, _driver = replay(log, signals={"coolant_temp": SignalConfig(min_interval_s=0, deadband=2, max_interval_s=0)})
    sent = [(round(r.ts_ms / 1000 - cl.T0_US / 1e6, 1), v["sa"], v["value"])
            for r in got.stream("can") for v in r.data["values"]]
    assert sent == [(0, 0, 80), (0, 1, 70), (7, 0, 85)], "max_interval 0: nothing without a change of >= deadband"


def test_replay_speed_1_paces_frames_in_real_time(tmp_path: Path) -> None:
    log = cl.write_log(tmp_path / "et1.log", et1_sequence([60, 70, 80]))
    got = Collector()
    driver = CanBus(CanConfig(interface="replay", replay=log, replay_speed=1, min_interval_s=0), got)
    start = time.monotonic()
    driver.run(threading.Event())
    elapsed = time.monotonic() - start
    assert 1.8 <= elapsed < 4, elapsed
    assert [v["value"] for v in got.values()] == [60, 70, 80]
    assert {r.ts_ms for r in got.stream("can")} <= {cl.ms(cl.at(i * cl.S)) for i in range(3)}


def test_values_carry_the_time_of_their_second(truck: cl.Truck, truck_replay: tuple[Collector, CanBus],
                                               tmp_path: Path) -> None:
    got, _driver = truck_replay
    bad = []
    for r in got.stream("can"):
        names = [(v["name"], v["sa"]) for v in r.data["values"]]
        if len(names) != len(set(names)):
            bad.append(f"one signal twice in the reading of {iso_ms(r.ts_ms)}: {names}")
        if r.ts_ms < cl.ms(truck.gap[0]) and any(v["value"] == 650.0 for v in r.data["values"]
                                                 if v["name"] == "engine_speed"):
            bad.append(f"the idle speed after the gap (55 s on) is in the reading of {iso_ms(r.ts_ms)}")
    log = cl.write_log(tmp_path / "et1.log", et1_sequence([60, 70, 80]))
    three, _driver = replay(log, min_interval_s=0)
    stamped = [(r.ts_ms, [v["value"] for v in r.data["values"]]) for r in three.stream("can")]
    if stamped != [(cl.ms(cl.at(i * cl.S)), [v]) for i, v in enumerate([60, 70, 80])]:
        bad.append(f"values 1 s apart, (ts, values): {stamped}")
    assert not bad, "\n".join(bad)


def test_steady_traffic_never_turns_the_ignition_off(tmp_path: Path) -> None:
    frames = cl.periodic(0, 40 * cl.S, 20_000, cl.j1939_id(3, cl.EEC1, cl.ENGINE), lambda t: cl.eec1_data(700))
    got, _driver = replay(cl.write_log(tmp_path / "eec1.log", frames), ignition=True)
    assert [r.data["on"] for r in got.stream("ignition")] == [True]


def test_candump_error_frames_are_counted_with_their_class(tmp_path: Path) -> None:
    frames = cl.merge(
        cl.periodic(0, 2 * cl.S, 100_000, cl.j1939_id(6, cl.ET1, cl.ENGINE), lambda t: cl.et1_data(80)),
        [cl.error_frame(500_000, cl.CAN_ERR_BUSOFF), cl.error_frame(600_000, cl.CAN_ERR_RESTARTED),
         cl.error_frame(700_000, cl.CAN_ERR_PROT | cl.CAN_ERR_BUSERROR)])
    _got, driver = replay(cl.write_log(tmp_path / "err.log", frames))
    st = driver.snapshot()
    assert (st["error_frames"], st["bus_off"], st["unknown_frames"]) == (3, 1, 0)


def test_unknown_frames_are_counted_per_frame(tmp_path: Path) -> None:
    frames = cl.merge(
        cl.periodic(0, 5 * cl.S, 100_000, cl.j1939_id(6, cl.AMB, cl.ENGINE), lambda t: bytes(8)),
        cl.periodic(0, 5 * cl.S, 500_000, cl.j1939_id(6, cl.PROP_B, cl.BODY), lambda t: bytes(8)))
    _got, driver = replay(cl.write_log(tmp_path / "unknown.log", frames))
    assert driver.snapshot()["unknown_frames"] == len(frames) == 60


# -- anything can.LogReader reads: the same capture as Vector ASC ----------------------------------


def test_asc_replay_gives_the_same_events_and_state(truck: cl.Truck, truck_log: Path, tmp_path: Path) -> None:
    asc = cl.write_asc(tmp_path / "truck.asc", truck.frames)
    assert "ErrorFrame" in asc.read_text() and " CF00400x " in asc.read_text()
    got_log, drv_log = replay(truck_log, ignition=True, **TRUCK_SAMPLING)
    got_asc, drv_asc = replay(asc, ignition=True, **TRUCK_SAMPLING)

    def events(c: Collector) -> list[tuple[str, int, dict]]:
        return [(r.stream, r.ts_ms, r.data) for r in c.readings if r.stream in ("alarm", "ignition")]

    assert events(got_asc) == events(got_log)
    assert {(v["name"], v["sa"]) for v in got_asc.values()} == {(v["name"], v["sa"]) for v in got_log.values()}
    a, b = drv_asc.snapshot(), drv_log.snapshot()
    for key in ("vin", "active_dtcs", "frames", "non_j1939_frames", "transport", "ignition"):
        assert a[key] == b[key], key
    assert a["error_frames"] == len(truck.error_frames)  # ASC keeps "ErrorFrame" (without the class)


def test_asc_replay_keeps_the_capture_times(truck: cl.Truck, tmp_path: Path) -> None:
    asc = cl.write_asc(tmp_path / "truck.asc", truck.frames)
    got, _driver = replay(asc, ignition=True, **TRUCK_SAMPLING)
    alarms = got.stream("alarm")
    assert [r.ts_ms for r in alarms] == [cl.ms(t) for t, *_ in truck.alarms]


# -- a fleet's DBC -------------------------------------------------------------------------------------


def worked_example() -> tuple[int, bytes, float]:
    """The notes' EEC1 example: identifier, data and engine speed, read from the notes."""
    if not SPN_NOTES.is_file():
        pytest.skip(f"J1939 SPN notes not found at {SPN_NOTES} (set LORRY_SHARED_DATA)")
    text = SPN_NOTES.read_text()
    m = re.search(r"ID `0x([0-9A-F]{8})`,\s*with\s+data `([0-9A-F ]+)`.*?\*\*(\d+) rpm\*\*", text, re.S)
    assert m, "worked example not found in the notes"
    return int(m[1], 16), bytes.fromhex(m[2]), float(m[3])


def test_dbc_decodes_and_overrides_the_builtin_table(demo_dbc: Path, tmp_path: Path) -> None:
    can_id, data, rpm = worked_example()
    assert (can_id, data, rpm) == (0x0CF00400, bytes.fromhex("FF7D7DE015FFF0FF"), 700.0)
    frames = [
        cl.Frame(cl.at(0), can_id, data),
        cl.Frame(cl.at(1_000), cl.j1939_id(6, cl.CCVS1, cl.ENGINE), cl.ccvs1_data(80.5, parking=1, cruise_set=85)),
        cl.Frame(cl.at(2_000), cl.j1939_id(6, cl.ET1, cl.ENGINE), cl.et1_data(80)),
        cl.Frame(cl.at(1_000_000), can_id, bytes.fromhex("FF7D7DFFFFFFF0FF")),  # engine speed raw 0xFFFF: n/a
        cl.Frame(cl.at(1_001_000), cl.j1939_id(6, cl.CCVS1, cl.ENGINE), cl.ccvs1_data(cl.ERR)),  # 0xFE00: error
        cl.Frame(cl.at(2_000_000), can_id, bytes.fromhex("FF7D7D0016FFF0FF")),  # 704 rpm
    ]
    got, _driver = replay(cl.write_log(tmp_path / "dbc.log", frames), dbc=[demo_dbc], min_interval_s=0,
                          max_interval_s=0)
    values = [(round(r.ts_ms / 1000 - cl.T0_US / 1e6), v["name"], v["spn"], v["value"], v["unit"], v["sa"])
              for r in got.stream("can") for v in r.data["values"]]
    assert values == [
        (0, "EngineSpeed", 190, 700.0, "rpm", 0),
        (0, "WheelBasedVehicleSpeed", 84, 80.5, "km/h", 0),
        (0, "coolant_temp", 110, 80.0, "°C", 0),  # ET1 is not in the DBC: the built-in table
        (2, "EngineSpeed", 190, 704.0, "rpm", 0),
    ], "the DBC's names and SPNs; no built-in EEC1/CCVS1 signal; nothing for 0xFFFF or 0xFE00"


def test_dbc_signal_can_be_disabled(demo_dbc: Path, tmp_path: Path) -> None:
    can_id, data, _rpm = worked_example()
    frames = [cl.Frame(cl.at(0), can_id, data),
              cl.Frame(cl.at(1_000), cl.j1939_id(6, cl.CCVS1, 0), cl.ccvs1_data(80.5))]
    got, _driver = replay(cl.write_log(tmp_path / "dbc.log", frames), dbc=[demo_dbc], min_interval_s=0,
                          signals={"EngineSpeed": SignalConfig(enabled=False)})
    assert [v["name"] for v in got.values()] == ["WheelBasedVehicleSpeed"]


# -- live, on a python-can virtual bus -----------------------------------------------------------------


def channel() -> str:
    return f"test-can-{uuid.uuid4().hex[:8]}"


def live_config(ch: str, **extra: Any) -> CanConfig:
    return CanConfig(interface="virtual", channel=ch, min_interval_s=0, max_interval_s=0,
                     reopen_min_s=0.05, reopen_max_s=0.2, **extra)


class Listener(can.Listener):
    def __init__(self) -> None:
        self.msgs: list[can.Message] = []

    def on_message_received(self, msg: can.Message) -> None:
        self.msgs.append(msg)


def live_frames() -> list[cl.Frame]:
    """The truck's first 3.7 s: EEC1, CCVS1, ET1, DD1…, two DM1 BAMs and the VIN."""
    return [f for f in cl.truck(with_errors=False).frames if f.ts < cl.at(3_700_000)]


def test_live_frames_are_stamped_by_the_agent_and_nothing_is_sent() -> None:
    ch = channel()
    sender, spy = cl.virtual_bus(ch), cl.virtual_bus(ch)
    heard = Listener()
    notifier = can.Notifier(spy, [heard])
    got = Collector()
    driver = CanBus(live_config(ch, ignition=True, ignition_silence_s=1.0), got)
    try:
        with Running(driver):
            wait_for(lambda: driver.snapshot()["opens"] == 1 and driver.connected, what="bus opened")
            frames = live_frames()
            sent_mono = time.monotonic_ns()
            cl.send(sender, frames)
            wait_for(lambda: driver.counters["frames"] == len(frames), what="every frame received")
            wait_for(lambda: got.stream("alarm") and got.stream("can"), what="readings")
            wait_for(lambda: [r.data["on"] for r in got.stream("ignition")] == [True, False], 4, "ignition off")
    finally:
        notifier.stop()
        spy.shutdown()
        sender.shutdown()
    assert got.readings
    for r in got.readings:
        assert r.ts_ms is None, f"{r.stream}: live readings are stamped by the agent's clock"
        assert "replay" not in r.meta
        assert sent_mono - 10**8 <= r.meta["mono_ns"] <= time.monotonic_ns(), r
    assert [r.data["spn"] for r in got.stream("alarm")] == [d.spn for d in cl.ENGINE_DTCS]
    assert driver.snapshot()["vin"] == cl.VIN_TEXT
    assert {v["name"] for v in got.values()} >= {"engine_speed", "wheel_speed", "coolant_temp", "fuel_level"}
    # Listen-only: the spy on the same channel heard exactly what the test sent.
    assert [(m.arbitration_id, bytes(m.data)) for m in heard.msgs] == [(f.can_id, f.data) for f in frames]
    assert driver.snapshot()["requests_sent"] == 0


def test_live_requests_the_vin_when_asked() -> None:
    ch = channel()
    sender, spy = cl.virtual_bus(ch), cl.virtual_bus(ch)
    driver = CanBus(live_config(ch, requests=["vin"], source_address=0xF9), Collector())
    try:
        with Running(driver):
            wait_for(lambda: driver.connected, what="bus opened")
            cl.send(sender, [cl.Frame(0, cl.j1939_id(3, cl.EEC1, cl.ENGINE), cl.eec1_data(700))])
            request = None
            deadline = time.monotonic() + WAIT_S
            while request is None and time.monotonic() < deadline:
                m = spy.recv(0.1)
                if m is not None and m.arbitration_id != cl.j1939_id(3, cl.EEC1, cl.ENGINE):
                    request = m
    finally:
        spy.shutdown()
        sender.shutdown()
    assert request is not None, "no request heard"
    # Priority 6, PGN 59904 (PDU1: destination global), from 0xF9; data: the PGN, 3 bytes LE.
    assert request.is_extended_id and request.arbitration_id == 0x18EAFFF9 == cl.j1939_id(6, cl.REQUEST, 0xF9)
    assert bytes(request.data) == bytes([0xEC, 0xFE, 0x00]) == cl.VIN.to_bytes(3, "little")
    assert driver.snapshot()["requests_sent"] == 1


def test_live_error_frames_and_bus_off_are_counted() -> None:
    ch = channel()
    sender = cl.virtual_bus(ch)
    driver = CanBus(live_config(ch), Collector())
    try:
        with Running(driver):
            wait_for(lambda: driver.connected, what="bus opened")
            sender.send(can.Message(is_error_frame=True, arbitration_id=cl.CAN_ERR_PROT | cl.CAN_ERR_BUSERROR))
            sender.send(can.Message(is_error_frame=True, arbitration_id=cl.CAN_ERR_BUSOFF))
            wait_for(lambda: driver.snapshot()["bus_off"] == 1, what="bus-off")
            st = driver.snapshot()
            assert st["error_frames"] == 2 and "bus-off" in (st["last_error"] or "")
            sender.send(can.Message(is_error_frame=True, arbitration_id=cl.CAN_ERR_RESTARTED))
            wait_for(lambda: driver.snapshot()["error_frames"] == 3, what="restarted")
            st = driver.snapshot()
            assert st["bus_off"] == 1 and st["last_error"] is None and st["unknown_frames"] == 0
    finally:
        sender.shutdown()


def test_live_bus_off_then_silence_reopens_the_interface(monkeypatch: pytest.MonkeyPatch) -> None:
    import drivers.can.bus

    monkeypatch.setattr(drivers.can.bus, "BUS_OFF_REOPEN_S", 0.6)
    ch = channel()
    sender = cl.virtual_bus(ch)
    got = Collector()
    driver = CanBus(live_config(ch), got)
    try:
        with Running(driver):
            wait_for(lambda: driver.connected, what="bus opened")
            sender.send(can.Message(is_error_frame=True, arbitration_id=cl.CAN_ERR_BUSOFF))
            wait_for(lambda: driver.snapshot()["opens"] == 2 and driver.connected, what="reopened after bus-off")
            st = driver.snapshot()
            assert st["bus_off"] == 1 and "reopening" in (st["last_error"] or "")
            time.sleep(1.5)
            assert driver.snapshot()["opens"] == 2, "one reopen for one bus-off"
            sender.send(cl.message(cl.Frame(0, cl.j1939_id(3, cl.EEC1, cl.ENGINE), cl.eec1_data(700))))
            wait_for(lambda: [v["value"] for v in got.values("engine_speed")] == [700], what="frames after the reopen")
    finally:
        sender.shutdown()


def test_live_no_reopen_when_frames_followed_the_bus_off(monkeypatch: pytest.MonkeyPatch) -> None:
    import drivers.can.bus

    monkeypatch.setattr(drivers.can.bus, "BUS_OFF_REOPEN_S", 0.6)
    ch = channel()
    sender = cl.virtual_bus(ch)
    driver = CanBus(live_config(ch), Collector())
    try:
        with Running(driver):
            wait_for(lambda: driver.connected, what="bus opened")
            sender.send(can.Message(is_error_frame=True, arbitration_id=cl.CAN_ERR_BUSOFF))
            eec1 = cl.j1939_id(3, cl.EEC1, cl.ENGINE)
            cl.send(sender, cl.periodic(0, 1_200_000, 20_000, eec1, lambda t: cl.eec1_data(700 + 1000 * t)), pace=1)
            time.sleep(1.8)  # then the bus falls silent
            assert driver.snapshot()["opens"] == 1, driver.snapshot()["last_error"]
    finally:
        sender.shutdown()


class FlakyBus:
    """A virtual bus whose recv() fails once when told to, like an interface going down."""

    def __init__(self, bus: can.BusABC, fail: threading.Event):
        self.bus, self.fail = bus, fail

    def recv(self, timeout: float | None = None) -> can.Message | None:
        if self.fail.is_set():
            self.fail.clear()
            raise can.CanOperationError("Failed to receive: Network is down [Error Code 100]")
        return self.bus.recv(timeout)

    def send(self, msg: can.Message, timeout: float | None = None) -> None:
        self.bus.send(msg, timeout)

    def shutdown(self) -> None:
        self.bus.shutdown()


def test_live_interface_down_is_retried_reported_and_recovers() -> None:
    ch = channel()
    up, fail = threading.Event(), threading.Event()
    calls: list[str] = []

    def factory() -> Any:
        if not up.is_set():
            calls.append("down")
            raise OSError(errno.ENETDOWN, "Network is down")
        calls.append("open")
        return FlakyBus(cl.virtual_bus(ch), fail)

    got = Collector()
    driver = CanBus(live_config(ch), got, bus_factory=factory)
    sender = cl.virtual_bus(ch)

    def engine(rpm: float) -> None:
        cl.send(sender, [cl.Frame(0, cl.j1939_id(3, cl.EEC1, cl.ENGINE), cl.eec1_data(rpm))])

    try:
        with Running(driver):
            wait_for(lambda: driver.snapshot()["open_failures"] >= 3, what="retries")
            st = driver.snapshot()
            assert st["connected"] is False and st["opens"] == 0
            assert "Network is down" in st["last_error"]
            up.set()
            wait_for(lambda: driver.snapshot()["opens"] == 1 and driver.connected, what="opened")
            engine(700)
            wait_for(lambda: [v["value"] for v in got.values("engine_speed")] == [700], what="first value")
            fail.set()  # the interface goes away mid-run
            wait_for(lambda: driver.snapshot()["opens"] == 2 and driver.connected, what="reopened")
            assert "Network is down" in driver.snapshot()["last_error"]
            engine(1500)
            wait_for(lambda: [v["value"] for v in got.values("engine_speed")] == [700, 1500], what="frames again")
    finally:
        sender.shutdown()
    assert calls[-2:] == ["open", "open"] and calls.count("down") >= 3


# -- end to end: the agent process, a real mosquitto ---------------------------------------------------


def test_agent_publishes_can_and_alarm_readings(tmp_path: Path, truck: cl.Truck, broker: Mosquitto,
                                                backend: Backend) -> None:
    log = cl.write_log(tmp_path / "truck.log", truck.frames)
    can_section = {"interface": "replay", "replay": str(log), "replay_speed": 0, "ignition": True, **TRUCK_SAMPLING}
    cfg = agent_config(tmp_path, broker.port, can=can_section, time={"trust_system_clock": "always"})
    expected, _driver = replay(log, ignition=True, **TRUCK_SAMPLING)
    want = {s: [(iso_ms(r.ts_ms), r.data) for r in expected.stream(s)] for s in ("can", "alarm", "ignition")}
    assert len(want["can"]) > 10 and len(want["alarm"]) == len(truck.alarms) and len(want["ignition"]) == 3
    with AgentProcess(cfg, "--until-drained") as agent:
        assert agent.wait(60) == 0, agent.log()
    wait_until(lambda: all(len(backend.readings(s)) >= len(w) for s, w in want.items()), 10, "every reading")
    for stream, w in want.items():
        got = sorted(backend.readings(stream), key=lambda r: r["seq"])
        assert [r["seq"] for r in got] == list(range(1, len(w) + 1)), f"{stream}: seq without gaps, once each"
        assert all(r["device"] == "CQ-HN-0042" and r["stream"] == stream and "ts_trusted" not in r for r in got)
        envelope = ("device", "stream", "seq", "ts", "chain_seq", "prev_hash", "hash", "hmac")
        body = [(r["ts"], {k: v for k, v in r.items() if k not in envelope}) for r in got]
        assert body == w, f"{stream}: what the driver produced, with the capture's times"
    alarms = sorted(backend.readings("alarm"), key=lambda r: r["chain_seq"])
    assert [a["chain_seq"] for a in alarms] == list(range(1, len(alarms) + 1)), "alarms are chained"
