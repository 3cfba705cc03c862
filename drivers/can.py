"""The truck's CAN bus (SAE J1939) through python-can: sampled signals, DTCs, VIN, ignition.

Listen-only: nothing is ever sent unless ``[can] requests`` asks for it. The frame loop is the
agent's hottest path (up to ~4,000 frames/s on a loaded 500 kbit/s bus, on a slow ARM board),
so per frame it does one dict lookup by identifier and one time comparison; a parameter is
decoded only when its sampler is due (see drivers/j1939/sampler.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import can

from agent.backoff import backoff_delay
from agent.config import CanConfig
from agent.reading import Reading
from drivers.base import Driver, Emit
from drivers.j1939 import dbc, spn
from drivers.j1939.diag import DM1_PGN, VIN_PGN, DtcTracker, parse_dm1, parse_vin
from drivers.j1939.ids import REQUEST_PGN, TP_CM_PGN, TP_DT_PGN, make_id, parse_id
from drivers.j1939.sampler import Sampled
from drivers.j1939.tp import TransportReassembler

log = logging.getLogger(__name__)

CAN_ERR_FLAG = 0x20000000
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


def _capture(path: Path) -> Iterator[can.Message]:
    """Frames of a capture file, with the capture's own times.

    candump logs are read here: python-can's reader drops the class of error frames (a
    bus-off becomes an ordinary frame with id 0x40). Everything else goes through
    can.LogReader (.asc with absolute times, .blf, .csv, .trc…)."""
    if path.suffix != ".log":
        kwargs = {"relative_timestamp": False} if path.suffix == ".asc" else {}
        yield from can.LogReader(str(path), **kwargs)
        return
    with open(path, encoding="ascii", errors="replace") as f:
        for line in f:
            msg = _candump_line(line)
            if msg is not None:
                yield msg


def _candump_line(line: str) -> can.Message | None:
    """``(1700000000.123456) can0 0CF00400#FF7D…`` → a Message; None for what is not a frame."""
    try:
        stamp, _channel, frame = line.split()[:3]
        ident, _, data = frame.partition("#")
        can_id = int(ident, 16)
        ts = float(stamp.strip("()"))
        if data[:1].lower() == "r":
            return can.Message(timestamp=ts, arbitration_id=can_id & 0x1FFFFFFF,
                               is_extended_id=len(ident) > 3, is_remote_frame=True)
        payload = bytes.fromhex(data)
    except ValueError:
        return None
    if can_id & CAN_ERR_FLAG:
        return can.Message(timestamp=ts, arbitration_id=can_id & 0x1FFFFFFF, is_error_frame=True,
                           data=payload, is_extended_id=False)
    return can.Message(timestamp=ts, arbitration_id=can_id, is_extended_id=len(ident) > 3, data=payload)


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
        }
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
        if config.interface == "replay" and config.replay is not None and not config.replay.exists():
            problems.append(f"[can] replay: no such file {config.replay}")
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
            "transport": dict(vars(self.tp.counters)),
        }

    # -- frame sources ----------------------------------------------------------------------

    def _open_bus(self) -> can.BusABC:
        return can.Bus(interface=self.config.interface, channel=self.config.channel, receive_own_messages=False)

    def _live(self, bus: can.BusABC, stop: threading.Event) -> Iterator[can.Message | None]:
        recv = bus.recv
        while not stop.is_set():
            yield recv(RECV_TIMEOUT_S)

    def _replay(self, stop: threading.Event) -> Iterator[can.Message | None]:
        speed = self.config.replay_speed
        self.connected = True
        start: tuple[float, float] | None = None
        for msg in _capture(self.config.replay):
            if stop.is_set():
                return
            if speed > 0:
                if start is None:
                    start = (time.monotonic(), msg.timestamp)
                due = start[0] + (msg.timestamp - start[1]) / speed
                if stop.wait(max(0.0, due - time.monotonic())):
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
            mono = time.monotonic_ns() - int(max(0.0, time.time() - ts) * 1e9)
            self.emit(Reading(stream, None, data, urgent=urgent, meta={"mono_ns": mono}))
        else:
            self.emit(Reading(stream, int(ts * 1000), data, urgent=urgent, meta={"replay": True}))
