"""candump text captures (drivers/can/candump.py and the replay in drivers/can/bus.py): every form
candump writes or prints, whatever the file is called, end to end through `run --dry-run` and
`check-config`; captures that cannot be read are refused, naming the file; and property tests:
no line or byte sequence makes the parser raise or yield an impossible frame, and a good frame
next to a bad line is never lost."""

from __future__ import annotations

import gzip
import json
import math
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import canlog as cl
from agent.demo.broker import free_port
from drivers.can import candump
from drivers.can.bus import CanBus
from drivers.can.capture import CaptureError, open_capture
from drivers.can.capture import frames as capture_frames
from drivers.can.config import CanConfig
from support import REPO, Collector, agent_config

# A short truck: engine, wheel speed, DM1 over BAM, the VIN, 11-bit frames, error frames.
SHORT = [f for f in cl.truck().frames if f.ts < cl.at(14_000_000)]
# What candump -ta printed in the issue (the rest of each line as candump prints it).
ISSUE_TA = """\
 (000.000000)  can0  18FCF200   [8]  E1 FF 00 00 00 00 00 00
 (000.000734)  can0  0CF00400   [8]  FF 7D 7D E0 15 FF F0 FF
 (000.001521)  can0  18FEF100   [8]  F7 00 00 CF FF FF FF FF
 (000.010733)  can0  18FEEE00   [8]  64 FF 60 2D FF FF FF FF
 (000.020801)  can0  0CF00400   [8]  FF 7D 7D 00 16 FF F0 FF
"""


def key(m: Any) -> tuple:
    return m.arbitration_id, m.is_extended_id, m.is_error_frame, m.is_remote_frame, bytes(m.data)


def fkey(f: cl.Frame) -> tuple:
    return f.can_id, f.extended and not f.error, f.error, False, f.data


def read(path: Path) -> tuple[list[Any], candump.Timeline, dict[str, int]]:
    """The capture's frames as the replay reads them, with the times the Timeline believes."""
    cap = open_capture(path)
    counters = {"bad_timestamp": 0, "time_jumps": 0}
    times = candump.Timeline(cap.clock, counters)
    return list(times.frames(capture_frames(cap, candump.Parser()))), times, counters


def replay(path: Path, **config: Any) -> tuple[Collector, CanBus]:
    got = Collector()
    driver = CanBus(CanConfig(interface="replay", replay=path, replay_speed=0, **config), got)
    driver.run(threading.Event())
    return got, driver


def values_of(c: Collector) -> list[tuple[str, int, float]]:
    return [(v["name"], v["sa"], v["value"]) for r in c.snapshot() if r.stream == "can" for v in r.data["values"]]


def write_form(tmp: Path, form: str, frames: list[cl.Frame], name: str) -> Path:
    if form == "l":
        return cl.write_log(tmp / name, frames)
    if form == "numbered":
        return cl.write_screen(tmp / name, frames, "tz", numbered=True, crlf=True)
    return cl.write_screen(tmp / name, frames, form)


FORMS = ["l", "ta", "td", "tz", "tA", "none", "numbered"]
ABSOLUTE = {"l", "ta"}


# -- each form, whatever the file is called -------------------------------------------------------


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", ["capture.log", "capture.txt", "capture", "capture.candump"])
def test_every_form_gives_the_frames_and_their_times(tmp_path: Path, form: str, name: str) -> None:
    path = write_form(tmp_path, form, SHORT, name)
    got, times, counters = read(path)
    assert [key(m) for m in got] == [fkey(f) for f in SHORT], "every frame, its id, kind and data"
    assert counters == {"bad_timestamp": 0, "time_jumps": 0}
    assert times.trusted is (form in ABSOLUTE), "only Unix times may date a reading"
    if form == "none":
        assert all(b.timestamp >= a.timestamp for a, b in zip(got, got[1:])), "timed as read"
        return
    rel = [round(m.timestamp - got[0].timestamp, 6) for m in got]
    assert rel == [round(f.ts - SHORT[0].ts, 6) for f in SHORT], "the capture's own spacing"
    if form in ABSOLUTE:
        assert [m.timestamp for m in got] == [f.ts for f in SHORT]


