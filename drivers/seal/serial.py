"""E-seals and electronic locks through a reader on a serial line (RS-232/RS-485).

The reader's line protocol (drivers/seal/eseal/) turns lines into messages; this driver turns
messages into events: each seal's state when first heard and every change of it, and
``battery_low`` once per discharge. Heartbeats and a silent reader produce nothing: a reader
may say nothing for hours. Events carry the monotonic time their line arrived, and the agent
stamps them with its trusted clock: nothing a reader sends can set or move a time.

Whatever arrives on the wire, and whatever a protocol module makes of it, one bad line never
stops the reader or costs the good line after it: a line is refused and counted under its
reason, a message from any protocol is checked before it becomes news (a malformed seal id or
state is refused; a battery value outside agent/model/ranges.py ``battery_pct`` is dropped, counted,
and the state change kept), and a reader naming ever new seals is capped at ``MAX_SEALS``.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import serial

from agent.model.ranges import RangeCheck
from agent.model.reading import Reading
from drivers.base import Emit, ReconnectingDriver
from drivers.devices import serial_port
from drivers.seal.config import SerialSealConfig
from drivers.seal.eseal import SEAL_ID, SEAL_STATES, BadLine, EsealMessage, UnknownProtocol, protocol_class

log = logging.getLogger(__name__)

READ_TIMEOUT_S = 0.5
# Longer than any message: a lost terminator or line noise. Bytes older than this without a line
# end are dropped (counted once per run as garbage); the last MAX_LINE are kept, so a line that
# follows the noise without a line end between them (a reader powering up) is still whole.
MAX_LINE = 256
# A low battery is news again only after it has been back this far above the threshold: a
# cold battery sags and recovers around it, which must not be a stream of urgent events.
BATTERY_REARM_PCT = 5
BAD_REASONS = ("bad_checksum", "garbage", "unknown_state", "bad_field")
# A protocol module that raised something other than BadLine, or returned something that is not
# an EsealMessage: a bug in the module, counted apart from damaged lines.
PROTOCOL_ERROR = "protocol_error"
# Seals one reader reports (a lorry has a few doors and containers). Beyond it, a seal never heard
# before is counted in ``too_many_seals`` and ignored: line noise that passes the checksum, or a
# reader gone mad, cannot fill memory or the urgent stream; the seals already known keep working.
MAX_SEALS = 64


@dataclass(slots=True)
class _Seal:
    state: str | None = None
    battery_pct: int | None = None
    battery_low: bool = False


class SerialSeal(ReconnectingDriver):
    kind = "seal"
    open_errors = (serial.SerialException, OSError, ValueError)
    lost_errors = (serial.SerialException, OSError)

    def __init__(self, config: SerialSealConfig, emit: Emit):
        super().__init__(config, emit)
        self.protocol = protocol_class(config.protocol)()
        self.port: serial.SerialBase | None = None
        """The open port (for a protocol that polls its reader; tests write to ``loop://``)."""
        self.lines = 0
        self.messages = 0
        self.heartbeats = 0
        self.events = 0
        self.bad = dict.fromkeys((*BAD_REASONS, PROTOCOL_ERROR), 0)
        self.last_bad: str | None = None
        self.ranges = RangeCheck()
        """Values dropped as physically impossible (a battery of 250 %), per field."""
        self.too_many_seals = 0
        self.seals: dict[str, _Seal] = {}
        self._heard_mono: float | None = None

    @classmethod
    def check(cls, config: SerialSealConfig) -> list[str]:
        try:
            protocol_class(config.protocol)
        except (UnknownProtocol, ImportError, AttributeError) as e:
            return [f"[seals ({config.name})] protocol: {e}"]
        return []

    @classmethod
    def devices(cls, config: SerialSealConfig) -> list[str]:
        return serial_port(config.port)

    def snapshot(self) -> dict[str, Any]:
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
            "out_of_range": dict(self.ranges.counts),
            "too_many_seals": self.too_many_seals,
            "last_bad_line": self.last_bad,
            "silent_s": None if heard is None else round(time.monotonic() - heard, 1),
            "seals": {k: {"state": s.state, "battery_pct": s.battery_pct, "battery_low": s.battery_low}
                      for k, s in dict(self.seals).items()},
        }

    # -- the reader's port (the loop: drivers/base.py ReconnectingDriver) -------------------------

    def _open(self) -> serial.SerialBase:
        c = self.config
        return serial.serial_for_url(c.port, baudrate=c.baudrate, timeout=READ_TIMEOUT_S)

    def _opened(self, port: serial.SerialBase) -> None:
        self.port = port
        log.info("seal %s: reader on %s open", self.config.name, self.config.port)

    def _closed(self, port: serial.SerialBase) -> None:
        self.port = None

    def _open_failed(self, error: BaseException) -> str:
        return f"cannot open {self.config.port}: {error}"

    def _lost(self, error: BaseException) -> str:
        return f"{self.config.port} lost: {error}"

    def _log_problem(self, message: str, error: BaseException | None, loud: bool) -> None:
        (log.warning if loud else log.debug)("seal %s: %s", self.config.name, message)

    def _read(self, port: serial.SerialBase, stop: threading.Event) -> None:
        term = self.protocol.terminator
        buf = b""
        overlong = False
        while not stop.is_set():
            chunk = port.read(max(1, port.in_waiting))
            if not chunk:
                continue
            buf += chunk
            *lines, buf = buf.split(term)
            mono = time.monotonic_ns()
            if lines:
                overlong = False
            for line in lines:
                self._line(line, mono)
            if len(buf) > MAX_LINE:
                if not overlong:  # once per run of noise, not once per chunk of it
                    overlong = True
                    self._bad("garbage",
                              f"no line end in {MAX_LINE} bytes: the bytes before the last {MAX_LINE} dropped")
                buf = buf[-MAX_LINE:]

    def _line(self, line: bytes, mono_ns: int) -> None:
        self.lines += 1
        try:
            parsed = self.protocol.parse(line)
        except BadLine as e:
            reason = e.reason if e.reason in BAD_REASONS else "garbage"
            self._bad(reason, _text(e))
            return
        except Exception as e:  # noqa: BLE001 - a protocol module's bug must not stop the reader
            self._protocol_error(f"{self.config.protocol} failed on {line[:40]!r}: {type(e).__name__}: {_text(e)}",
                                 exc_info=True)
            return
        if parsed is None:
            return
        try:
            msg = self._checked(parsed)
        except BadLine as e:
            self._bad(e.reason, f"{self.config.protocol} gave {_text(e)}")
            return
        except Exception as e:  # noqa: BLE001 - an object whose attributes cannot even be compared
            self._protocol_error(f"{self.config.protocol} returned {type(parsed).__name__}: {type(e).__name__}")
            return
        if msg is None:
            self._protocol_error(f"{self.config.protocol} returned a {type(parsed).__name__}, not an EsealMessage")
            return
        self.messages += 1
        self._heard_mono = time.monotonic()
        self._message(msg, mono_ns)

    def _checked(self, msg: object) -> EsealMessage | None:
        """``msg`` as a message fit to publish; None if it is no message at all; BadLine for a
        malformed field. A battery value out of range is dropped (counted), the rest kept."""
        if not isinstance(msg, EsealMessage):
            return None
        seal_id, state, battery = msg.seal_id, msg.state, msg.battery_pct
        if type(seal_id) is not str or not SEAL_ID.fullmatch(seal_id):
            raise BadLine("bad_field", f"bad seal id {_short(seal_id)}")
        if not any(state is s or (type(state) is str and state == s) for s in SEAL_STATES):
            raise BadLine("unknown_state", f"unknown state {_short(state)}")
        if battery is not None and type(battery) is not int:
            raise BadLine("bad_field", f"battery {_short(battery)} is not a whole percentage")
        kept = self.ranges.keep("battery_pct", battery)
        if kept is None and battery is not None:
            self.last_bad = f"battery {battery} % of seal {seal_id} is impossible: dropped"
            log.debug("seal %s: %s", self.config.name, self.last_bad)
        return EsealMessage(seal_id, state, kept)

    def _bad(self, reason: str, detail: str) -> None:
        self.bad[reason] += 1
        self.last_bad = detail
        log.debug("seal %s: bad line: %s", self.config.name, detail)

    def _protocol_error(self, detail: str, exc_info: bool = False) -> None:
        first = self.bad[PROTOCOL_ERROR] == 0
        self._bad(PROTOCOL_ERROR, detail)
        if first:  # a module's bug shows once in the log, then in the counter
            log.warning("seal %s: %s", self.config.name, detail, exc_info=exc_info)

    def _message(self, msg: EsealMessage, mono_ns: int) -> None:
        seal = self.seals.get(msg.seal_id)
        if seal is None:
            if len(self.seals) >= MAX_SEALS:
                self.too_many_seals += 1
                self.last_bad = f"seal {msg.seal_id} ignored: this reader already reports {MAX_SEALS} seals"
                (log.warning if self.too_many_seals == 1 else log.debug)("seal %s: %s", self.config.name, self.last_bad)
                return
            seal = self.seals[msg.seal_id] = _Seal()
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


def _text(e: BaseException) -> str:
    """An exception's message, even when it cannot say it (a protocol module's own exception)."""
    try:
        return str(e)[:200]
    except Exception:  # noqa: BLE001 - its __str__ failed: the type is all there is
        return f"({type(e).__name__}, unprintable)"


def _short(value: object) -> str:
    try:
        return repr(value)[:40]
    except Exception:  # noqa: BLE001
        return f"({type(value).__name__})"
