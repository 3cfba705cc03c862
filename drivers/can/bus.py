"""The truck's CAN bus (SAE J1939) through python-can: sampled signals, DTCs, VIN, ignition.

Listen-only: nothing is ever sent unless ``[can] requests`` asks for it. The frame loop is the
agent's hottest path (up to ~4,000 frames/s on a loaded 500 kbit/s bus, on a slow ARM board),
so per frame it does one dict lookup by identifier and one time comparison; a parameter is
decoded only when its sampler is due (see drivers/can/j1939/sampler.py).
"""

from __future__ import annotations

import gzip
import io
import logging
import re
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import can
from can.io.player import MESSAGE_READERS

from agent.model.backoff import backoff_delay
from agent.config import CanConfig
from agent.model.reading import Reading
from drivers.can import candump
from drivers.base import Driver, Emit
from drivers.can.j1939 import dbc, spn
from drivers.can.j1939.diag import DM1_PGN, VIN_PGN, DtcTracker, parse_dm1, parse_vin
from drivers.can.j1939.ids import REQUEST_PGN, TP_CM_PGN, TP_DT_PGN, make_id, parse_id
from drivers.can.j1939.sampler import Sampled
from drivers.can.j1939.tp import TransportReassembler

log = logging.getLogger(__name__)

CAN_ERR_BUSOFF = 0x40
CAN_ERR_RESTARTED = 0x100
RECV_TIMEOUT_S = 0.5
# Bus time between two looks at the bus as a whole (ignition, requests, timeouts, flushing).
ALIVE_EVERY_S = 0.25
# After a bus-off with no frame since, the interface is reopened this long later (the kernel's
# own restart, `RestartSec=` in systemd-networkd, normally brings it back first).
BUS_OFF_REOPEN_S = 5.0
# Sampled values are gathered into one `can` reading per this much bus time.
GROUP_S = 1.0
# Replay pacing never waits longer than this for one frame, whatever gap the capture has.
MAX_PACE_S = 10.0
# A live reading is dated at most this long before it is emitted (its frame's age).
MAX_AGE_S = 60.0
REQUESTS = {"vin": VIN_PGN, "hours": spn.HOURS, "fuel": spn.LFC1}


@dataclass(slots=True)
class _Param:
    name: str
    spn: int | None
    unit: str
    sampled: Sampled


class _Decoded:
    """Frames of one identifier that carry parameters we sample."""

    __slots__ = ("sa", "decode", "params", "due")

    def __init__(self, sa: int, decode: Any, params: list[_Param]):
        self.sa = sa
        self.decode = decode
        self.params = params
        self.due = float("-inf")


class _Special:
    """Frames handled every time (transport protocol, DM1, VIN, requests)."""

    __slots__ = ("kind", "pgn", "sa", "da", "due")

    def __init__(self, kind: str, pgn: int, sa: int, da: int):
        self.kind, self.pgn, self.sa, self.da = kind, pgn, sa, da
        self.due = float("-inf")


class _Ignored:
    """Frames of PGNs nobody asked for: counted, nothing else."""

    __slots__ = ()


IGNORED = _Ignored()


class CaptureError(ValueError):
    """A replay file that cannot be read: the message names the file and the accepted forms."""


SNIFF_BYTES = 64 * 1024
SNIFF_FRAMES = 64
ACCEPTED = f"accepted: {candump.FORMS}; or by python-can, by suffix: " + " ".join(
    s for s in sorted(MESSAGE_READERS) if s != ".log")


class Capture(NamedTuple):
    path: Path
    candump: bool
    """candump text (read here, whatever the file's name); else python-can's reader by suffix."""
    clock: str
    """The Timeline mode for its times (drivers/can/candump.py)."""


