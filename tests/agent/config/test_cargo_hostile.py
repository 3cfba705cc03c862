"""Hostile input for the cargo drivers: e-seal reader lines and 1-Wire temperature files.

Whatever a reader sends or a sysfs file holds (line noise, a checksummed frame full of
nonsense, a vendor module that returns junk, a FIFO where a file should be, a probe that
vanishes), the driver keeps running, never publishes a value outside its field's physical range
(agent/model/ranges.py) or a malformed one, counts what it refused under a named status counter, and
never loses the good line or file that comes next. Nothing from a seal line moves the clock.
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import select
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from functools import reduce
from operator import xor
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from agent.model.clock import TimeKeeper
from agent.model.ranges import FIELDS
from drivers.seal import serial as seal_serial
from drivers.seal.config import SerialSealConfig
from drivers.seal.eseal import BadLine, EsealMessage
from drivers.seal.eseal.generic import GenericProtocol, sentence
from drivers.seal.serial import SerialSeal
from drivers.temperature.ds18b20 import ERRORS
from gpiofake import wait_for
from support import Collector as _Collector
from support import Running
from w1fake import SENSOR, ds18b20, sensor, w1_slave

REASONS = ("bad_checksum", "garbage", "unknown_state", "bad_field")
SEAL_ID = re.compile(r"[A-Za-z0-9._:-]{1,32}")
WIRE_STATES = {"SEALED": "sealed", "OPEN": "opened", "TAMPER": "tampered", "CUT": "tampered", "HB": None}


class Collector(_Collector):
    def pairs(self) -> list[tuple[str | None, str]]:
        return [(r.data["seal_id"], r.data["event"]) for r in self.snapshot()]


def checksummed(body: bytes) -> bytes:
    """``$body*hh`` with the right checksum, whatever the body holds."""
    return b"$" + body + b"*%02X" % reduce(xor, body, 0)


def assert_well_formed(msg: object) -> None:
    """What a parser may hand on: a seal id by pattern, a known state, a battery in range."""
    assert isinstance(msg, EsealMessage), msg
    assert isinstance(msg.seal_id, str) and SEAL_ID.fullmatch(msg.seal_id), msg
    assert msg.state in ("sealed", "opened", "tampered", None), msg
    b = msg.battery_pct
    assert b is None or (type(b) is int and b in FIELDS["battery_pct"]), msg


def parse_or_reason(line: bytes) -> EsealMessage | str | None:
    """The message, None (blank), or the BadLine reason; any other exception fails the test."""
    try:
        msg = GenericProtocol().parse(line)
    except BadLine as e:
        assert e.reason in REASONS, e
        assert str(e), "a BadLine says why"
        return e.reason
    if msg is not None:
        assert_well_formed(msg)
    return msg


# -- the e-seal line parser ---------------------------------------------------------------------

ids = st.from_regex(r"[A-Za-z0-9._:-]{1,32}", fullmatch=True)
wire_states = st.sampled_from([*WIRE_STATES, "open", "Cut", "hb"])
batteries = st.none() | st.integers(0, 100)
# Field values a damaged or malicious reader might put in a checksummed frame.
field_text = st.one_of(
    st.sampled_from(["SEAL", "SEALED", "OPEN", "HB", "cut", "0", "100", "101", "-1", "007", "0100", "1e2",
                     "+5", " 5", "5 ", "5.0", "0x10", "1_0", "NaN", "inf", "", "ES-1", "٣", "ＳＥＡＬＥＤ",
                     "99991231235959", "1e20", "-5", "0001-01-01T00:00:00Z", "A" * 33, "a b", "ES\x001"]),
    st.text(max_size=40),
    ids,
)


@settings(max_examples=400)
@given(st.binary(max_size=300) | st.text(max_size=120).map(lambda s: s.encode("utf-8", "surrogatepass")))
def test_eseal_parser_any_bytes_gives_a_message_a_blank_or_a_reason(line: bytes) -> None:
    parse_or_reason(line)


@settings(max_examples=400)
@given(st.sampled_from(["SEAL", "seal", "SEAL ", "GPRMC", ""]), st.lists(field_text, max_size=7),
       st.sampled_from([b"", b"\r", b"  ", b"\x00"]), st.binary(max_size=6))
def test_eseal_parser_checksummed_nonsense_is_refused_or_well_formed(
    head: str, fields: list[str], tail: bytes, noise: bytes
) -> None:
    """A reader that frames and checksums whatever it has: the checksum proves nothing."""
    body = ",".join([head, *fields]).encode("utf-8", "surrogatepass")
    got = parse_or_reason(noise + checksummed(body) + tail)
    if isinstance(got, EsealMessage):  # only a message the documented grammar allows
        frame = body.rpartition(b"$")[2].decode("ascii").split(",")  # anything before a `$` is noise
        assert frame[0] == "SEAL" and len(frame) == 4
        _, seal_id, state, battery = frame
        assert got == EsealMessage(seal_id, WIRE_STATES[state.upper()],  # type: ignore[arg-type]
                                   int(battery) if battery else None)
        assert battery == "" or re.fullmatch(r"[0-9]{1,3}", battery)


@st.composite
def mutated_lines(draw: st.DrawFn) -> bytes:
    """A valid line, damaged a few times, maybe re-checksummed after the damage."""
    line = bytearray(sentence(draw(ids), draw(wire_states), draw(batteries)).rstrip(b"\r\n"))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "duplicate"]))
        i = draw(st.integers(0, max(0, len(line) - 1)))
        if op == "flip" and line:
            line[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and line:
            line[i] = draw(st.integers(0, 255))
        elif op == "insert":
            line[i:i] = draw(st.binary(min_size=1, max_size=4) | st.sampled_from([b",", b"$", b"*", b"*00", b",,"]))
        elif op == "delete" and line:
            del line[i:i + draw(st.integers(1, 3))]
        elif op == "truncate":
            del line[i:]
        elif op == "duplicate":
            line[i:i] = line[i:]
    if draw(st.booleans()):  # a reader that checksums what it garbled
        start, star = line.rfind(b"$"), line.rfind(b"*")
        if 0 <= start < star:
            line = bytearray(line[:start] + checksummed(bytes(line[start + 1:star])))
    return bytes(line)


@settings(max_examples=600)
@given(mutated_lines())
def test_eseal_parser_mutated_lines_are_refused_or_well_formed(line: bytes) -> None:
    parse_or_reason(line)


# -- the serial driver: whatever the protocol hands it --------------------------------------------

def serial_seal(port: str, got: Collector, battery_low_pct: int = 20) -> SerialSeal:
    config = SerialSealConfig(name="lock", driver="serial", port=port, battery_low_pct=battery_low_pct,
                              reopen_min_s=0.05, reopen_max_s=0.2)
    return SerialSeal(config, got)


def write_consumed(driver: SerialSeal, data: bytes) -> None:
    """Write to the driver's loop:// port and wait until it has read it (one read per write)."""
    port = driver.port
    assert port is not None
    port.write(data)
    wait_for(lambda: port.in_waiting == 0, "the driver to read what was written")


