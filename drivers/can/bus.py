"""The truck's CAN bus (SAE J1939) through python-can: sampled signals, DTCs, VIN, ignition.

Listen-only: nothing is ever sent unless ``[can] requests`` asks for it. The frame loop is the
agent's hottest path (up to ~4,000 frames/s on a loaded 500 kbit/s bus, on a slow ARM board),
so per frame it does one dict lookup by identifier and one time comparison; a parameter is
decoded only when its sampler is due (see drivers/can/j1939/sampler.py). On SocketCAN the
kernel drops the PGNs nothing decodes before they reach the process, and the bus is read in
batches ~20 times a second (drivers/can/live.py); a paced replay is read the same way
(drivers/can/replay.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import can

from agent.model.reading import Reading
from drivers.base import Emit, ReconnectingDriver
from drivers.can import candump, handlers, live
from drivers.can.capture import Capture, CaptureError, frames, open_capture
from drivers.can.config import CanConfig
from drivers.can.handlers import IGNORED, Decoded, Ignored, Special
from drivers.can.j1939 import dbc, spn
from drivers.can.j1939.diag import DM1_PGN, VIN_PGN, DtcTracker, parse_dm1, parse_vin
from drivers.can.j1939.ids import REQUEST_PGN, make_id, parse_id
from drivers.can.j1939.tp import TransportReassembler
from drivers.can.replay import Pacer

log = logging.getLogger(__name__)

CAN_ERR_BUSOFF = 0x40
CAN_ERR_RESTARTED = 0x100
# Bus time between two looks at the bus as a whole (ignition, requests, timeouts, flushing).
ALIVE_EVERY_S = 0.25
# After a bus-off with no frame since, the interface is reopened this long later (the kernel's
# own restart, `RestartSec=` in systemd-networkd, normally brings it back first).
BUS_OFF_REOPEN_S = 5.0
# Sampled values are gathered into one `can` reading per this much bus time.
GROUP_S = 1.0
# A live reading is dated at most this long before it is emitted (its frame's age).
MAX_AGE_S = 60.0
REQUESTS = {"vin": VIN_PGN, "hours": spn.HOURS, "fuel": spn.LFC1}


class CanBus(ReconnectingDriver):
    kind = "can"
    open_errors = (can.CanError, OSError, ValueError)
    lost_errors = (can.CanError, OSError)

    def __init__(self, config: CanConfig, emit: Emit, *, bus_factory: Any = None):
        # First: the reconnecting loop's counters (opens, open_failures) are kept in here too.
        # frames, unknown_frames, non_j1939_frames: what reached the process (on SocketCAN the
        # kernel keeps the PGNs nothing decodes out: see drivers/can/live.py).
        self.counters = {
            "frames": 0, "decoded_values": 0, "unknown_frames": 0, "non_j1939_frames": 0,
            "error_frames": 0, "bus_off": 0, "opens": 0, "open_failures": 0, "requests_sent": 0,
            "bad_timestamp": 0, "time_jumps": 0, "pacing_capped": 0,
        }
        super().__init__(config, emit)
        self.finite = config.interface == "replay"
        self._bus_factory = bus_factory or self._open_bus
        self._dbc = dbc.load(config.dbc)  # check() has reported a bad file before we get here
        self._pgns = live.kernel_pgns(config, self._dbc)
        self.kernel = live.Kernel(None, None, len(self._pgns), None)
        self._rx_dropped = 0
        self._pacer: Pacer | None = None
        self._handlers: dict[int, Any] = {}
        self._by_group: dict[tuple[int, int, int], Any] = {}
        self.tp = TransportReassembler()
        self.dtcs = DtcTracker()
        self.vin: str | None = None
        self.times = candump.Timeline("live", self.counters)
        self.capture: Capture | None = None
        self._parser = candump.Parser()
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
        super().run(stop)

    def snapshot(self) -> dict[str, Any]:
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
            "kernel": {**self.kernel.snapshot(), "rx_dropped": self._rx_dropped + self.kernel.dropped},
        }

    def health(self, status: dict[str, Any]) -> dict[str, Any]:
        return {"vehicle": {
            "vin": status.get("vin"),
            "active_dtcs": len(status.get("active_dtcs", [])),
            "can_connected": status.get("connected"),
            "can_errors": {"error_frames": status.get("error_frames", 0), "bus_off": status.get("bus_off", 0)},
        }}

    # The reconnecting loop's counters (drivers/base.py), kept with the bus's own.
    opens = property(lambda self: self.counters["opens"],
                     lambda self, n: self.counters.__setitem__("opens", n))
    open_failures = property(lambda self: self.counters["open_failures"],
                             lambda self, n: self.counters.__setitem__("open_failures", n))

    # -- the live bus (the loop: drivers/base.py ReconnectingDriver) ----------------------------

    def _open(self) -> can.BusABC:
        bus = self._bus_factory()
        self.kernel = live.Kernel.attach(bus, self._pgns)
        return bus

    def _read(self, bus: can.BusABC, stop: threading.Event) -> None:
        self._loop(self._live(bus, stop), stop, bus)

    def _closed(self, bus: can.BusABC) -> None:
        self._flush()
        self.kernel.poll()
        self._rx_dropped += self.kernel.dropped
        self.kernel.dropped = 0

    def _close(self, bus: can.BusABC) -> None:
        bus.shutdown()

    def _open_failed(self, error: BaseException) -> str:
        return f"cannot open {self.config.interface} {self.config.channel}: {error}"

    def _lost(self, error: BaseException) -> str:
        return f"{self.config.channel} lost: {error}"

    def _log_problem(self, message: str, error: BaseException | None, loud: bool) -> None:
        (log.warning if loud else log.debug)("CAN: %s", message)

    # -- frame sources ----------------------------------------------------------------------

    def _open_bus(self) -> can.BusABC:
        return can.Bus(interface=self.config.interface, channel=self.config.channel, receive_own_messages=False)

    def _live(self, bus: can.BusABC, stop: threading.Event) -> Iterator[can.Message | None]:
        return self.times.frames(live.batches(bus, stop, self.kernel))

    def _replay(self, stop: threading.Event) -> Iterator[can.Message | None]:
        """The capture's frames with believable times, paced by ``replay_speed`` in batches
        (drivers/can/replay.py)."""
        try:
            capture = self.capture = open_capture(self.config.replay)
        except CaptureError as e:
            self._problem(str(e), e, loud=True)
            raise
        self.times = candump.Timeline(capture.clock, self.counters)
        self.connected = True
        timed = self.times.frames(frames(capture, self._parser))
        if self.config.replay_speed <= 0:
            return timed
        self._pacer = Pacer(self.config.replay_speed, stop, self.counters)
        return self._pacer.frames(timed)

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
                if h.__class__ is Decoded:
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
            h = self._by_group[key] = handlers.handler(self.config, self._dbc, pgn, jid.sa, jid.da)
        if msg.arbitration_id >= 0x800:  # lower ids may also be 11-bit or error frames: never cached
            self._handlers[msg.arbitration_id] = h
        return h

    def _sample(self, h: Decoded, msg: can.Message, ts: float) -> None:
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

    def _special(self, h: Special, msg: can.Message, ts: float) -> None:
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
            if h.__class__ is not Ignored:
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
            self._problem(f"{self.config.channel}: bus-off")
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
        """No frame for live.RECV_TIMEOUT_S: flush, and notice a silent bus (ignition off)."""
        self._flush()
        silent = time.monotonic() - self._last_frame_mono
        bus_off = self._bus_off_at
        if bus_off is not None and time.monotonic() - bus_off >= BUS_OFF_REOPEN_S and silent >= BUS_OFF_REOPEN_S:
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
                self._problem(f"request for {name} not sent: {e}", e, loud=False)

    # -- readings ----------------------------------------------------------------------------

    def _emit(self, stream: str, ts: float, data: dict[str, Any], urgent: bool = False) -> None:
        if self._live_clock:
            # python-can stamps live frames with the system clock, which a Pi without RTC
            # cannot trust: carry the monotonic instant and let the agent's clock stamp it.
            age = min(max(0.0, time.time() - ts), MAX_AGE_S)
            meta = {"mono_ns": time.monotonic_ns() - int(age * 1e9)}
            self.emit(Reading(stream, None, data, urgent=urgent, meta=meta))
        elif self.times.trusted:
            self.emit(Reading(stream, int(ts * 1000), data, urgent=urgent, meta={"replay": True}))
        else:
            # Times counted from the capture's start (-tz, -td, none, an uptime) or without a
            # zone (-tA) date nothing: the agent's clock dates the reading as it is replayed.
            speed = self.config.replay_speed
            late = None if self._pacer is None else self._pacer.late_s(ts)
            if late is None:
                late = max(0.0, (self._last_frame_ts or ts) - ts) / speed if speed > 0 else 0.0
            age = min(late, MAX_AGE_S)
            meta = {"mono_ns": time.monotonic_ns() - int(age * 1e9), "replay": True}
            self.emit(Reading(stream, None, data, urgent=urgent, meta=meta))
