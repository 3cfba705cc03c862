"""candump (can-utils) text captures, and the capture clock that makes any capture's times safe.

candump output is saved in many ways: ``-l`` log files, or whatever the screen showed pasted
into a ``.txt`` (``-ta``/``-td``/``-tz``/``-tA`` times, or none), sometimes with line numbers.
The suffix says nothing reliable, so lines are recognised by their content. Parsing is pure:
a line gives a ``can.Message`` or None, never an exception, and the reason a line is not a
frame is counted. Times are not judged here but by :class:`Timeline`, which also serves
python-can's readers and the live bus: one absurd stamp must not decide any other frame's time.
"""

from __future__ import annotations

import calendar
import math
import re
import time
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import can

from agent.model.release import RELEASE_MS

FORMS = ("candump text: -l log lines '(1700000000.123456) can0 0CF00400#FF7D7DE015FFF0FF' or screen "
         "lines '(000.020000)  can0  0CF00400   [8]  FF 7D 7D E0 15 FF F0 FF' with -ta/-td/-tz/-tA "
         "times or none, line numbers allowed, any file name")

CAN_ERR_FLAG = 0x20000000
FD_LENGTHS = frozenset((0, 1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 20, 24, 32, 48, 64))

_START = r"(?:\d{1,12}[:.]?\s+)?(?:\((?P<ts>[^()]{0,40})\)\s*)?(?P<ch>[^\s#()\[\]]{1,32})\s+"
_LOG = re.compile(_START + r"(?P<id>[0-9A-Fa-f]{1,8})(?P<sep>#{1,3})(?P<body>\S*)(?:\s+[RT])?\s*")
_SCREEN = re.compile(_START + r"(?:[RT]X\s+\S\s+\S\s+)?(?P<id>[0-9A-Fa-f]{1,8})\s+\[(?P<len>\d{1,2})\](?P<rest>.*)")
_LOCAL = re.compile(r"(\d{4})-(\d\d)-(\d\d) (\d\d):(\d\d):(\d\d)(\.\d{1,9})?")
_HEX = re.compile(r"(?:[0-9A-Fa-f]{2})*")


class Parsed(NamedTuple):
    msg: can.Message
    """Its ``timestamp`` is the line's number as written (NaN when the line has none)."""
    clock: str
    """"number" (-l, -ta, -td, -tz), "local" (-tA: local date and time) or "none"."""


class Parser:
    """candump lines → frames; ``counts`` says why the other lines were not frames."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def parse(self, line: str) -> Parsed | None:
        try:
            got = _parse(line)
        except (ValueError, OverflowError):  # defensive: _parse checks what it converts
            got = "not_a_frame"
        if isinstance(got, str):
            if got:
                self.counts[got] = self.counts.get(got, 0) + 1
            return None
        return got


def _parse(line: str) -> Parsed | str:
    line = line.strip()
    if not line:
        return ""
    log = _LOG.fullmatch(line) if "#" in line else None
    m = log or _SCREEN.fullmatch(line)
    if m is None:
        return "not_a_frame"
    ident = _ident(m["id"])
    if isinstance(ident, str):
        return ident
    can_id, extended, error = ident
    frame = _log_body(m["sep"], m["body"]) if log else _screen_body(m["len"], m["rest"])
    if isinstance(frame, str):
        return frame
    data, remote, dlc, fd = frame
    if error and (remote or fd):
        return "bad_id"
    ts, clock = _stamp(m["ts"])
    msg = can.Message(timestamp=ts, arbitration_id=can_id, is_extended_id=extended and not error,
                      is_remote_frame=remote, is_error_frame=error, is_fd=fd, data=data, dlc=dlc,
                      channel=m["ch"], check=False)
    return Parsed(msg, clock)


def _ident(text: str) -> tuple[int, bool, bool] | str:
    """candump prints 3 hex digits for 11-bit ids, 8 for 29-bit ids and error frames."""
    value = int(text, 16)
    if len(text) <= 3:
        return (value, False, False) if value <= 0x7FF else "bad_id"
    if len(text) == 8 and value & CAN_ERR_FLAG and value <= CAN_ERR_FLAG | 0x1FFFFFFF:
        return value & 0x1FFFFFFF, False, True
    return (value, True, False) if value <= 0x1FFFFFFF else "bad_id"


def _log_body(sep: str, body: str) -> tuple[bytes, bool, int, bool] | str:
    """``#11223344`` (``_9``..``_F``: a raw DLC over 8), ``#R``/``#R5`` remote, ``##<flags><data>`` FD."""
    if sep == "###":
        return "can_xl"
    fd = sep == "##"
    if fd:
        if not body or body[0] not in "0123456789ABCDEFabcdef":
            return "bad_data"
        body = body[1:]
    elif body[:1] in ("R", "r"):
        rest = body[1:].partition("_")[0]
        if rest and not (rest.isdigit() and len(rest) == 1 and int(rest) <= 8):
            return "bad_length"
        n = int(rest) if rest else 0
        return b"", True, n, False
    elif "_" in body:
        body, _, raw_dlc = body.partition("_")
        if len(body) != 16 or raw_dlc.upper() not in ("9", "A", "B", "C", "D", "E", "F"):
            return "bad_length"
    body = body.replace(".", "")
    if not _HEX.fullmatch(body):
        return "bad_data"
    data = bytes.fromhex(body)
    if len(data) > 8 and not (fd and len(data) in FD_LENGTHS):
        return "bad_length"
    return data, False, len(data), fd