def assert_published_well_formed(got: Collector) -> None:
    for r in got.snapshot():
        assert r.stream == "seal" and r.ts_ms is None and r.urgent
        assert r.data["event"] in ("sealed", "opened", "tampered", "battery_low")
        assert isinstance(r.data["seal_id"], str) and SEAL_ID.fullmatch(r.data["seal_id"])
        b = r.data["battery_pct"]
        assert b is None or (type(b) is int and b in FIELDS["battery_pct"])


class Scripted:
    """A vendor protocol module with bugs: what it returns for each line is scripted."""

    terminator = b"\n"

    def __init__(self, script: dict[bytes, object]):
        self.script = script

    def parse(self, line: bytes) -> object:
        out = self.script[line.strip()]  # an unscripted line: KeyError, a bug in the module
        if isinstance(out, BaseException):
            raise out
        return out


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("cannot even describe itself")


def test_the_reader_publishes_only_well_formed_messages_whatever_the_protocol_returns() -> None:
    script: dict[bytes, object] = {
        b"1": EsealMessage("ES-1", "sealed", 80),
        b"2": EsealMessage("ES-1", "opened", 250),  # battery beyond 100: the value goes, the news stays
        b"3": EsealMessage("ES-1", "opened", -3),
        b"4": EsealMessage("", "sealed", 50),
        b"5": EsealMessage("ES 1\n", "sealed", 50),
        b"6": EsealMessage("E" * 1000, "sealed", 50),
        b"7": EsealMessage(123, "sealed", 50),  # type: ignore[arg-type]
        b"8": EsealMessage("ES-1", "ajar", 50),  # type: ignore[arg-type]
        b"9": EsealMessage("ES-1", "tampered", True),  # type: ignore[arg-type]
        b"10": EsealMessage("ES-1", "tampered", "80"),  # type: ignore[arg-type]
        b"11": EsealMessage("ES-1", "tampered", float("nan")),  # type: ignore[arg-type]
        b"12": ("ES-1", "tampered", 80),
        b"13": RuntimeError("bug in the vendor module"),
        b"14": Unprintable(),
        b"15": BadLine("lines", "a reason that is another status key"),
        b"16": BadLine(None, "no reason at all"),  # type: ignore[arg-type]
        b"17": RecursionError("deep"),
        b"18": EsealMessage("ES-1", "tampered", 15),
    }
    got = Collector()
    driver = serial_seal("loop://", got)
    driver.protocol = Scripted(script)  # type: ignore[assignment]
    with Running(driver):
        wait_for(lambda: driver.port is not None, "port open")
        for key in script:
            write_consumed(driver, key + b"\n")
        write_consumed(driver, b"unscripted\n")
        wait_for(lambda: got.pairs()[-2:] == [("ES-1", "tampered"), ("ES-1", "battery_low")], "the last good line")
        time.sleep(0.05)
        st_ = driver.snapshot()
    assert got.pairs() == [("ES-1", "sealed"), ("ES-1", "opened"), ("ES-1", "tampered"), ("ES-1", "battery_low")]
    assert [r.data["battery_pct"] for r in got.readings] == [80, 80, 15, 15]  # 250 never published
    assert_published_well_formed(got)
    assert st_["lines"] == len(script) + 1 and st_["messages"] == 4  # 1, 2, 3 (its battery dropped), 18
    assert st_["out_of_range"] == {"battery_pct": 2}
    assert st_["bad_field"] == 7 and st_["unknown_state"] == 1  # 4-7, 9-11; 8
    assert st_["protocol_error"] == 5  # 12, 13, 14, 17, the unscripted line
    assert st_["garbage"] == 2  # 15, 16: reasons the driver does not know
    json.dumps(st_)  # status stays printable whatever the reasons were
    assert set(st_) >= {*REASONS, "protocol_error", "out_of_range", "too_many_seals"}


