"""Hostile CAN times and transport frames (issue 11, item 2 for CAN): a frame stamped 1e20, -5,
NaN or a decade away never kills the driver, never hangs a paced replay, never dates a reading
absurdly and never changes what the good frames around it give; the J1939 transport protocol
never raises whatever frames arrive."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from unittest import mock

import can
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import canlog as cl
import drivers.can.bus
import drivers.can.replay
from agent.demo.broker import free_port
from drivers.can import candump
from drivers.can.bus import CanBus
from drivers.can.config import CanConfig
from drivers.can.j1939.tp import MAX_SIZE, MIN_SIZE, TransportReassembler
from support import REPO, Collector, Running, agent_config

EEC1 = cl.j1939_id(3, cl.EEC1, cl.ENGINE)
ET1 = cl.j1939_id(6, cl.ET1, cl.ENGINE)
AMB = cl.j1939_id(6, cl.AMB, cl.ENGINE)  # a PGN nobody samples: it changes no reading
REPLAY_S = 20.0  # a replay of a few hundred frames that takes longer than this is hung
SANE_MS = (candump.EPOCH_MIN * 1000, (max(time.time(), candump.NOT_BEFORE) + candump.FUTURE_S) * 1000)


def engine(seconds: float = 6.0) -> list[cl.Frame]:
    """EEC1 every 100 ms and ET1 every second, engine speed and coolant climbing."""
    return cl.merge(
        cl.periodic(0, int(seconds * cl.S), 100_000, EEC1, lambda t: cl.eec1_data(600 + 50 * t)),
        cl.periodic(5_000, int(seconds * cl.S), cl.S, ET1, lambda t: cl.et1_data(60 + 3 * int(t))),
        cl.bam(2 * cl.S + 500, cl.ENGINE, cl.DM1, cl.dm1_payload([cl.Dtc(110, 0, 3), cl.Dtc(100, 1, 1)])))


def write(path: Path, stamped: list[tuple[str, cl.Frame]]) -> Path:
    """A candump log whose stamps are given as text: ``(1e20) can0 0CF00400#…``."""
    path.write_text("".join(f"({s}) " + cl.log_line(f).split(") ", 1)[1] + "\n" for s, f in stamped))
    return path


def log_of(frames: list[cl.Frame]) -> list[tuple[str, cl.Frame]]:
    return [(f"{f.ts:.6f}", f) for f in frames]


def replay(path: Path, timeout: float = REPLAY_S, **config: Any) -> tuple[Collector, CanBus]:
    got = Collector()
    cfg = {"interface": "replay", "replay": path, "replay_speed": 0, "min_interval_s": 0, "max_interval_s": 0, **config}
    driver = CanBus(CanConfig(**cfg), got)
    with Running(driver) as running:
        running.join(timeout)  # fails the test if the replay hangs or raises
    return got, driver


def readings(c: Collector) -> list[tuple[str, int | None, dict]]:
    return [(r.stream, r.ts_ms, r.data) for r in c.snapshot()]


def assert_sane(c: Collector) -> None:
    for r in c.snapshot():
        assert r.ts_ms is None or SANE_MS[0] <= r.ts_ms <= SANE_MS[1], f"{r.stream} reading dated {r.ts_ms}"
        if r.ts_ms is None:
            assert r.meta["mono_ns"] <= time.monotonic_ns()


# -- the cases of the issue -----------------------------------------------------------------------


@pytest.mark.parametrize("stamp", ["1e20", "-5", "nan", "inf", "-inf", "1e308", "9999999999", "0", "banana"])
@pytest.mark.parametrize("where", [0, 7, -1])
def test_one_absurd_stamp_changes_nothing_else(tmp_path: Path, stamp: str, where: int) -> None:
    frames = engine()
    clean, _ = replay(write(tmp_path / "clean.log", log_of(frames)))
    stamped = log_of(frames)
    stamped.insert(where if where >= 0 else len(stamped), (stamp, cl.Frame(0, AMB, bytes(8))))
    got, driver = replay(write(tmp_path / "hostile.log", stamped))
    assert readings(got) == readings(clean), "the good frames give what they give without it"
    st = driver.snapshot()
    assert st["bad_timestamp"] == 1 and st["frames"] == len(stamped) and st["unknown_frames"] == 1
    assert st["capture_clock"] == "capture"