def test_the_issues_candump_ta_text_in_a_log_has_its_data(tmp_path: Path) -> None:
    path = tmp_path / "truck.log"
    path.write_text(ISSUE_TA)
    got, times, _ = read(path)
    assert [(m.arbitration_id, bytes(m.data).hex(" ").upper()) for m in got] == [
        (0x18FCF200, "E1 FF 00 00 00 00 00 00"), (0x0CF00400, "FF 7D 7D E0 15 FF F0 FF"),
        (0x18FEF100, "F7 00 00 CF FF FF FF FF"), (0x18FEEE00, "64 FF 60 2D FF FF FF FF"),
        (0x0CF00400, "FF 7D 7D 00 16 FF F0 FF")]
    assert [m.timestamp for m in got] == [0.0, 0.000734, 0.001521, 0.010733, 0.020801]
    assert times.trusted is False, "(000.000000) counts from the capture's start: no date"
    readings, driver = replay(path, min_interval_s=0)
    assert [v for n, _sa, v in values_of(readings) if n == "engine_speed"] == [700.0]
    assert driver.snapshot()["frames"] == 5


def test_compressed_and_utf16_captures_are_read(tmp_path: Path) -> None:
    text = cl.write_screen(tmp_path / "a.txt", SHORT, "tz").read_text()
    (tmp_path / "b.log.gz").write_bytes(gzip.compress(text.encode()))
    (tmp_path / "c.txt").write_bytes(text.encode("utf-16"))  # what PowerShell's `>` writes
    for name in ("b.log.gz", "c.txt"):
        got, _, _ = read(tmp_path / name)
        assert [key(m) for m in got] == [fkey(f) for f in SHORT], name


@pytest.mark.parametrize("line,want", [
    ("(1700000000.100000) can0 123#R", (0x123, False, False, True, 0, b"", False)),
    ("(1700000000.100000) can0 0CF00400#R3", (0x0CF00400, True, False, True, 3, b"", False)),
    ("  can0       123   [2]  remote request", (0x123, False, False, True, 2, b"", False)),
    ("(1700000000.1) can0 123##1" + "AB" * 64, (0x123, False, False, False, 64, b"\xab" * 64, True)),
    ("(1700000000.1) can0 18FEF100##0" + "11" * 12, (0x18FEF100, True, False, False, 12, b"\x11" * 12, True)),
    ("  can0  18FEF100  [64]  " + " ".join(["CD"] * 64), (0x18FEF100, True, False, False, 64, b"\xcd" * 64, True)),
    ("  can0  18FEF100  [08]  " + " ".join(["01"] * 8), (0x18FEF100, True, False, False, 8, b"\x01" * 8, True)),
    ("(1700000000.1) can0 20000040#0000000000000000", (0x40, False, True, False, 8, bytes(8), False)),
    ("  can0  20000004   [8]  00 04 00 00 00 00 00 00   ERRORFRAME",
     (0x04, False, True, False, 8, b"\0\4" + bytes(6), False)),
    ("  can0  RX - -  0CF00400   [8]  FF 7D 7D E0 15 FF F0 FF",
     (0x0CF00400, True, False, False, 8, bytes.fromhex("FF7D7DE015FFF0FF"), False)),
    ("  can0  123   [4]  31 32 33 34   '1234'", (0x123, False, False, False, 4, b"1234", False)),
    ("     7\t (000.020000)  vcan0  7DF   [8]  02 01 0C 00 00 00 00 00",
     (0x7DF, False, False, False, 8, bytes.fromhex("02010C0000000000"), False)),
    ("12: (1700000000.1) can0 0CF00400#1122334455667788_9",
     (0x0CF00400, True, False, False, 8, bytes.fromhex("1122334455667788"), False)),
    ("\t(1700000000.1) slcan0 0CF00400#\r\n", (0x0CF00400, True, False, False, 0, b"", False)),
])
def test_special_frames(line: str, want: tuple) -> None:
    got = candump.Parser().parse(line)
    assert got is not None, line
    m = got.msg
    assert (m.arbitration_id, m.is_extended_id, m.is_error_frame, m.is_remote_frame, m.dlc, bytes(m.data),
            m.is_fd) == want