# -- the serial driver: a good line next to garbage -------------------------------------------

def test_noise_without_a_line_end_then_a_line_in_pieces_is_not_lost() -> None:
    """A reader powering up sends a burst of noise, then its first line trickles in at 9600 baud:
    the line is not thrown away with the noise when the two together pass the line limit."""
    got = Collector()
    driver = serial_seal("loop://", got)
    good = sentence("ES-1", "OPEN", 90)
    with Running(driver):
        wait_for(lambda: driver.port is not None, "port open")
        write_consumed(driver, b"\x00\xfe~" * 80)  # 240 bytes, no line end
        for piece in (good[:8], good[8:20], good[20:]):
            write_consumed(driver, piece)
        wait_for(lambda: got.pairs() == [("ES-1", "opened")], "the line after the noise")
        write_consumed(driver, b"#" * 5000)  # a long run without line ends is dropped and counted
        write_consumed(driver, b"\n" + sentence("ES-1", "SEALED", 90))
        wait_for(lambda: got.pairs() == [("ES-1", "opened"), ("ES-1", "sealed")], "the line after a long run")
        st_ = driver.snapshot()
    assert st_["garbage"] >= 1 and st_["messages"] == 2


def test_a_good_line_after_garbage_is_still_parsed() -> None:
    """End to end through the serial driver on loop://: garbage (a line of its own, or glued in
    front without a line end), then a good line, in arbitrary pieces: the good line counts."""
    got = Collector()
    driver = serial_seal("loop://", got, battery_low_pct=0)  # no battery_low events to account for
    proto = GenericProtocol()
    model: dict[str, dict[str, Any]] = {}

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(garbage=st.binary(max_size=400) | mutated_lines() | st.sampled_from([b"$", b"*", b"$SEAL,", b"\r"])
           | st.binary(min_size=200, max_size=300).map(lambda b: b.replace(b"\n", b"")),  # noise, no line end
           glued=st.booleans(), seal_id=st.sampled_from(["ES-1", "ES-2", "L7"]), state=wire_states,
           battery=batteries, cuts=st.lists(st.integers(0, 400), max_size=3),
           line_cuts=st.lists(st.integers(1, 40), max_size=3))
    def check(garbage: bytes, glued: bool, seal_id: str, state: str, battery: int | None, cuts: list[int],
              line_cuts: list[int]) -> None:
        if not glued:
            garbage += b"\n"
        # Garbage that happens to be a valid message on a line of its own is not garbage.
        for part in garbage.split(b"\n")[:-1]:
            try:
                assume(proto.parse(part) is None)
            except BadLine:
                pass
        data = garbage + sentence(seal_id, state, battery)
        before = driver.snapshot()["messages"]
        n = len(garbage)  # pieces as a slow line delivers them, some inside the good line
        bounds = sorted({0, len(data), *(c for c in cuts if c < n), *(n + c for c in line_cuts if n + c < len(data))})
        for a, b in zip(bounds, bounds[1:]):
            write_consumed(driver, data[a:b])
        wait_for(lambda: driver.snapshot()["messages"] == before + 1, "the good line")
        seal = model.setdefault(seal_id, {"state": None, "battery_pct": None, "battery_low": False})
        if WIRE_STATES[state.upper()] is not None:
            seal["state"] = WIRE_STATES[state.upper()]
        if battery is not None:
            seal["battery_pct"] = battery
        assert driver.snapshot()["seals"][seal_id] == seal

    with Running(driver):
        wait_for(lambda: driver.port is not None, "port open")
        check()
    assert_published_well_formed(got)