def test_1e20_and_minus_5_end_to_end_through_dry_run(tmp_path: Path) -> None:
    frames = engine()
    stamped = log_of(frames)
    stamped.insert(3, ("1e20", cl.Frame(0, EEC1, cl.eec1_data(5000))))
    stamped.insert(20, ("-5", cl.Frame(0, EEC1, cl.eec1_data(5000))))
    capture = write(tmp_path / "truck.log", stamped)
    section = {"interface": "replay", "replay": str(capture), "replay_speed": 5,
               "min_interval_s": 0, "max_interval_s": 0}
    cfg = agent_config(tmp_path, free_port(), can=section, time={"trust_system_clock": "always"})
    r = subprocess.run([sys.executable, "-m", "agent", "run", "--config", str(cfg), "--dry-run"],
                       capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr
    payloads = [json.loads(line)["payload"] for line in r.stdout.splitlines()]
    payloads = [p for x in payloads for p in (x if isinstance(x, list) else [x])]
    assert {p["stream"] for p in payloads} == {"can", "alarm"}
    assert all(p["ts"].startswith("2023-11-14T22:13:2") for p in payloads), [p["ts"] for p in payloads]
    speeds = [v["value"] for p in payloads if p["stream"] == "can" for v in p["values"] if v["name"] == "engine_speed"]
    assert max(speeds) >= 800, "the frames after them are read (at 6 s: 900 rpm, sent on a change of 100)"


def test_minus_5_first_does_not_hang_a_paced_replay(tmp_path: Path) -> None:
    frames = engine(3)
    stamped = [("-5", frames[0])] + log_of(frames[1:])
    start = time.monotonic()
    got, driver = replay(write(tmp_path / "neg.log", stamped), timeout=10, replay_speed=1)
    assert time.monotonic() - start < 6, "paced in real time: the capture is 3 s long"
    assert driver.snapshot()["bad_timestamp"] == 1
    assert_sane(got)


def test_pacing_never_waits_long_for_one_frame(tmp_path: Path) -> None:
    day = 86_400 * cl.S
    second = cl.periodic(0, cl.S, 100_000, EEC1, lambda t: cl.eec1_data(700 + 1000 * t))
    frames = second + [f._replace(ts=cl.at(day + round((f.ts - cl.at(0)) * cl.S))) for f in second]
    with mock.patch.object(drivers.can.replay, "MAX_PACE_S", 0.3):
        start = time.monotonic()
        got, driver = replay(cl.write_log(tmp_path / "two-days.log", frames), timeout=10, replay_speed=1)
    assert time.monotonic() - start < 5
    st = driver.snapshot()
    assert (st["pacing_capped"], st["time_jumps"], st["bad_timestamp"]) == (1, 1, 0)
    assert max(r.ts_ms for r in got.snapshot()) >= cl.ms(cl.at(day)), "a jump the next frames follow is believed"


def test_a_capture_restarted_earlier_is_sampled_again(tmp_path: Path) -> None:
    later = [f._replace(ts=f.ts + 3600) for f in cl.periodic(0, 3 * cl.S, cl.S, ET1, lambda t: cl.et1_data(80))]
    earlier = cl.periodic(0, 3 * cl.S, cl.S, ET1, lambda t: cl.et1_data(70 + 3 * int(t)))
    got, driver = replay(cl.write_log(tmp_path / "restarted.log", later + earlier), min_interval_s=0.5)
    values = [(r.ts_ms, v["value"]) for r in got.snapshot() for v in r.data["values"] if v["name"] == "coolant_temp"]
    assert values == [(cl.ms(later[0].ts), 80), (cl.ms(earlier[0].ts), 70), (cl.ms(earlier[1].ts), 73),
                      (cl.ms(earlier[2].ts), 76)]
    assert driver.snapshot()["time_jumps"] == 1


def test_a_dated_frame_in_a_relative_capture_dates_nothing(tmp_path: Path) -> None:
    frames = engine(3)
    path = cl.write_screen(tmp_path / "tz.txt", frames, "tz")
    lines = path.read_text().splitlines()
    lines.insert(10, cl.screen_line(cl.Frame(0, AMB, bytes(8)), "1700000000.000000"))
    path.write_text("\n".join(lines) + "\n")
    got, driver = replay(path)
    st = driver.snapshot()
    assert st["bad_timestamp"] == 1 and st["capture_clock"] == "agent"
    assert got.snapshot() and all(r.ts_ms is None for r in got.snapshot())


# -- properties -----------------------------------------------------------------------------------

T0 = cl.at(0)
absurd = st.one_of(
    st.sampled_from([1e20, -5.0, math.nan, math.inf, -math.inf, 1e308, -1e-9, candump.EPOCH_MAX, 5.0, 0.0]),
    st.floats(max_value=-1e-6),
    st.floats(min_value=candump.EPOCH_MAX, allow_infinity=True),
    st.floats(0, candump.EPOCH_MIN - 1),
    st.floats(61, 3e8).flatmap(lambda d: st.sampled_from([T0 - d, T0 + 10 + d])),
)
any_stamp = st.one_of(absurd, st.floats(allow_nan=True, allow_infinity=True), st.floats(T0 - 100, T0 + 100),
                      st.text(alphabet="0123456789.e+-naif ", max_size=12))
any_frame = st.sampled_from(engine(3) + [cl.Frame(0, AMB, bytes(8)), cl.error_frame(0, cl.CAN_ERR_BUSOFF),
                                         cl.Frame(0, 0x123, b"\x01", extended=False)])
FAST = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FAST
@given(st.lists(st.tuples(any_stamp, any_frame), min_size=1, max_size=60), st.sampled_from([0, 1000]))
@example([("1e20", cl.Frame(0, EEC1, cl.eec1_data(700)))] * 3, 1000)
@example([("-5", cl.Frame(0, EEC1, cl.eec1_data(700))), (str(T0), cl.Frame(0, EEC1, cl.eec1_data(800)))], 1)
def test_any_stamps_never_raise_hang_or_date_absurdly(tmp_path: Path, stamped: list, speed: int) -> None:
    path = write(tmp_path / "any.log", [(s if isinstance(s, str) else repr(s), f) for s, f in stamped])
    with mock.patch.object(drivers.can.replay, "MAX_PACE_S", 0.01):
        got, driver = replay(path, replay_speed=speed)
    assert driver.snapshot()["frames"] == len(stamped)
    assert_sane(got)


@FAST
@given(st.lists(st.tuples(st.integers(0, 10_000), absurd), min_size=1, max_size=8, unique_by=lambda x: x[0]))
def test_isolated_absurd_stamps_change_no_reading(tmp_path: Path, inserts: list[tuple[int, float]]) -> None:
    frames = engine(4)
    clean, _ = replay(write(tmp_path / "clean.log", log_of(frames)))
    stamped = log_of(frames)
    for i, (pos, ts) in enumerate(sorted(inserts, reverse=True)):  # one per gap: never two in a row
        at = 1 + (pos * 97 + i * 13) % (len(frames) - 1)
        if all(s != "X" for s, _f in stamped[at - 1:at + 1]):
            stamped.insert(at, ("X", cl.Frame(ts, AMB, bytes(8))))
    stamped = [(repr(f.ts) if s == "X" else s, f) for s, f in stamped]
    got, driver = replay(write(tmp_path / "hostile.log", stamped))
    assert readings(got) == readings(clean)
    assert driver.snapshot()["bad_timestamp"] == len(stamped) - len(frames)


@settings(max_examples=1500, deadline=None)
@given(st.lists(st.one_of(absurd, st.floats(allow_nan=True, allow_infinity=True), st.floats(T0 - 200, T0 + 200),
                          st.floats(0, 300), st.none()), max_size=80),
       st.sampled_from(["auto", "live", "local", "delta", "none"]))
def test_the_timeline_keeps_every_frame_in_order_at_a_believable_time(stamps: list[float | None], mode: str) -> None:
    """None stands for the live bus's "nothing received" between frames."""
    counters = {"bad_timestamp": 0, "time_jumps": 0}
    times = candump.Timeline(mode, counters)
    msgs = [None if s is None else can.Message(timestamp=s, arbitration_id=i) for i, s in enumerate(stamps)]
    out = list(times.frames(iter(msgs)))
    assert [m.arbitration_id for m in out if m is not None] == [m.arbitration_id for m in msgs if m is not None]
    assert out.count(None) == msgs.count(None)
    hi = SANE_MS[1] / 1000 if mode == "auto" else candump.EPOCH_MAX
    for m in out:
        if m is not None:
            assert math.isfinite(m.timestamp) and 0 <= m.timestamp <= hi, m.timestamp
            if times.trusted:
                assert m.timestamp >= candump.EPOCH_MIN
    assert times.trusted is False or mode == "auto"
    assert 0 <= counters["bad_timestamp"] <= len(stamps)


class FakeBus:
    """A live bus delivering given messages, then silence."""

    def __init__(self, msgs: list[can.Message]):
        self.msgs = list(msgs)

    def recv(self, timeout: float | None = None) -> can.Message | None:
        if self.msgs:
            return self.msgs.pop(0)
        time.sleep(0.01)
        return None

    def send(self, msg: can.Message, timeout: float | None = None) -> None:
        pass

    def shutdown(self) -> None:
        pass


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(allow_nan=True, allow_infinity=True) | absurd, any_frame), min_size=1, max_size=40))
def test_live_frames_with_any_stamps_never_raise_and_are_dated_by_the_agent(stamped: list) -> None:
    msgs = [cl.message(f._replace(ts=0.0)) for _s, f in stamped]
    for m, (s, _f) in zip(msgs, stamped):
        m.timestamp = s
    got = Collector()
    start = time.monotonic_ns()
    driver = CanBus(CanConfig(interface="virtual", channel="fake", min_interval_s=0, max_interval_s=0, ignition=True,
                              ignition_silence_s=0.05), got, bus_factory=lambda: FakeBus(msgs))
    with Running(driver):
        deadline = time.monotonic() + 5
        while driver.snapshot()["frames"] < len(stamped) and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(0.05)
    assert driver.snapshot()["frames"] == len(stamped)
    for r in got.snapshot():
        assert r.ts_ms is None
        assert start - int(drivers.can.bus.MAX_AGE_S * 1e9) <= r.meta["mono_ns"] <= time.monotonic_ns()