def _screen_body(length: str, rest: str) -> tuple[bytes, bool, int, bool] | str:
    """``[8]  11 22 …`` (``[08]``/``[64]``: CAN FD), ``[2]  remote request``; anything after
    the bytes (``ERRORFRAME``, the ``-a`` ASCII column) is candump's commentary."""
    n = int(length)
    fd = n > 8 or (len(length) == 2 and length[0] == "0")
    if n not in FD_LENGTHS or (not fd and n > 8):
        return "bad_length"
    words = rest.split()
    if words[:2] == ["remote", "request"] and not fd:
        return b"", True, n, False
    hexes = words[:n]
    if len(hexes) < n or not all(len(w) == 2 and _HEX.fullmatch(w) for w in hexes):
        return "bad_data"
    return bytes.fromhex("".join(hexes)), False, n, fd


def _stamp(text: str | None) -> tuple[float, str]:
    if text is None:
        return math.nan, "none"
    text = text.strip()
    local = _LOCAL.fullmatch(text)
    if local:
        y, mo, d, h, mi, s = (int(x) for x in local.groups()[:6])
        if not (1 <= y and 1 <= mo <= 12 and 1 <= d <= 31 and h < 24 and mi < 60 and s < 61):
            return math.nan, "local"
        return calendar.timegm((y, mo, d, h, mi, s)) + float(local[7] or 0), "local"
    try:
        return float(text), "number"
    except ValueError:
        return math.nan, "number"


# -- the capture clock ---------------------------------------------------------------------------

EPOCH_MIN = 946_684_800.0
"""2000-01-01: a smaller stamp counts from the capture's start (-tz, -td, an uptime, a Pi's
1970 clock), so it cannot date a reading."""
EPOCH_MAX = 7_258_118_400.0  # 2200-01-01: beyond, a stamp is absurd whatever the source
NOT_BEFORE = RELEASE_MS / 1000
"""This release's date: the true time is later, whatever a clock without RTC says."""
FUTURE_S = 86_400.0
"""A capture is from the past: an absolute stamp more than this ahead of now is not believed."""
JUMP_S = 60.0
BACK_S = 1.0
"""A step forward by more than JUMP_S or backward by more than BACK_S is believed only when
CONFIRM more frames follow it (a capture restarted, a long silence, a clock step) before any
frame comes back to the last believed time; otherwise the frames that made it were alone in
their time and take the last believed one. Before any time is believed, the first run of
CONFIRM + 1 frames that follow each other sets it, whatever came between."""
CONFIRM = 2
MAX_HELD = 256
MAX_RUNS = 8
MAX_DELTA_S = 86_400.0  # -td: one larger step is absurd


def clock_of(sample: Iterable[Parsed]) -> str:
    """The Timeline mode for a candump capture, from its first frames."""
    sample = list(sample)
    kinds = {p.clock for p in sample}
    if kinds <= {"none"}:
        return "none"
    if "local" in kinds:
        return "local"
    values = [p.msg.timestamp for p in sample if p.clock == "number" and 0 <= p.msg.timestamp < EPOCH_MAX]
    rel = [v for v in values if v < EPOCH_MIN]
    if not rel or len(rel) * 2 < len(values):
        return "auto"
    steps = list(zip(rel, rel[1:]))
    # -tz counts up; -td repeats a bus period's delta and falls back after a long gap.
    if any(b < a for a, b in steps) or (len(steps) >= 3 and 2 * sum(a == b for a, b in steps) >= len(steps)):
        return "delta"
    return "auto"