def test_a_flood_of_seal_ids_is_bounded_and_counted() -> None:
    """A reader (or noise that passes the checksum) naming ever new seals does not grow the
    agent's memory or its urgent stream without end; the seals it knows keep working."""
    limit = seal_serial.MAX_SEALS
    got = Collector()
    driver = serial_seal("loop://", got)
    with Running(driver):
        wait_for(lambda: driver.port is not None, "port open")
        write_consumed(driver, b"".join(sentence(f"S{i}", "SEALED", 90) for i in range(limit + 50)))
        write_consumed(driver, sentence("S0", "OPEN", 90))
        wait_for(lambda: got.pairs()[-1:] == [("S0", "opened")], "a known seal still reports")
        st_ = driver.snapshot()
    assert len(got.readings) == limit + 1 and len(st_["seals"]) == limit
    assert st_["too_many_seals"] == 50


def test_seal_lines_never_move_the_clock() -> None:
    """Times in a reader's line (its own clock, unset after a battery change) are not believed:
    a line with one is refused, and every event is stamped by the agent from arrival time."""
    t_ms = 1_795_000_000_000
    clock = TimeKeeper(trust_system_clock="never")
    mono0 = time.monotonic_ns()
    clock.observe_gps(t_ms, mono0)
    got = Collector()
    driver = serial_seal("loop://", got)
    driver.clock = clock
    with Running(driver):
        wait_for(lambda: driver.port is not None, "port open")
        before = time.monotonic_ns()
        for t in ("99991231235959", "00010101000000", "1e20", "-5", "2099-12-31T23:59:59Z", "4102444800"):
            write_consumed(driver, checksummed(f"SEAL,ES-1,OPEN,80,{t}".encode()) + b"\r\n")
            write_consumed(driver, checksummed(f"SEAL,ES-1,{t},OPEN,80".encode()) + b"\r\n")
        write_consumed(driver, sentence("ES-1", "OPEN", 80))
        wait_for(lambda: got.pairs() == [("ES-1", "opened")], "the good line")
        after = time.monotonic_ns()
        st_ = driver.snapshot()
    assert st_["bad_field"] == 12 and st_["messages"] == 1
    (r,) = got.readings
    assert r.ts_ms is None and before <= r.meta["mono_ns"] <= after  # the agent stamps it
    assert clock.stamp(mono0).ts_ms == t_ms and clock.gps_fixes == 1