def open_capture(path: Path) -> Capture:
    """What the file is, from its content: CaptureError when no frame can be read from it."""
    try:
        if not path.exists():
            raise CaptureError(f"{path}: no such file")
        if path.is_dir():
            raise CaptureError(f"{path}: is a directory, not a capture file")
        if not path.is_file():
            raise CaptureError(f"{path}: not a regular file")
        with _open_bytes(path) as f:
            head = f.read(SNIFF_BYTES)
    except (OSError, EOFError, zlib.error) as e:  # EOFError, zlib.error: a damaged .gz
        raise CaptureError(f"{path}: cannot read it: {getattr(e, 'strerror', None) or e}") from e
    if not head:
        raise CaptureError(f"{path}: the file is empty")
    text = _text(head)
    lines = re.split(r"\r\n|\r|\n", text)  # universal newlines, as the replay reads them
    lines = lines[:-1] if len(head) == SNIFF_BYTES else lines
    parser = candump.Parser()
    found = [p for p in map(parser.parse, lines) if p is not None][:SNIFF_FRAMES]
    if found:
        return Capture(path, True, candump.clock_of(found))
    suffix = _suffix(path)
    if suffix in MESSAGE_READERS and suffix != ".log":
        _first_frame(path)
        return Capture(path, False, "auto")
    if "\x00" in text:
        raise CaptureError(f"{path}: unknown format (binary, suffix {suffix or 'none'!r}); {ACCEPTED}")
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    raise CaptureError(f"{path}: no frame recognised in its first lines (first: {first[:60]!r}); {ACCEPTED}")


def _open_bytes(path: Path) -> Any:
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gz else open(path, "rb")