# -- the transport protocol -----------------------------------------------------------------------

CM, DT = 60416, 60160
tp_frame = st.tuples(
    st.floats(allow_nan=True, allow_infinity=True) | st.floats(0, 100),
    st.sampled_from([CM, DT, CM, DT, cl.DM1, 0]),
    st.sampled_from([0x00, 0x0B, 0x17, 0xFF]),
    st.sampled_from([0x00, 0x0B, 0x17, 0xFF]),
    st.one_of(st.binary(max_size=64),
              st.tuples(st.sampled_from([16, 17, 19, 32, 255, 0]), st.integers(0, 0xFFFF), st.integers(0, 255),
                        st.integers(0, 255), st.binary(min_size=3, max_size=3))
              .map(lambda c: bytes([c[0], c[1] & 0xFF, c[1] >> 8, c[2], c[3]]) + c[4]),
              st.tuples(st.integers(0, 256), st.binary(max_size=8)).map(lambda p: bytes([p[0] % 256]) + p[1])),
)


@settings(max_examples=500, deadline=None)
@given(st.lists(tp_frame, max_size=120))
def test_tp_never_raises_whatever_frames_and_times_arrive(frames: list) -> None:
    r = TransportReassembler(max_sessions=3)
    for ts, pgn, sa, da, data in frames:
        done = r.feed(ts, pgn, sa, da, data)
        if done is not None:
            _pgn, _sa, _da, payload = done
            assert MIN_SIZE <= len(payload) <= MAX_SIZE
        r.expire(ts)
        assert len(r) <= 3
    assert all(v >= 0 for v in vars(r.counters).values())


@settings(max_examples=300, deadline=None)
@given(st.lists(tp_frame.filter(lambda f: f[2] != cl.ENGINE), max_size=40), st.randoms(use_true_random=False),
       st.binary(min_size=MIN_SIZE, max_size=60))
def test_a_bam_among_other_nodes_frames_completes(noise: list, rnd: Any, payload: bytes) -> None:
    """Whatever other nodes send in between (any frames, any times), a BAM from the engine whose
    own frames are in order and in time completes with its payload."""
    frames = [((f.can_id >> 8) & 0xFF00, cl.ENGINE, 0xFF, f.data) for f in cl.bam(0, cl.ENGINE, cl.DM1, payload)]
    for _ts, pgn, sa, da, data in noise:  # the BAM's own frames stay in order
        frames.insert(rnd.randint(0, len(frames)), (pgn, sa, da, data))
    r = TransportReassembler()
    done = []
    for step, frame in enumerate(frames):
        out = r.feed(0.01 * step, *frame)  # at most 0.4 s between two BAM packets: within T1
        if out is not None and out[1] == cl.ENGINE:
            done.append(out)
    assert done == [(cl.DM1, cl.ENGINE, 0xFF, payload)]