class Timeline:
    """Frames (and the live bus's ``None``) in, the same with believable times out.

    Modes: ``auto`` (absolute Unix times or times from the capture's start, told apart by the
    first believed time), ``delta`` (candump -td), ``local`` (-tA: no time zone), ``none`` (no
    times: timed as read), ``live`` (python-can's stamps). ``trusted`` says whether a reading
    may carry these times as its date; otherwise the agent's clock dates it. Never raises;
    frames come out in their order, each once, only later when a jump has to be confirmed.
    """

    def __init__(self, mode: str, counters: dict[str, int], *, now: float | None = None):
        self.mode = mode
        self.counters = counters
        horizon = max(time.time() if now is None else now, NOT_BEFORE) + FUTURE_S
        self._auto_hi = horizon
        self.trusted = False
        ranges = {"auto": (0.0, horizon), "local": (0.0, EPOCH_MAX), "live": (0.0, EPOCH_MAX)}
        self._range = ranges.get(mode, (0.0, 0.0))
        self.base = math.nan
        """The last believed time (NaN: none yet)."""
        self._held: list[list[Any]] = []
        """[message, its time or None, the index of its run or None] while a jump is unconfirmed."""
        self._runs: list[list[Any]] = []
        """[latest time, frames] of each run of held frames that follow each other."""

    def frames(self, source: Iterable[can.Message | None]) -> Iterator[can.Message | None]:
        if self.mode == "delta":
            yield from self._deltas(source)
            return
        if self.mode == "none":
            yield from self._as_read(source)
            return
        held = self._held
        lo, hi = self._range
        for msg in source:
            if msg is None:
                yield from self._settle()
                yield None
                continue
            t = msg.timestamp
            base = self.base
            if not held and lo <= t <= hi and base - BACK_S <= t <= base + JUMP_S:  # NaN fails it
                self.base = t
                yield msg
            else:
                yield from self._hold(msg, t)
                lo, hi = self._range
        yield from self._settle()

    def _hold(self, msg: can.Message, t: float) -> list[can.Message]:
        lo, hi = self._range
        held = self._held
        if not lo <= t <= hi:  # NaN, inf, negative, beyond 2200 or the future, the other clock
            self.counters["bad_timestamp"] += 1
            if not held and self.base == self.base:
                msg.timestamp = self.base
                return [msg]
            held.append([msg, None, None])
            return self._overflow()
        base = self.base
        if base - BACK_S <= t <= base + JUMP_S:  # back where we were: what was held was wrong
            out = self._decide(None)
            self.base = t
            out.append(msg)
            return out
        for i, run in enumerate(self._runs):
            if run[0] - BACK_S <= t <= run[0] + JUMP_S:
                run[0] = t
                run[1] += 1
                held.append([msg, t, i])
                return self._decide(i) if run[1] > CONFIRM else self._overflow()
        if len(self._runs) >= MAX_RUNS:  # stamps all over the place: none of them believed
            self.counters["bad_timestamp"] += 1
            held.append([msg, None, None])
        else:
            self._runs.append([t, 1])
            held.append([msg, t, len(self._runs) - 1])
        return self._overflow()

    def _decide(self, winner: int | None) -> list[can.Message]:
        """Release what is held: the frames of run ``winner`` keep their times (None: none
        does), every other frame takes the last believed time before it."""
        prev = self.base
        if winner is not None:
            first = next(t for _m, t, r in self._held if r == winner)
            if self.base == self.base:
                self.counters["time_jumps"] += 1
            elif self.mode == "auto":
                self.trusted = first >= EPOCH_MIN
                self._range = (EPOCH_MIN, self._auto_hi) if self.trusted else (0.0, EPOCH_MIN)
            prev = first
            self.base = self._runs[winner][0]
        out = []
        for msg, t, run in self._held:
            if winner is not None and run == winner:
                prev = t
            else:
                if t is not None:
                    self.counters["bad_timestamp"] += 1
                msg.timestamp = prev
            out.append(msg)
        self._held.clear()
        self._runs.clear()
        return out

    def _settle(self) -> list[can.Message]:
        """The source ended or paused: decide what is held."""
        if not self._held:
            return []
        if self.base == self.base:
            return self._decide(None)
        if self._runs:  # a capture too short to confirm its first time: its longest run
            return self._decide(max(range(len(self._runs)), key=lambda i: (self._runs[i][1], -i)))
        # No believable time at all: the frames still count, timed from 0, dated by the agent.
        self.base = 0.0
        if self.mode == "auto":
            self._range = (0.0, EPOCH_MIN)
        return self._decide(None)

    def _overflow(self) -> list[can.Message]:
        return self._settle() if len(self._held) > MAX_HELD else []

    def _deltas(self, source: Iterable[can.Message | None]) -> Iterator[can.Message | None]:
        us = 0  # summed in whole microseconds (candump's resolution): no drift over a long capture
        for msg in source:
            if msg is not None:
                d = msg.timestamp
                if 0 <= d <= MAX_DELTA_S:
                    us += round(d * 1e6)
                else:
                    self.counters["bad_timestamp"] += 1
                msg.timestamp = us / 1e6
            yield msg

    def _as_read(self, source: Iterable[can.Message | None]) -> Iterator[can.Message | None]:
        start = time.monotonic()
        for msg in source:
            if msg is not None:
                msg.timestamp = time.monotonic() - start
            yield msg