def _text(head: bytes) -> str:
    """The head as text: UTF-8, or UTF-16 with its BOM (as Windows tools save it)."""
    if head[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return head.decode("utf-16", errors="replace")
    return head.decode("utf-8", errors="replace").lstrip("\ufeff")


def _suffix(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    return suffixes[-2] if suffixes[-1:] == [".gz"] and len(suffixes) > 1 else (suffixes[-1] if suffixes else "")


def _reader(path: Path) -> Any:
    kwargs = {"relative_timestamp": False} if _suffix(path) == ".asc" else {}
    return can.LogReader(str(path), **kwargs)


def _first_frame(path: Path) -> None:
    reader = None
    try:
        reader = _reader(path)
        if next(iter(reader), None) is None:
            raise CaptureError(f"{path}: python-can read no frame from it; {ACCEPTED}")
    except CaptureError:
        raise
    except Exception as e:  # noqa: BLE001 - python-can's readers raise many types for a bad file
        raise CaptureError(f"{path}: python-can cannot read it ({type(e).__name__}: {e}); {ACCEPTED}") from e
    finally:
        if reader is not None:
            try:
                reader.stop()
            except Exception:  # noqa: BLE001 - closing a half-read file
                pass


def _frames(capture: Capture, parser: candump.Parser) -> Iterator[can.Message]:
    """Every frame of the capture, with the times written in it (judged by the Timeline)."""
    if not capture.candump:
        reader = None
        try:
            reader = _reader(capture.path)
            yield from reader
        except Exception as e:  # noqa: BLE001 - a reader failing mid-file: the replay cannot go on
            raise CaptureError(f"{capture.path}: python-can stopped reading it: {type(e).__name__}: {e}") from e
        finally:
            if reader is not None:
                reader.stop()
        return
    with _open_bytes(capture.path) as raw:
        bom = raw.read(2)
        raw.seek(0)
        encoding = "utf-16" if bom in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig"
        with io.TextIOWrapper(raw, encoding=encoding, errors="replace") as f:
            try:
                for line in f:
                    p = parser.parse(line)
                    if p is not None:
                        yield p.msg
            except (OSError, EOFError, zlib.error) as e:  # the frames before it were replayed
                raise CaptureError(f"{capture.path}: reading stopped: {e}") from e


class CanBus(Driver):
    kind = "can"

    def __init__(self, config: CanConfig, emit: Emit, *, bus_factory: Any = None):
        super().__init__(config, emit)
        self.finite = config.interface == "replay"
        self._bus_factory = bus_factory or self._open_bus
        self._dbc = dbc.load(config.dbc)  # check() has reported a bad file before we get here
        self._handlers: dict[int, Any] = {}
        self._by_group: dict[tuple[int, int, int], Any] = {}
        self.tp = TransportReassembler()
        self.dtcs = DtcTracker()
        self.vin: str | None = None
        self.counters = {
            "frames": 0, "decoded_values": 0, "unknown_frames": 0, "non_j1939_frames": 0,
            "error_frames": 0, "bus_off": 0, "opens": 0, "open_failures": 0, "requests_sent": 0,
            "bad_timestamp": 0, "time_jumps": 0, "pacing_capped": 0,
        }
        self.times = candump.Timeline("live", self.counters)
        self.capture: Capture | None = None
        self._parser = candump.Parser()
        self.connected = False
        self.last_error: str | None = None
        self.ignition: bool | None = None
        self._group: list[dict[str, Any]] = []
        self._group_ts: float | None = None
        self._last_frame_ts: float | None = None
        self._last_frame_mono = 0.0
        self._next_request = 0.0
        self._live_clock = not self.finite
        self._bus_off_at: float | None = None

    # -- driver interface -------------------------------------------------------------------

    @classmethod
    def check(cls, config: CanConfig) -> list[str]:
        problems = []
        try:
            known_dbc = {sig.name for m in dbc.load(config.dbc).values() for sig in m.signals}
        except Exception as e:  # noqa: BLE001 - cantools raises many types for a bad file
            return [f"[can] dbc: cannot use {', '.join(map(str, config.dbc))}: {e}"]
        known = set(spn.BY_NAME) | known_dbc
        for name in config.signals:
            if name not in known:
                problems.append(
                    f"[can.signals.{name}]: unknown signal; built-in: {', '.join(spn.BY_NAME)}"
                    + (f"; from the DBC files: {', '.join(sorted(known_dbc))}" if known_dbc else "")
                )
        if config.interface == "replay" and config.replay is not None:
            try:
                open_capture(config.replay)
            except CaptureError as e:
                problems.append(f"[can] replay: {e}")
        return problems

    def run(self, stop: threading.Event) -> None:
        if self.finite:
            try:
                self._loop(self._replay(stop), stop)
            finally:
                self._flush()
                self.connected = False
            return
        failures = 0
        while not stop.is_set():
            try:
                bus = self._bus_factory()
            except (can.CanError, OSError, ValueError) as e:
                failures += 1
                self.counters["open_failures"] += 1
                self._problem(f"cannot open {self.config.interface} {self.config.channel}: {e}", failures == 1)
                stop.wait(backoff_delay(failures, self.config.reopen_min_s, self.config.reopen_max_s))
                continue
            failures = 0
            self.counters["opens"] += 1
            self.connected = True
            try:
                self._loop(self._live(bus, stop), stop, bus)
            except (can.CanError, OSError) as e:
                self._problem(f"{self.config.channel} lost: {e}", True)
                stop.wait(self.config.reopen_min_s)
            finally:
                self.connected = False
                self._flush()
                try:
                    bus.shutdown()
                except Exception:  # noqa: BLE001 - a vanished interface may fail to close; it is gone
                    pass

    def status(self) -> dict[str, Any]:
        return {
            "source": f"{self.config.interface}:{self.config.replay or self.config.channel}",
            "connected": self.connected,
            "last_error": self.last_error,
            "vin": self.vin,
            "ignition": self.ignition,
            "active_dtcs": [
                {"spn": d.spn, "fmi": d.fmi, "oc": d.oc, "source_address": sa} for sa, d in self.dtcs.active_with_sa()
            ],
            **self.counters,
            # Whether readings carry the capture's times or the agent's clock dates them.
            "capture_clock": None if self.capture is None else ("capture" if self.times.trusted else "agent"),
            "skipped_lines": dict(self._parser.counts),
            "transport": dict(vars(self.tp.counters)),
        }

    # -- frame sources ----------------------------------------------------------------------

    def _open_bus(self) -> can.BusABC:
        return can.Bus(interface=self.config.interface, channel=self.config.channel, receive_own_messages=False)

    def _live(self, bus: can.BusABC, stop: threading.Event) -> Iterator[can.Message | None]:
        recv = bus.recv

        def received() -> Iterator[can.Message | None]:
            while not stop.is_set():
                yield recv(RECV_TIMEOUT_S)

        return self.times.frames(received())

    def _replay(self, stop: threading.Event) -> Iterator[can.Message | None]:
        """The capture's frames with believable times, paced by ``replay_speed``: a wait is
        never negative and never longer than MAX_PACE_S (a capture's gap or a jump)."""
        try:
            capture = self.capture = open_capture(self.config.replay)
        except CaptureError as e:
            self._problem(str(e), True)
            raise
        self.times = candump.Timeline(capture.clock, self.counters)
        speed = self.config.replay_speed
        self.connected = True
        start: tuple[float, float] | None = None
        for msg in self.times.frames(_frames(capture, self._parser)):
            if stop.is_set():
                return
            if speed > 0 and msg is not None:
                ts = msg.timestamp
                now = time.monotonic()
                if start is None or ts < start[1]:
                    start = (now, ts)
                delay = start[0] + (ts - start[1]) / speed - now
                if delay > MAX_PACE_S:
                    self.counters["pacing_capped"] += 1
                    delay = MAX_PACE_S
                    start = (now + delay, ts)
                if delay > 0 and stop.wait(delay):
                    return
            yield msg

    # -- the frame loop ---------------------------------------------------------------------

    def _loop(self, frames: Iterator[can.Message | None], stop: threading.Event, bus: can.BusABC | None = None) -> None:
        get = self._handlers.get
        counters = self.counters
        seen = float("-inf")  # bus time of the last _alive(): every frame is a sign of life
        for msg in frames:
            if msg is None:
                self._idle(bus)
                continue
            counters["frames"] += 1
            ts = msg.timestamp
            if ts - seen > ALIVE_EVERY_S or ts < seen:
                if ts < seen - candump.BACK_S:
                    self._rewound()
                seen = ts
                self._alive(ts, bus)
            h = get(msg.arbitration_id)
            if h is None:
                h = self._classify(msg)
                if h is None:
                    continue
            if h is IGNORED:
                counters["unknown_frames"] += 1
            elif ts >= h.due:
                if h.__class__ is _Decoded:
                    self._sample(h, msg, ts)
                else:
                    self._special(h, msg, ts)

    def _classify(self, msg: can.Message) -> Any:
        """First frame of an identifier: what to do with it from now on (cached)."""
        if msg.is_error_frame:
            self._error_frame(msg)
            return None
        if not msg.is_extended_id or msg.is_remote_frame:
            self.counters["non_j1939_frames"] += 1
            return None
        jid = parse_id(msg.arbitration_id)
        pgn = jid.pgn
        # One handler per PGN, source and destination: the same group sent at another priority
        # must not get samplers of its own (and send every value twice).
        key = (pgn, jid.sa, jid.da)
        h = self._by_group.get(key)
        if h is None:
            h = self._by_group[key] = self._handler(pgn, jid.sa, jid.da)
        if msg.arbitration_id >= 0x800:  # lower ids may also be 11-bit or error frames: never cached
            self._handlers[msg.arbitration_id] = h
        return h

    def _handler(self, pgn: int, sa: int, da: int) -> Any:
        if pgn in (TP_CM_PGN, TP_DT_PGN, DM1_PGN, VIN_PGN):
            return _Special("tp" if pgn in (TP_CM_PGN, TP_DT_PGN) else "msg", pgn, sa, da)
        if (m := self._dbc.get(pgn)) is not None:
            wanted = [i for i, s in enumerate(m.signals) if self._enabled(s.name)]
            if not wanted:
                return IGNORED
            decode = m.decode if len(wanted) == len(m.signals) else (
                lambda data, idx=tuple(wanted): [v for i, v in enumerate(m.decode(data)) if i in idx])
            params = [self._param(m.signals[i].name, m.signals[i].spn, m.signals[i].unit, m.signals[i].deadband)
                      for i in wanted]
            return _Decoded(sa, decode, params)
        signals = [s for s in spn.BY_PGN.get(pgn, ()) if self._enabled(s.name)]
        if not signals:
            return IGNORED
        return _Decoded(sa, lambda data, ss=tuple(signals): [s.decode(data) for s in ss],
                        [self._param(s.name, s.spn, s.unit, s.deadband) for s in signals])

    def _enabled(self, name: str) -> bool:
        c = self.config.signals.get(name)
        return c is None or c.enabled

    def _param(self, name: str, spn_: int | None, unit: str, deadband: float) -> _Param:
        c = self.config.signals.get(name)
        pick = lambda v, d: d if v is None else v  # noqa: E731
        return _Param(name, spn_, unit, Sampled(
            min_interval_s=pick(c and c.min_interval_s, self.config.min_interval_s),
            max_interval_s=pick(c and c.max_interval_s, self.config.max_interval_s),
            deadband=pick(c and c.deadband, deadband),
        ))

    def _sample(self, h: _Decoded, msg: can.Message, ts: float) -> None:
        values = h.decode(msg.data)
        due = float("inf")
        for p, v in zip(h.params, values):
            if ts >= p.sampled.next_check and p.sampled.offer(ts, v):
                self._add_value(ts, {"name": p.name, "spn": p.spn, "value": v, "unit": p.unit, "sa": h.sa})
            due = min(due, p.sampled.next_check)
        h.due = due

    def _add_value(self, ts: float, value: dict[str, Any]) -> None:
        if self._group_ts is not None and (ts - self._group_ts >= GROUP_S or ts < self._group_ts):
            self._flush()  # a reading holds one second of bus time, stamped with its start
        if self._group_ts is None:
            self._group_ts = ts
        self._group.append(value)
        self.counters["decoded_values"] += 1

    def _flush(self) -> None:
        if self._group:
            self._emit("can", self._group_ts or 0.0, {"values": self._group})
        self._group, self._group_ts = [], None

    def _special(self, h: _Special, msg: can.Message, ts: float) -> None:
        if h.kind == "tp":
            done = self.tp.feed(ts, h.pgn, h.sa, h.da, bytes(msg.data))
            if done is not None:
                pgn, sa, _da, payload = done
                self._message(ts, pgn, sa, payload)
        else:
            self._message(ts, h.pgn, h.sa, bytes(msg.data))

    def _message(self, ts: float, pgn: int, sa: int, payload: bytes) -> None:
        """A whole parameter group (single frame or reassembled): DM1 or VIN."""
        if pgn == DM1_PGN:
            parsed = parse_dm1(payload)
            if parsed is None:
                return
            for e in self.dtcs.update(sa, *parsed):
                self._emit("alarm", ts, {
                    "kind": "dtc", "state": e.state, "spn": e.spn, "fmi": e.fmi, "oc": e.oc,
                    "source_address": e.source_address, "lamps": e.lamps,
                }, urgent=True)
        elif pgn == VIN_PGN:
            vin = parse_vin(payload)
            if vin and vin != self.vin:
                log.info("VIN %s (from source address %d)", vin, sa)
                self.vin = vin

    # -- bus state ---------------------------------------------------------------------------

    def _rewound(self) -> None:
        """Bus time went back (a capture restarted, the clock stepped; the Timeline confirmed
        it): what waits for a later time would wait forever."""
        for h in self._by_group.values():
            if h.__class__ is not _Ignored:
                h.due = float("-inf")
                for p in getattr(h, "params", ()):
                    p.sampled.next_check = float("-inf")
        self.tp.expire(float("inf"))
        self._last_frame_ts = None

    def _error_frame(self, msg: can.Message) -> None:
        self.counters["error_frames"] += 1
        if msg.arbitration_id & CAN_ERR_BUSOFF:
            self.counters["bus_off"] += 1
            self._bus_off_at = time.monotonic()
            self._problem(f"{self.config.channel}: bus-off", True)
        elif msg.arbitration_id & CAN_ERR_RESTARTED:
            self._bus_off_at = None
            self.last_error = None

    def _alive(self, ts: float, bus: can.BusABC | None) -> None:
        """Called at most ~4 times a second of bus time: ignition, requests, TP timeouts."""
        last = self._last_frame_ts
        if self.config.ignition and self.ignition and last is not None and ts - last >= self.config.ignition_silence_s:
            self._set_ignition(False, last)  # a replayed capture: the bus fell silent in between
        self._last_frame_ts = ts
        self._last_frame_mono = time.monotonic()
        self._bus_off_at = None  # frames flow: whatever bus-off there was is over
        if self._group_ts is not None and ts - self._group_ts >= GROUP_S:
            self._flush()
        if self.config.ignition and self.ignition is not True:
            self._set_ignition(True, ts)
        self.tp.expire(ts)
        if bus is not None and self.config.requests and time.monotonic() >= self._next_request:
            self._send_requests(bus)

    def _idle(self, bus: can.BusABC | None) -> None:
        """No frame for RECV_TIMEOUT_S: flush, and notice a silent bus (ignition off)."""
        self._flush()
        silent = time.monotonic() - self._last_frame_mono
        if self._bus_off_at is not None and time.monotonic() - self._bus_off_at >= BUS_OFF_REOPEN_S and silent >= BUS_OFF_REOPEN_S:
            self._bus_off_at = None
            raise can.CanOperationError("bus-off and silent since: reopening the interface")
        if self.config.ignition and self.ignition and silent >= self.config.ignition_silence_s:
            ts = (self._last_frame_ts or 0.0) + silent
            self._set_ignition(False, ts)
        if self._last_frame_ts is not None:
            self.tp.expire(self._last_frame_ts + silent)

    def _set_ignition(self, on: bool, ts: float) -> None:
        self.ignition = on
        self._emit("ignition", ts, {"on": on, "source": "can"})

    def _send_requests(self, bus: can.BusABC) -> None:
        self._next_request = time.monotonic() + self.config.request_interval_s
        for name in self.config.requests:
            pgn = REQUESTS[name]
            msg = can.Message(
                arbitration_id=make_id(6, REQUEST_PGN, self.config.source_address),
                data=pgn.to_bytes(3, "little"), is_extended_id=True,
            )
            try:
                bus.send(msg, timeout=0.1)
                self.counters["requests_sent"] += 1
            except can.CanError as e:
                self._problem(f"request for {name} not sent: {e}", False)

    def _problem(self, message: str, loud: bool) -> None:
        self.last_error = message
        (log.warning if loud else log.debug)("CAN: %s", message)

    # -- readings ----------------------------------------------------------------------------

    def _emit(self, stream: str, ts: float, data: dict[str, Any], urgent: bool = False) -> None:
        if self._live_clock:
            # python-can stamps live frames with the system clock, which a Pi without RTC
            # cannot trust: carry the monotonic instant and let the agent's clock stamp it.
            age = min(max(0.0, time.time() - ts), MAX_AGE_S)
            self.emit(Reading(stream, None, data, urgent=urgent, meta={"mono_ns": time.monotonic_ns() - int(age * 1e9)}))
        elif self.times.trusted:
            self.emit(Reading(stream, int(ts * 1000), data, urgent=urgent, meta={"replay": True}))
        else:
            # Times counted from the capture's start (-tz, -td, none, an uptime) or without a
            # zone (-tA) date nothing: the agent's clock dates the reading as it is replayed.
            speed = self.config.replay_speed
            age = min(max(0.0, (self._last_frame_ts or ts) - ts) / speed, MAX_AGE_S) if speed > 0 else 0.0
            meta = {"mono_ns": time.monotonic_ns() - int(age * 1e9), "replay": True}
            self.emit(Reading(stream, None, data, urgent=urgent, meta=meta))