# -- DS18B20 files --------------------------------------------------------------------------------

ALL_FF = "ff ff ff ff ff ff ff ff ff"
RESET_PAD = "50 05 4b 46 7f ff 0c 10 1c"


@pytest.mark.parametrize("files, want", [
    ({"w1_slave": w1_slave(4250, crc_ok=False)}, (None, "crc")),  # crc=.. NO
    ({"w1_slave": f"{ALL_FF} : crc=c9 NO\n{ALL_FF} t=-62\n"}, (None, "crc")),  # the classic wiring fault
    ({"w1_slave": f"{ALL_FF} : crc=ff YES\n{ALL_FF} t=-62\n"}, (None, "crc")),  # same, verdict garbled
    ({"w1_slave": w1_slave(-62, scratchpad="ff ff 4b 46 7f ff 0c 10 13")}, (-0.06, None)),  # really -0.0625 °C
    ({"w1_slave": w1_slave(85000, scratchpad=RESET_PAD)}, (None, "reset_value")),
    ({"temperature": "85000\n"}, (None, "reset_value")),
    ({"w1_slave": w1_slave(127937, scratchpad="ff 07 4b 46 7f ff 01 10 8c")}, (None, "garbage")),  # beyond the sensor
    ({"temperature": "127937\n"}, (None, "garbage")),
    ({"temperature": "-55001\n"}, (None, "garbage")),
    ({"temperature": "-55000\n"}, (-55.0, None)),
    ({"temperature": "125000\n"}, (125.0, None)),
    ({"w1_slave": ""}, (None, "garbage")),
    ({"temperature": ""}, (None, "garbage")),
    ({"w1_slave": b"\x00" * 64}, (None, "garbage")),
    ({"w1_slave": os.urandom(0) + bytes(range(256))}, (None, "garbage")),
    ({"temperature": "4_500\n"}, (None, "garbage")),  # Python's int() would take these
    ({"temperature": "+4500\n"}, (None, "garbage")),
    ({"temperature": "4500.5\n"}, (None, "garbage")),
    ({"temperature": "0x10\n"}, (None, "garbage")),
    ({"temperature": "9" * 5000}, (None, "garbage")),
    ({"w1_slave": w1_slave("2_3125")}, (None, "garbage")),
    ({"w1_slave": w1_slave("+23125")}, (None, "garbage")),
    ({"w1_slave": w1_slave("nan")}, (None, "garbage")),
    ({"w1_slave": "72 01 4b : crc=57 YES\n72 01 4b t=23125\n"}, (None, "garbage")),  # not 9 bytes
    ({"w1_slave": "zz 01 4b 46 7f ff 0e 10 57 : crc=57 YES\nzz 01 4b 46 7f ff 0e 10 57 t=23125\n"}, (None, "garbage")),
    ({"w1_slave": "72 01 4b 46 7f ff 0e 10 57 : crc=57 YES\n11 22 33 44 55 66 77 88 99 t=23125\n"}, (None, "garbage")),
    ({"w1_slave": "4500\n" * 10_000}, (None, "garbage")),
    ({"w1_slave": w1_slave(23125) + "x" * 1_000_000}, (None, "garbage")),  # no sysfs file is that long
])
def test_classic_bad_reads_are_specific_errors(tmp_path: Path, files: dict[str, str | bytes],
                                                 want: tuple[float | None, str | None]) -> None:
    sensor(tmp_path, files)
    driver = ds18b20(tmp_path, Collector())
    reading = driver.sample()
    assert (reading.data["c"], reading.data["error"]) == want
    st_ = driver.snapshot()
    if want[1] is not None:
        assert st_[want[1]] == 1 and st_["last_error"]
    json.dumps(st_)


