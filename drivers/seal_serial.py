"""E-seals and electronic locks through a reader on a serial line (RS-232/RS-485).

The reader's line protocol (drivers/eseal/) turns lines into messages; this driver turns
messages into events: each seal's state when first heard and every change of it, and
``battery_low`` once per discharge. Heartbeats and a silent reader produce nothing: a reader
may say nothing for hours. Events carry the monotonic time their line arrived, and the agent
stamps them with its trusted clock.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import serial

from agent.backoff import backoff_delay
from agent.cargo_config import SerialSealConfig
from agent.reading import Reading
from drivers.base import Driver, Emit
from drivers.eseal import BadLine, EsealMessage, UnknownProtocol, protocol_class

log = logging.getLogger(__name__)

READ_TIMEOUT_S = 0.5
# Longer than any message: a lost terminator or line noise, dropped and counted as garbage.
MAX_LINE = 256
# A low battery is news again only after it has been back this far above the threshold: a
# cold battery sags and recovers around it, which must not be a stream of urgent events.
BATTERY_REARM_PCT = 5
BAD_REASONS = ("bad_checksum", "garbage", "unknown_state", "bad_field")


@dataclass(slots=True)
class _Seal:
    state: str | None = None
    battery_pct: int | None = None
    battery_low: bool = False


class SerialSeal(Driver):
    kind = "seal"

    def __init__(self, config: SerialSealConfig, emit: Emit):
        super().__init__(config, emit)
        self.protocol = protocol_class(config.protocol)()
        self.port: serial.SerialBase | None = None
        """The open port (for a protocol that polls its reader; tests write to ``loop://``)."""
        self.connected = False
        self.opens = 0
        self.open_failures = 0
        self.last_error: str | None = None
        self.lines = 0
        self.messages = 0
        self.heartbeats = 0
        self.events = 0
        self.bad = dict.fromkeys(BAD_REASONS, 0)
        self.last_bad: str | None = None
        self.seals: dict[str, _Seal] = {}
        self._heard_mono: float | None = None

    @classmethod
    def check(cls, config: SerialSealConfig) -> list[str]:
        try:
            protocol_class(config.protocol)
        except (UnknownProtocol, ImportError, AttributeError) as e:
            return [f"[seals ({config.name})] protocol: {e}"]
        return []

    def status(self) -> dict[str, Any]:
        heard = self._heard_mono
        return {
            "port": self.config.port,
            "protocol": self.config.protocol,
            "connected": self.connected,
            "opens": self.opens,
            "open_failures": self.open_failures,
            "last_error": self.last_error,
            "lines": self.lines,
            "messages": self.messages,
            "heartbeats": self.heartbeats,
            "events": self.events,
            **self.bad,
            "last_bad_line": self.last_bad,
            "silent_s": None if heard is None else round(time.monotonic() - heard, 1),
            "seals": {k: {"state": s.state, "battery_pct": s.battery_pct, "battery_low": s.battery_low}
                      for k, s in dict(self.seals).items()},
        }

    def run(self, stop: threading.Event) -> None:
        c = self.config
        failures = 0
        while not stop.is_set():
            try:
                port = serial.serial_for_url(c.port, baudrate=c.baudrate, timeout=READ_TIMEOUT_S)
            except (serial.SerialException, OSError, ValueError) as e:
                self.open_failures += 1
                failures += 1
                self._lost(f"cannot open {c.port}: {e}", loud=failures == 1)
                stop.wait(backoff_delay(failures, c.reopen_min_s, c.reopen_max_s))
                continue
            failures = 0
            self.opens += 1
            self.port, self.connected = port, True
            log.info("seal %s: reader on %s open", c.name, c.port)
            try:
                self._read(port, stop)
            except (serial.SerialException, OSError) as e:
                self._lost(f"{c.port} lost: {e}", loud=True)
                stop.wait(c.reopen_min_s)
            finally:
                self.port, self.connected = None, False
                try:
                    port.close()
                except Exception:  # noqa: BLE001 - closing a vanished device may fail; it is gone
                    pass

    def _lost(self, message: str, loud: bool) -> None:
        self.last_error = message
        (log.warning if loud else log.debug)("seal %s: %s", self.config.name, message)

    def _read(self, port: serial.SerialBase, stop: threading.Event) -> None:
        term = self.protocol.terminator
        buf = b""
        while not stop.is_set():
            chunk = port.read(max(1, port.in_waiting))
            if not chunk:
                continue
            buf += chunk
            *lines, buf = buf.split(term)
            mono = time.monotonic_ns()
            for line in lines:
                self._line(line, mono)
            if len(buf) > MAX_LINE:
                self._bad("garbage", f"no line end in {MAX_LINE} bytes")
                buf = b""

    def _line(self, line: bytes, mono_ns: int) -> None:
        self.lines += 1
        try:
            msg = self.protocol.parse(line)
        except BadLine as e:
            self._bad(e.reason, str(e))
            return
        except Exception as e:  # noqa: BLE001 - a protocol module's bug must not stop the reader
            log.warning("seal %s: %s failed on %r", self.config.name, self.config.protocol, line, exc_info=True)
            self._bad("garbage", f"{type(e).__name__}: {e}")
            return
        if msg is not None:
            self.messages += 1
            self._heard_mono = time.monotonic()
            self._message(msg, mono_ns)

    def _bad(self, reason: str, detail: str) -> None:
        self.bad[reason] = self.bad.get(reason, 0) + 1
        self.last_bad = detail
        log.debug("seal %s: bad line: %s", self.config.name, detail)

    def _message(self, msg: EsealMessage, mono_ns: int) -> None:
        seal = self.seals.setdefault(msg.seal_id, _Seal())
        if msg.battery_pct is not None:
            seal.battery_pct = msg.battery_pct
        if msg.state is None:
            self.heartbeats += 1
        elif msg.state != seal.state:
            seal.state = msg.state
            self._event(msg.state, msg.seal_id, seal.battery_pct, mono_ns)
        if seal.battery_pct is None:
            return
        low = self.config.battery_low_pct
        if not seal.battery_low and seal.battery_pct < low:
            seal.battery_low = True
            self._event("battery_low", msg.seal_id, seal.battery_pct, mono_ns)
        elif seal.battery_low and seal.battery_pct >= min(100, low + BATTERY_REARM_PCT):
            seal.battery_low = False

    def _event(self, event: str, seal_id: str, battery_pct: int | None, mono_ns: int) -> None:
        self.events += 1
        log.info("seal %s (%s): %s, battery %s%%", self.config.name, seal_id, event, battery_pct)
        data = {"seal": self.config.name, "event": event, "seal_id": seal_id,
                "battery_pct": battery_pct, "source": "serial"}
        self.emit(Reading("seal", None, data, urgent=True, meta={"mono_ns": mono_ns}))