@pytest.mark.parametrize("line,reason", [
    ("garbage", "not_a_frame"),
    ("(1700000000.1) can0 0CF00400#F", "bad_data"),
    ("(1700000000.1) can0 0CF00400#112233445566778899", "bad_length"),
    ("(1700000000.1) can0 FFF#11", "bad_id"),
    ("(1700000000.1) can0 7FFFFFFF#11", "bad_id"),
    ("(1700000000.1) can0 40000000#11", "bad_id"),
    ("(1700000000.1) can0 123###1122", "can_xl"),
    ("  can0  0CF00400   [8]  FF 7D 7D", "bad_data"),
    ("  can0  0CF00400   [9]  FF 7D 7D E0 15 FF F0 FF 00", "bad_length"),
    ("  can0  0CF00400  [13]  " + "00 " * 13, "bad_length"),
])
def test_lines_that_are_not_frames_are_counted_by_reason(line: str, reason: str) -> None:
    parser = candump.Parser()
    assert parser.parse(line) is None
    assert parser.counts == {reason: 1}


def test_td_and_tz_are_told_apart_even_for_one_periodic_frame(tmp_path: Path) -> None:
    eec1 = cl.periodic(0, 2 * cl.S, 20_000, cl.j1939_id(3, cl.EEC1, cl.ENGINE), lambda t: cl.eec1_data(700 + 100 * t))
    for form in ("td", "tz"):
        got, _, _ = read(cl.write_screen(tmp_path / f"{form}.txt", eec1, form))
        assert round(got[-1].timestamp - got[0].timestamp, 6) == round(eec1[-1].ts - eec1[0].ts, 6), form


# -- the driver and the agent ---------------------------------------------------------------------


@pytest.mark.parametrize("form", FORMS)
def test_driver_decodes_every_form_like_the_log(tmp_path: Path, form: str) -> None:
    # min_interval 0.05 s: no frame of an id falls exactly on a sampling boundary, where the
    # same spacing counted from 0 and from 1.7e9 s (float) could round either way.
    sampling = {"min_interval_s": 0.05, "max_interval_s": 0}
    want, ref = replay(cl.write_log(tmp_path / "ref.log", SHORT), **sampling)
    got, driver = replay(write_form(tmp_path, form, SHORT, "capture.txt"), **sampling)
    st = driver.snapshot()
    for k in ("frames", "non_j1939_frames", "error_frames", "bus_off", "unknown_frames", "vin", "active_dtcs",
              "transport"):
        assert st[k] == ref.snapshot()[k], k
    assert st["bad_timestamp"] == 0 and st["skipped_lines"] == {}
    if form == "none":  # timed as read: everything is "now", so a sampler sends less
        assert {v[:2] for v in values_of(got)} <= {v[:2] for v in values_of(want)}
    else:
        assert values_of(got) == values_of(want)
    alarms = [r for r in got.snapshot() if r.stream == "alarm"]
    assert [r.data for r in alarms] == [r.data for r in want.snapshot() if r.stream == "alarm"]
    if form in ABSOLUTE:
        assert st["capture_clock"] == "capture"
        assert [r.ts_ms for r in got.snapshot()] == [r.ts_ms for r in want.snapshot()]
    else:
        assert st["capture_clock"] == "agent"
        assert all(r.ts_ms is None and r.meta["mono_ns"] <= time.monotonic_ns() for r in got.snapshot()), \
            "relative times cannot date a reading: the agent's clock does"


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout)


def can_config(tmp_path: Path, capture: Path, **extra: Any) -> Path:
    section = {"interface": "replay", "replay": str(capture), "replay_speed": 0, "min_interval_s": 0,
               "max_interval_s": 0, **extra}
    return agent_config(tmp_path, free_port(), can=section, time={"trust_system_clock": "always"})


def dry_run(cfg: Path) -> tuple[subprocess.CompletedProcess[str], list[dict[str, Any]]]:
    r = run_cli("run", "--config", str(cfg), "--dry-run")
    lines = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    payloads = [p for m in lines for p in (m["payload"] if isinstance(m["payload"], list) else [m["payload"]])]
    return r, payloads