def test_a_vanished_file_is_missing_and_the_other_file_is_used(tmp_path: Path) -> None:
    device = sensor(tmp_path, {"temperature": "4500\n"})
    (device / "w1_slave").symlink_to(device / "gone")  # dangling: the file vanished
    driver = ds18b20(tmp_path, Collector())
    assert driver.sample().data == {"sensor": "reefer", "c": 4.5, "error": None}
    (device / "temperature").unlink()
    assert driver.sample().data == {"sensor": "reefer", "c": None, "error": "missing"}
    assert driver.snapshot()["missing"] == 1


def in_child(fn: Callable[[], Any], timeout: float, *, user: int | None = None, memory_mb: int = 512) -> Any:
    """``fn()`` in a forked process (as ``user``, with ``memory_mb`` more address space than now):
    its JSON result, or "timeout"/"died" (a read that blocks or eats memory cannot hang or
    hurt the test run)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(r)
            vsz = int(Path("/proc/self/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
            limit = vsz + memory_mb * 2**20
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
            if user is not None:
                os.setgid(user)
                os.setuid(user)
            os.write(w, json.dumps(fn()).encode())
        finally:
            os._exit(0)
    os.close(w)
    try:
        ready, _, _ = select.select([r], [], [], timeout)
        if not ready:
            os.kill(pid, signal.SIGKILL)
            return "timeout"
        out = b""
        while chunk := os.read(r, 65536):
            out += chunk
        return json.loads(out) if out else "died"
    finally:
        os.close(r)
        os.waitpid(pid, 0)


def shared_root() -> Path:
    """A sysfs root another user can traverse (pytest's tmp_path is private to root)."""
    root = Path(tempfile.mkdtemp(prefix="w1-"))
    root.chmod(0o755)
    return root


def test_permission_denied_is_an_io_error() -> None:
    root = shared_root()
    try:
        device = sensor(root, {"w1_slave": w1_slave(4250)})
        device.chmod(0o755)
        (device / "w1_slave").chmod(0o000)
        driver = ds18b20(root, Collector())
        user = 65534 if os.geteuid() == 0 else None  # root reads anything: read as nobody

        def sample() -> list[Any]:
            r = driver.sample()
            return [r.data["c"], r.data["error"], driver.snapshot()["last_error"]]

        c, error, detail = in_child(sample, 10, user=user)
        assert (c, error) == (None, "io_error") and "Permission denied" in detail
    finally:
        shutil.rmtree(root)


@pytest.mark.parametrize("make", ["fifo", "dev_zero", "dev_urandom", "directory"])
def test_a_file_that_is_not_a_file_is_an_io_error_without_blocking(tmp_path: Path, make: str) -> None:
    """A FIFO would block a plain read for ever; /dev/zero would be read until memory runs out."""
    device = sensor(tmp_path, {})
    target = device / "w1_slave"
    if make == "fifo":
        os.mkfifo(target)
    elif make == "directory":
        target.mkdir()
    else:
        target.symlink_to("/dev/zero" if make == "dev_zero" else "/dev/urandom")
    driver = ds18b20(tmp_path, Collector())

    def sample() -> list[Any]:
        started = time.monotonic()
        r = driver.sample()
        return [r.data["c"], r.data["error"], time.monotonic() - started]

    got = in_child(sample, 10)
    assert got not in ("timeout", "died"), f"sample() {got}"
    c, error, took = got
    assert (c, error) == (None, "io_error") and took < 1


@st.composite
def w1_files(draw: st.DrawFn) -> dict[str, bytes] | None:
    """What a sensor's directory may hold: real-looking files, damaged ones, anything, nothing."""
    kind = draw(st.sampled_from(["w1_slave", "temperature", "binary", "gone"]))
    if kind == "gone":
        return None
    if kind == "binary":
        return {draw(st.sampled_from(["w1_slave", "temperature"])): draw(st.binary(max_size=200))}
    milli = draw(st.integers(-200_000, 200_000) | st.sampled_from([85_000, -62, 127_937, 0, 2**70]))
    if kind == "temperature":
        return {"temperature": draw(st.sampled_from(["{}\n", "{}", " {} ", "{}0", "t={}"])).format(milli).encode()}
    pad = " ".join(f"{b:02x}" for b in draw(st.binary(min_size=9, max_size=9) | st.sampled_from(
        [b"\xff" * 9, b"\x00" * 9, bytes.fromhex("72014b467fff0e1057")])))
    text = f"{pad} : crc={pad[-2:]} {draw(st.sampled_from(['YES', 'NO', 'yes', '']))}\n{pad} t={milli}\n"
    return {"w1_slave": text.encode()}


def expected(files: dict[str, bytes]) -> float | None:
    """What an honest reader makes of a sensor's files: the value, or None (some error)."""
    content = files.get("w1_slave", files.get("temperature", b""))
    if not content.isascii():
        return None
    if "w1_slave" in files:
        lines = content.decode().splitlines()
        if len(lines) != 2 or " : crc=" not in lines[0]:
            return None
        pad, _, verdict = lines[0].partition(" : crc=")
        tokens = pad.split()
        if len(tokens) != 9 or not all(re.fullmatch(r"[0-9a-fA-F]{2}", t) for t in tokens):
            return None
        v = verdict.split()
        if len(v) != 2 or not re.fullmatch(r"[0-9a-fA-F]{2}", v[0]) or v[1] != "YES":
            return None
        if {t.lower() for t in tokens} in ({"00"}, {"ff"}):
            return None
        second = lines[1].split()
        if second[:9] != tokens or len(second) != 10 or not second[9].startswith("t="):
            return None
        text = second[9][2:]
    else:
        text = content.decode().strip()
    if not re.fullmatch(r"-?[0-9]{1,9}", text):
        return None
    milli = int(text)
    if milli == 85_000 or not -55_000 <= milli <= 125_000:
        return None
    return round(milli / 1000, 2)


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=w1_files())
def test_any_sensor_files_give_the_value_they_hold_or_a_reason(tmp_path: Path, files: dict[str, bytes] | None) -> None:
    if files is None:
        (tmp_path / SENSOR).mkdir(exist_ok=True)
        for f in (tmp_path / SENSOR).iterdir():
            f.unlink()
    else:
        sensor(tmp_path, files)
    driver = ds18b20(tmp_path, Collector())
    reading = driver.sample()
    c, error = reading.data["c"], reading.data["error"]
    assert (c is None) == (error is not None) and (error is None or error in ERRORS)
    assert c is None or (type(c) is float and c in FIELDS["temperature_c"] and -55 <= c <= 125)
    assert reading.ts_ms is None and isinstance(reading.meta["mono_ns"], int)  # never a time of its own
    if files is not None:
        assert c == expected(files), files  # nothing refused that was good, nothing taken that was not
    st_ = driver.snapshot()
    assert st_["reads"] == 1 and st_["ok"] + sum(st_[k] for k in ERRORS) == 1


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sequence=st.lists(w1_files(), min_size=1, max_size=5))
def test_any_sequence_of_files_never_stops_the_driver_thread(tmp_path: Path,
                                                             sequence: list[dict[str, bytes] | None]) -> None:
    root = Path(tempfile.mkdtemp(dir=tmp_path))
    got = Collector()
    driver = ds18b20(root, got, interval_s=0.01)
    with Running(driver) as running:
        for files in sequence:
            if files is None:
                for f in (root / SENSOR).glob("*"):
                    f.unlink()
            else:
                sensor(root, files)
            n = len(got.readings)
            wait_for(lambda n=n: len(got.readings) >= n + 2, "readings every interval")
            assert running.thread.is_alive()
        sensor(root, {"w1_slave": w1_slave(4250)})
        wait_for(lambda: got.snapshot()[-1].data["c"] == 4.25, "the good reading after the bad ones")
    for r in got.snapshot():
        c = r.data["c"]
        assert c is None or (c in FIELDS["temperature_c"] and math.isfinite(c))
        assert r.ts_ms is None
    st_ = driver.snapshot()
    assert st_["reads"] == st_["ok"] + sum(st_[k] for k in ERRORS)