@pytest.mark.parametrize("form", ["l", "ta", "td", "tz", "tA", "none"])
def test_dry_run_and_check_config_for_every_form(tmp_path: Path, form: str) -> None:
    capture = write_form(tmp_path, form, SHORT, "capture.txt")
    cfg = can_config(tmp_path, capture)
    check = run_cli("check-config", str(cfg))
    assert check.returncode == 0 and "OK" in check.stdout, check.stderr
    before = time.time()
    r, payloads = dry_run(cfg)
    after = time.time()
    assert r.returncode == 0, r.stderr
    alarms = [p for p in payloads if p["stream"] == "alarm"]
    assert sorted((a["spn"], a["fmi"], a["state"]) for a in alarms) == sorted(
        (spn, fmi, state) for _t, state, spn, fmi, _oc, _sa in cl.truck().alarms if _t < cl.at(14_000_000))
    speeds = [v["value"] for p in payloads if p["stream"] == "can" for v in p["values"] if v["name"] == "engine_speed"]
    assert len(speeds) >= (1 if form == "none" else 6) and all(600 <= v <= 1800 for v in speeds), speeds
    stamps = [p["ts"] for p in payloads]
    if form in ABSOLUTE:
        assert all(s.startswith("2023-11-14T22:13:") for s in stamps), stamps[:3]
    else:
        lo = time.strftime("%Y-%m-%dT%H:%M", time.gmtime(before - 60))
        hi = time.strftime("%Y-%m-%dT%H:%M:%S.999Z", time.gmtime(after))
        assert all(lo <= s <= hi for s in stamps), ("dated by the agent's clock", stamps[:3])


def test_dry_run_of_the_issues_ta_text_saved_as_txt(tmp_path: Path) -> None:
    capture = tmp_path / "candump-2024-05-01.txt"
    capture.write_text(ISSUE_TA)
    r, payloads = dry_run(can_config(tmp_path, capture))
    assert r.returncode == 0, r.stderr
    assert [v["value"] for p in payloads for v in p["values"] if v["name"] == "engine_speed"] == [700.0]


# -- captures that cannot be read -----------------------------------------------------------------

UNREADABLE = {
    "missing.log": None,
    "a-directory.log": "dir",
    "empty.txt": b"",
    "notes.txt": b"Trip CQ-HN, 2024-05-01\nengine ok\n\nno frames here\n",
    "binary.txt": bytes(range(256)) * 8,
    "garbled.log": b"(1700000000.1) can0 ZZZ#11\n(1700000000.2) can0 0CF00400#F\nhello\n",
    "capture.asc": b"this is not\nan ASC file\n",
    "capture.xyz": b"\x00\x01\x02",
}


@pytest.mark.parametrize("name", list(UNREADABLE))
def test_unreadable_captures_are_refused_naming_the_file(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    content = UNREADABLE[name]
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    if content is not None:
        with pytest.raises(CaptureError, match=str(path)):
            open_capture(path)
        assert CanBus.check(CanConfig(interface="replay", replay=path))[0].startswith(f"[can] replay: {path}: ")
    cfg = can_config(tmp_path, path)
    check = run_cli("check-config", str(cfg))
    assert check.returncode == 1 and str(path) in check.stderr, check
    r, _ = dry_run(cfg)
    assert r.returncode != 0 and str(path) in r.stderr, r


def test_refusal_says_which_forms_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("engine ok\n")
    (problem,) = CanBus.check(CanConfig(interface="replay", replay=path))
    assert "no frame recognised" in problem and "'engine ok'" in problem
    for form in ("-l", "-ta", "-td", "-tz", "[8]", ".asc", ".blf", ".trc"):
        assert form in problem, form


# -- properties -----------------------------------------------------------------------------------


def assert_valid(m: Any) -> None:
    """What a CAN frame can be: 11- or 29-bit id, classic 0-8 bytes, FD up to 64, remote empty."""
    assert isinstance(m.arbitration_id, int) and \
        0 <= m.arbitration_id <= (0x1FFFFFFF if m.is_extended_id or m.is_error_frame else 0x7FF)
    assert not (m.is_error_frame and m.is_extended_id)
    assert len(m.data) in candump.FD_LENGTHS and (m.is_fd or len(m.data) <= 8)
    assert 0 <= m.dlc <= (64 if m.is_fd else 8)
    assert not m.is_remote_frame or (len(m.data) == 0 and not m.is_fd)
    assert isinstance(m.timestamp, float)


GOOD = ([cl.log_line(f) for f in SHORT[:40]]
        + [cl.screen_line(f, s) for f, s in zip(SHORT[:40], cl.screen_stamps(SHORT[:40], "tz"))])
text_lines = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=120)
frame_like = st.builds(lambda a, b, c: f"{a} {b} {c}",
                       st.sampled_from(["(1.5)", "(1e20)", "(nan)", "(-5)", "", "12", "(x)"]),
                       st.sampled_from(["can0", "", "#", "[8]"]),
                       st.text(alphabet="0123456789ABCDEFabcdefRr#_.[] x", max_size=40))


def mutate(line: str, edits: list[tuple[int, int, str]]) -> str:
    for op, pos, ch in edits:
        pos = pos % (len(line) + 1)
        line = (line[:pos] + ch + line[pos + 1:] if op == 0  # replace
                else line[:pos] + ch + line[pos:] if op == 1  # insert
                else line[:pos] + line[pos + 1:])  # delete
    return line


@settings(max_examples=400, deadline=None)
@given(st.one_of(text_lines, frame_like))
@example("(1e20) can0 0CF00400#FF7D7DE015FFF0FF")
@example(" (000.000000)  can0  18FCF200   [8]  E1 FF")
@example("  can0  20000040   [8]  00 00 00 00 00 00 00 00 ##" + "0" * 200)
def test_no_line_makes_the_parser_raise_or_yield_an_impossible_frame(line: str) -> None:
    parser = candump.Parser()
    got = parser.parse(line)
    if got is None:
        assert sum(parser.counts.values()) <= 1
    else:
        assert_valid(got.msg)
        assert got.clock in ("number", "local", "none")


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(GOOD),
       st.lists(st.tuples(st.integers(0, 2), st.integers(0, 200), st.characters(max_codepoint=0x7F)),
                min_size=1, max_size=6))
def test_mutated_frames_never_raise_and_are_never_impossible(line: str, edits: list[tuple[int, int, str]]) -> None:
    got = candump.Parser().parse(mutate(line, edits))
    if got is not None:
        assert_valid(got.msg)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.booleans(),
                          st.text(alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)),
                                  max_size=80)),
                max_size=30),
       st.sampled_from(["l", "ta", "tz"]))
def test_a_good_frame_next_to_a_bad_line_is_never_lost(tmp_path: Path, noise: list[tuple[bool, str]],
                                                       form: str) -> None:
    frames = SHORT[:20]
    good = [cl.log_line(f) for f in frames] if form == "l" else \
        [cl.screen_line(f, s) for f, s in zip(frames, cl.screen_stamps(frames, form))]
    lines, k = [], 0
    for before, junk in noise:
        if before and k < len(good):
            lines.append(good[k])
            k += 1
        lines.append(junk)
    lines += good[k:]
    path = tmp_path / "noisy.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    got, _, _ = read(path)
    for m in got:
        assert_valid(m)
    want = iter(fkey(f) for f in frames)
    need = next(want, None)
    for m in got:  # the good frames, in order, among whatever the junk parsed to
        if need is not None and key(m) == need:
            need = next(want, None)
    assert need is None, "a good frame was lost next to a bad line"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=2000), st.sampled_from(["x.txt", "x.log", "x", "x.asc", "x.csv", "x.log.gz"]))
def test_arbitrary_bytes_are_refused_or_read_never_raise(tmp_path: Path, blob: bytes, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(blob)
    try:
        got, times, _ = read(path)
    except CaptureError as e:
        assert str(path) in str(e)
        return
    for m in got:
        assert_valid(m)
        assert math.isfinite(m.timestamp) and m.timestamp >= 0
