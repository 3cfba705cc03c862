"""``lorry-agent watch``: subscribe as the backend would and show what the lorries send.

For an installer checking a new device (``lorry-agent watch --config /etc/lorry-agent/agent.toml``
on the device itself) and for a backend engineer (``lorry-agent watch --host broker --json | jq``).

It subscribes (QoS 1, a clean session unless ``--keep-session``) to ``{prefix}/{device}/#`` and
keeps, per device: the online/offline status, the last position, seals, temperatures, CAN values
and active DTCs, the last health reading (buffer depth, satellites, clock, VIN), the recent
alarms, and per stream the readings, duplicates and the gaps in ``seq`` (computed from the set of
seq numbers received, so a backlog arriving late fills them). Every ~2 s, when something
changed, it prints a plain-text state screen (no curses: fine in any terminal and in logs), and
a final one on exit; with ``--json`` it prints every reading received instead, one JSON object
per line, and problems go to stderr.

Three layers, so each can be reused and tested alone:

- :func:`decode`: one message's payload → its readings. The only place that knows payload
  encodings: JSON, and the compact CBOR batches of docs/compact.md (agent/compact/__init__.py).
- :class:`Watcher`: ``on_payload(topic, payload)`` → ``state`` (a :class:`DeviceState` per
  device) and :meth:`Watcher.render`. No MQTT, no threads of its own, never raises on bad input.
- :class:`MqttWatch` and :func:`watch`: the paho-mqtt plumbing (connect, reconnect with
  backoff, subscribe) and the screen / JSON-lines loop; :func:`main` for the command line.
"""

from __future__ import annotations

import argparse
import bisect
import datetime as dt
import json
import os
import ssl
import sys
import textwrap
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from agent import compact

SCREEN_INTERVAL_S = 2.0
RECENT_ALARMS = 10
RECENT_PROBLEMS = 5
SHOWN_RANGES = 8
"""Missing seq ranges listed on a stream's line; the rest are counted."""
NON_READING_TOPICS = frozenset({"status", "cmd"})
"""Single-level topics under a device that carry no readings (``cmd/reply`` has two levels)."""
DROPPED_STREAM_KEYS = ("dropped_stream",)
"""The field of a ``data_dropped`` alarm naming the stream that lost readings. (docs/cargo.md
calls it ``stream``, but that is the envelope's field, ``alarm`` on this stream, and the agent
refuses to encode a reading whose data sets it.)"""
JSON_CONTENT_TYPES = frozenset({"application/json", "text/json"})
NOTHING_YET_HINT = (
    " (not even a retained status): is the agent running and has it ever connected to this broker?"
    "\nThe broker's ACL may also hide the topics from these credentials: docs/mosquitto.acl lets a"
    "\ndevice read only its own cmd topic, so run watch with the backend's credentials."
)
"""Shown while a subscription brought nothing at all."""
RECONNECT_MIN_S = 0.5
RECONNECT_MAX_S = 30.0


# -- decoding -------------------------------------------------------------------------------


class DecodeError(ValueError):
    """A payload that is not one reading or a batch of readings."""


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed (docs/contract.md: no NaN or infinities)")


def decode(payload: bytes, content_type: str | None = None) -> list[dict[str, Any]]:
    """One message's readings, in order: a JSON object (one reading) or array (a batch), or a
    compact batch (docs/compact.md).

    ``content_type`` is the message's MQTT 5 content type, or None (MQTT 3.1.1, or not set).
    ``application/cbor`` is a compact batch; without a content type, so is a payload that
    starts with the self-describe tag (bytes d9 d9 f7, which no JSON text starts with);
    anything else is JSON. Raises :class:`DecodeError` for anything that is not readings.
    """
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    if kind == compact.CONTENT_TYPE or (not kind and compact.is_compact(payload)):
        try:
            return compact.decode(payload)
        except compact.CompactError as e:
            raise DecodeError(f"content type {content_type!r}: {e}" if content_type else str(e)) from None
    if kind and kind not in JSON_CONTENT_TYPES:
        raise DecodeError(f"unsupported content type {content_type!r}")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DecodeError(f"not UTF-8: {e}") from None
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except ValueError as e:  # json.JSONDecodeError is a ValueError
        raise DecodeError(f"not JSON: {e}") from None
    if isinstance(obj, dict):
        return [obj]
    if isinstance(obj, list):
        if not obj:
            raise DecodeError("an empty batch")
        for i, item in enumerate(obj):
            if not isinstance(item, dict):
                raise DecodeError(f"batch item {i + 1} is a JSON {_json_type(item)}, not an object")
        return obj
    raise DecodeError(f"a JSON {_json_type(obj)}, not an object or an array")


def _json_type(x: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(x), "number")


# -- sequence numbers -----------------------------------------------------------------------


class SeqSet:
    """The seq numbers received, as sorted disjoint ranges: membership, gaps and late filling
    in O(log n) and memory proportional to the number of gaps, not of readings."""

    def __init__(self, seqs: Iterable[int] = ()) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        self.count = 0
        for s in seqs:
            self.add(s)

    def __contains__(self, seq: int) -> bool:
        i = bisect.bisect_right(self._starts, seq) - 1
        return i >= 0 and self._ends[i] >= seq

    def __len__(self) -> int:
        return self.count

    def add(self, seq: int) -> bool:
        """Add ``seq``; False if it was already there (a duplicate)."""
        starts, ends = self._starts, self._ends
        i = bisect.bisect_right(starts, seq) - 1
        if i >= 0 and ends[i] >= seq:
            return False
        left = i >= 0 and ends[i] == seq - 1
        right = i + 1 < len(starts) and starts[i + 1] == seq + 1
        if left and right:
            ends[i] = ends[i + 1]
            del starts[i + 1], ends[i + 1]
        elif left:
            ends[i] = seq
        elif right:
            starts[i + 1] = seq
        else:
            starts.insert(i + 1, seq)
            ends.insert(i + 1, seq)
        self.count += 1
        return True

    @property
    def lowest(self) -> int | None:
        return self._starts[0] if self._starts else None

    @property
    def highest(self) -> int | None:
        return self._ends[-1] if self._ends else None

    def ranges(self) -> list[tuple[int, int]]:
        """What was received, as inclusive ranges."""
        return list(zip(self._starts, self._ends))

    def missing(self) -> list[tuple[int, int]]:
        """The holes between the lowest and the highest seq received, as inclusive ranges."""
        return [(e + 1, s - 1) for e, s in zip(self._ends, self._starts[1:])]


def _subtract(ranges: list[tuple[int, int]], cuts: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``ranges`` without what ``cuts`` covers (all inclusive)."""
    out = []
    for a, b in ranges:
        pieces = [(a, b)]
        for c, d in cuts:
            rest = []
            for x, y in pieces:
                if d < x or c > y:
                    rest.append((x, y))
                    continue
                if x < c:
                    rest.append((x, c - 1))
                if d < y:
                    rest.append((d + 1, y))
            pieces = rest
        out.extend(pieces)
    return out


def _count(ranges: Iterable[tuple[int, int]]) -> int:
    return sum(b - a + 1 for a, b in ranges)


def format_ranges(ranges: list[tuple[int, int]], limit: int = SHOWN_RANGES) -> str:
    """``5, 17-18, 40-99`` (and ``… +3 more`` past ``limit``)."""
    shown = [str(a) if a == b else f"{a}-{b}" for a, b in ranges[:limit]]
    if len(ranges) > limit:
        shown.append(f"... +{len(ranges) - limit} more")
    return ", ".join(shown)


# -- state ------------------------------------------------------------------------------------


@dataclass
class StreamStats:
    """One stream of one device, as received."""

    name: str
    seqs: SeqSet = field(default_factory=SeqSet)
    readings: int = 0
    """Readings received, duplicates included."""
    duplicates: int = 0
    messages: int = 0
    batches: int = 0
    """Messages with more than one reading."""
    bytes: int = 0
    malformed: int = 0
    """Messages or readings on this topic that could not be used."""
    latest: dict[str, Any] | None = None
    """The reading with the highest seq (not the last to arrive: a backlog arrives late)."""
    dropped: list[tuple[int, int]] = field(default_factory=list)
    """seq ranges the device announced it gave up (``data_dropped`` alarms)."""

    @property
    def highest(self) -> int | None:
        return self.seqs.highest

    def missing_ranges(self) -> list[tuple[int, int]]:
        """seq numbers below the highest received that have not arrived (yet), except those
        the device announced as dropped."""
        return _subtract(self.seqs.missing(), self.dropped)

    @property
    def missing(self) -> int:
        return _count(self.missing_ranges())

    def summary(self) -> str:
        """``position: 1..1176, missing 3 (5, 17-18)``."""
        if not self.seqs.count:
            return f"{self.name}: no readings"
        text = f"{self.name}: {self.seqs.lowest}..{self.seqs.highest}"
        gaps = self.missing_ranges()
        text += f", missing {_count(gaps)} ({format_ranges(gaps)})" if gaps else ", no gaps"
        if self.dropped:
            text += f", dropped by the device {_count(self.dropped)} ({format_ranges(self.dropped)})"
        return text


@dataclass
class DeviceState:
    """Everything known about one device from what it published."""

    id: str
    status: str | None = None
    """``online``, ``offline`` (retained ``…/status``), None before any (or once cleared)."""
    status_retained: bool = False
    status_at: float | None = None
    streams: dict[str, StreamStats] = field(default_factory=dict)
    seals: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Seal name → its latest event (highest seq)."""
    temperatures: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Sensor → its latest reading (``c`` is None when ``error`` says why)."""
    temperature_errors: Counter[str] = field(default_factory=Counter)
    """Sensor → readings received with an error."""
    can: dict[tuple[str, Any], dict[str, Any]] = field(default_factory=dict)
    """(name, source address) → the latest value item, plus ``seq`` and ``ts`` of its reading."""
    dtcs: dict[tuple[Any, Any, Any], dict[str, Any]] = field(default_factory=dict)
    """(source address, SPN, FMI) → the latest ``dtc`` alarm about it."""
    health: dict[str, Any] | None = None
    alarms: list[dict[str, Any]] = field(default_factory=list)
    """The last RECENT_ALARMS alarms by seq, oldest first."""
    messages: int = 0
    bytes: int = 0
    malformed_messages: int = 0
    malformed_readings: int = 0
    problems: list[str] = field(default_factory=list)
    """The most recent problems with what this device sent, newest last."""
    other: Counter[str] = field(default_factory=Counter)
    """Messages on topics without readings (``cmd``, ``cmd/reply``), per topic suffix."""
    last_message_at: float | None = None

    def stream(self, name: str) -> StreamStats:
        if name not in self.streams:
            self.streams[name] = StreamStats(name)
        return self.streams[name]

    @property
    def position(self) -> dict[str, Any] | None:
        """The position with the highest seq."""
        s = self.streams.get("position")
        return s.latest if s else None

    @property
    def active_dtcs(self) -> list[dict[str, Any]]:
        return [a for _k, a in sorted(self.dtcs.items(), key=lambda kv: str(kv[0])) if a.get("state") == "active"]

    @property
    def buffer_pending(self) -> Any:
        return _get(self.health, "buffer", "pending")

    @property
    def vin(self) -> Any:
        return _get(self.health, "vehicle", "vin")

    @property
    def missing(self) -> int:
        """Readings missing over all streams (announced drops excepted)."""
        return sum(s.missing for s in self.streams.values())


def _get(d: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


def _newer(reading: dict[str, Any], than: dict[str, Any] | None) -> bool:
    return than is None or reading["seq"] > than.get("seq", 0)


class Watcher:
    """The state of every device seen on ``{prefix}/…``, fed one MQTT message at a time.

    Separate from MQTT so it can be fed from anything (a test, a capture file, another
    client). Thread safe; never raises on what it is fed.
    """

    def __init__(self, prefix: str = "lorry", *, clock: Callable[[], float] = time.time) -> None:
        self.prefix = prefix
        self.clock = clock
        self.state: dict[str, DeviceState] = {}
        """Device id → :class:`DeviceState`."""
        self.foreign = 0
        """Messages on topics outside ``{prefix}/{device}/…``."""
        self.changes = 0
        """Counts every message taken in: a screen is due when it moved."""
        self.last_problem: str | None = None
        """The latest problem with a message (``device: what``)."""
        self._lock = threading.RLock()

    def device(self, device_id: str) -> DeviceState:
        with self._lock:
            if device_id not in self.state:
                self.state[device_id] = DeviceState(device_id)
            return self.state[device_id]

    # -- input ----------------------------------------------------------------------------

    def on_payload(self, topic: str, payload: bytes, content_type: str | None = None,
                   retained: bool = False) -> list[dict[str, Any]]:
        """Take one message in. Returns the readings it carried that were accepted (duplicates
        included: everything that arrived), in order; [] for status and bad messages."""
        with self._lock:
            self.changes += 1
            try:
                return self._on_payload(topic, bytes(payload), content_type, retained)
            except Exception as e:  # noqa: BLE001 - a watcher must survive anything it is sent
                dev = self._device_of(topic)
                if dev is not None:
                    dev.malformed_messages += 1
                    self._problem(dev, f"{topic}: could not process ({type(e).__name__}: {e})")
                return []

    def _device_of(self, topic: str) -> DeviceState | None:
        parts = topic.split("/")
        if len(parts) >= 3 and parts[0] == self.prefix and parts[1]:
            return self.device(parts[1])
        return None

    def _on_payload(self, topic: str, payload: bytes, content_type: str | None,
                    retained: bool) -> list[dict[str, Any]]:
        head = self.prefix + "/"
        device_id, _, sub = topic[len(head):].partition("/") if topic.startswith(head) else ("", "", "")
        if not device_id or not sub:
            self.foreign += 1
            return []
        dev = self.device(device_id)
        now = self.clock()
        dev.messages += 1
        dev.bytes += len(payload)
        dev.last_message_at = now
        if sub == "status":
            text = payload.decode("utf-8", errors="replace").strip()
            dev.status = text or None  # an empty retained message clears the status
            dev.status_retained = retained
            dev.status_at = now
            return []
        if "/" in sub or sub in NON_READING_TOPICS:
            dev.other[sub] += 1
            return []
        return self._readings(dev, sub, payload, content_type)

    def _readings(self, dev: DeviceState, stream: str, payload: bytes,
                  content_type: str | None) -> list[dict[str, Any]]:
        stats = dev.stream(stream)
        stats.messages += 1
        stats.bytes += len(payload)
        try:
            readings = decode(payload, content_type)
        except DecodeError as e:
            stats.malformed += 1
            dev.malformed_messages += 1
            self._problem(dev, f"{stream}: {e} ({_preview(payload)})")
            return []
        if len(readings) > 1:
            stats.batches += 1
        accepted = []
        for r in readings:
            problem = self._envelope_problem(dev.id, stream, r)
            if problem:
                stats.malformed += 1
                dev.malformed_readings += 1
                self._problem(dev, f"{stream}: {problem}")
                continue
            accepted.append(r)
            stats.readings += 1
            if not stats.seqs.add(r["seq"]):
                stats.duplicates += 1
                continue  # the same seq is the same reading (docs/contract.md)
            if _newer(r, stats.latest):
                stats.latest = r
            self._apply(dev, stream, r)
        return accepted

    @staticmethod
    def _envelope_problem(device_id: str, stream: str, r: dict[str, Any]) -> str | None:
        seq = r.get("seq")
        if type(seq) is not int or seq < 1:
            return f"reading without a valid seq ({_preview(r)})"
        if r.get("stream") != stream:
            return f"seq {seq}: stream {r.get('stream')!r} on the {stream!r} topic"
        if r.get("device") != device_id:
            return f"seq {seq}: device {r.get('device')!r} on {device_id!r}'s topic"
        if not isinstance(r.get("ts"), str):
            return f"seq {seq}: no ts"
        return None

    def _problem(self, dev: DeviceState, text: str) -> None:
        dev.problems.append(text)
        del dev.problems[:-RECENT_PROBLEMS]
        self.last_problem = f"{dev.id}: {text}"

    @property
    def malformed(self) -> int:
        """Malformed messages and readings, all devices together."""
        with self._lock:
            return sum(d.malformed_messages + d.malformed_readings for d in self.state.values())

    def _apply(self, dev: DeviceState, stream: str, r: dict[str, Any]) -> None:
        """Update the per-stream state with a new (not duplicate) reading."""
        if stream == "seal":
            name = str(r.get("seal"))
            if _newer(r, dev.seals.get(name)):
                dev.seals[name] = r
        elif stream == "temperature":
            name = str(r.get("sensor"))
            if r.get("error") is not None:
                dev.temperature_errors[name] += 1
            if _newer(r, dev.temperatures.get(name)):
                dev.temperatures[name] = r
        elif stream == "can":
            values = r.get("values")
            for v in values if isinstance(values, list) else []:
                if not isinstance(v, dict):
                    continue
                key = (str(v.get("name")), v.get("sa"))
                if _newer(r, dev.can.get(key)):
                    dev.can[key] = {**v, "seq": r["seq"], "ts": r["ts"]}
        elif stream == "health":
            if _newer(r, dev.health):
                dev.health = r
        elif stream == "alarm":
            self._alarm(dev, r)

    @staticmethod
    def _alarm(dev: DeviceState, r: dict[str, Any]) -> None:
        bisect.insort(dev.alarms, r, key=lambda a: a["seq"])
        del dev.alarms[:-RECENT_ALARMS]
        kind = r.get("kind")
        if kind == "dtc":
            key = (r.get("source_address"), r.get("spn"), r.get("fmi"))
            if _newer(r, dev.dtcs.get(key)):
                dev.dtcs[key] = r
        elif kind == "data_dropped":
            target = next((r[k] for k in DROPPED_STREAM_KEYS if isinstance(r.get(k), str)), None)
            first, last = r.get("first_seq"), r.get("last_seq")
            if target and type(first) is int and type(last) is int and first <= last:
                dev.stream(target).dropped.append((first, last))

    # -- output ---------------------------------------------------------------------------

    def render(self, now: float | None = None) -> str:
        """The state screen: one block per device, plain text lines."""
        now = self.clock() if now is None else now
        with self._lock:
            blocks = [self.render_device(d, now) for _id, d in sorted(self.state.items())]
            if self.foreign:
                blocks.append(f"({self.foreign} messages on topics outside {self.prefix}/{{device}}/...)")
        return "\n".join(blocks) if blocks else "no messages yet"

    def render_device(self, dev: DeviceState, now: float | None = None) -> str:
        now = self.clock() if now is None else now
        with self._lock:
            try:
                return "\n".join(_device_lines(dev, now))
            except Exception as e:  # noqa: BLE001 - a bad value must not stop the screen
                return f"{dev.id}: cannot show this device ({type(e).__name__}: {e})"


# -- rendering ----------------------------------------------------------------------------------

LABEL = 10


def _line(label: str, text: str) -> str:
    return f"  {label:<{LABEL}}{text}"


def _wrapped(label: str, items: list[str], sep: str = ", ") -> list[str]:
    text = sep.join(items)
    lines = textwrap.wrap(text, 96, break_long_words=False, break_on_hyphens=False) or [""]
    return [_line(label if i == 0 else "", chunk) for i, chunk in enumerate(lines)]


def _f(x: Any, fmt: str = "", unit: str = "") -> str:
    """A value from a payload, whatever its type: numbers formatted, None as '-'."""
    if x is None:
        return "-"
    if isinstance(x, (int, float)) and not isinstance(x, bool) and fmt:
        return f"{x:{fmt}}{unit}"
    return f"{x}{unit}"


def _kib(n: int) -> str:
    return f"{n} B" if n < 1024 else f"{n / 1024:.1f} KiB" if n < 1024 * 1024 else f"{n / 1048576:.1f} MiB"


def duration(seconds: float) -> str:
    """``42 s``, ``3 min``, ``2 h 05 min``, ``3 d 04 h``."""
    s = int(abs(seconds))
    if s < 120:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 86400} d {s % 86400 // 3600:02d} h"


def parse_ts(ts: Any) -> float | None:
    """Unix time of a reading's ``ts`` (``2026-11-21T03:12:05.000Z``), or None."""
    if not isinstance(ts, str):
        return None
    try:
        t = dt.datetime.fromisoformat(ts.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (t if t.tzinfo else t.replace(tzinfo=dt.UTC)).timestamp()


def age(ts: Any, now: float) -> str:
    t = parse_ts(ts)
    if t is None:
        return "age ?"
    if t > now + 5:
        return f"{duration(t - now)} in the future (clock?)"
    return f"age {duration(now - t)}"


def _clock(t: float | None) -> str:
    return "-" if t is None else time.strftime("%H:%M:%S", time.gmtime(t)) + "Z"


def _device_lines(dev: DeviceState, now: float) -> list[str]:
    status = dev.status or "status unknown"
    if dev.status is not None:
        status += " (retained)" if dev.status_retained else f" since {_clock(dev.status_at)}"
    seen = f"last message {duration(now - dev.last_message_at)} ago" if dev.last_message_at else "no messages"
    lines = [f"{dev.id}  {status}  {seen}  {dev.messages} msgs {_kib(dev.bytes)}"]

    if (p := dev.position) is not None:
        ev = f"  ({p['event']})" if p.get("event") else ""
        lines.append(_line("position", f"{p.get('ts')}  {_f(p.get('lat'), '.7f')}, {_f(p.get('lon'), '.7f')}  "
                                       f"{_f(p.get('speed_kmh'), '.1f', ' km/h')}  fix {_f(p.get('fix'))}  "
                                       f"{age(p.get('ts'), now)}  seq {p['seq']}{ev}"))
    ign = dev.streams.get("ignition")
    if ign and ign.latest:
        on = ign.latest.get("on")
        lines.append(_line("ignition", f"{'on' if on is True else 'off' if on is False else _f(on)}  "
                                       f"since {ign.latest.get('ts')}"))
    if (h := dev.health) is not None:
        in_view = _get(h, "gps", "satellites_in_view")
        in_view_total = sum(v for v in in_view.values() if isinstance(v, int)) if isinstance(in_view, dict) else None
        parts = [f"buffer {_f(dev.buffer_pending)} pending"]
        if _get(h, "buffer", "time_pending"):
            parts.append(f"{_get(h, 'buffer', 'time_pending')} waiting for a trusted time")
        parts.append(f"sats {_f(_get(h, 'gps', 'sats_used'))} used" +
                     (f" / {in_view_total} in view" if in_view_total is not None else ""))
        err = _get(h, "clock", "system_error_s")
        parts.append(f"clock {_f(_get(h, 'clock', 'source'))}" +
                     (f" (system {_f(err, '+.1f', ' s')})" if err is not None else ""))
        if dev.vin is not None or _get(h, "vehicle") is not None:
            parts.append(f"VIN {_f(dev.vin)}")
        if h.get("reporting"):
            parts.append(str(h.get("reporting")))
        parts.append(f"at {h.get('ts')}")
        lines += _wrapped("health", parts)
    for name, s in sorted(dev.seals.items()):
        text = f"{name} {_f(s.get('event'))} at {s.get('ts')}"
        if s.get("event") in ("opened", "tampered"):
            text += "  " + {True: "authorised", False: "NOT AUTHORISED"}.get(s.get("authorised"), "authorised ?")
        zones = s.get("zones")
        text += f"  zones: {', '.join(map(str, zones)) if isinstance(zones, list) and zones else '-'}"
        if s.get("seal_id") is not None:
            text += f"  id {s.get('seal_id')}"
        if s.get("battery_pct") is not None:
            text += f"  battery {_f(s.get('battery_pct'), 'd', '%')}"
        lines.append(_line("seal", text))
    for name, t in sorted(dev.temperatures.items()):
        value = f"{_f(t.get('c'), '.2f', ' C')}" if t.get("c") is not None else f"no value ({_f(t.get('error'))})"
        errors = dev.temperature_errors.get(name, 0)
        lines.append(_line("temp", f"{name} {value} at {t.get('ts')}" + (f"  errors {errors}" if errors else "")))
    if dev.can:
        names = Counter(name for name, _sa in dev.can)
        items = [f"{name}{f'[sa {sa}]' if names[name] > 1 else ''}={_f(v.get('value'))}"
                 f"{' ' + str(v['unit']) if v.get('unit') else ''}"
                 for (name, sa), v in sorted(dev.can.items(), key=lambda kv: (kv[0][0], str(kv[0][1])))]
        latest = max(dev.can.values(), key=lambda v: v["seq"])
        lines += _wrapped("can", items)
        lines[-1] += f"  (at {latest.get('ts')})"
    for a in dev.active_dtcs:
        lamps = a.get("lamps")
        lit = [k for k, v in lamps.items() if v == "on"] if isinstance(lamps, dict) else []
        lines.append(_line("dtc", f"SPN {_f(a.get('spn'))} FMI {_f(a.get('fmi'))} SA {_f(a.get('source_address'))} "
                                  f"oc {_f(a.get('oc'))}  since {a.get('ts')}" +
                                  (f"  lamps {', '.join(lit)}" if lit else "")))
    for a in reversed(dev.alarms):
        lines.append(_line("alarm", _alarm_text(a)))
    for _name, s in sorted(dev.streams.items()):
        if s.seqs.count:
            lines.append(_line("stream", f"{s.summary()};  {s.readings} readings, {s.duplicates} dup, "
                                         f"{s.messages} msgs ({s.batches} batches), {_kib(s.bytes)}"
                                         + (f", {s.malformed} malformed" if s.malformed else "")))
        elif s.messages:
            lines.append(_line("stream", f"{s.name}: no usable readings;  {s.messages} msgs, {_kib(s.bytes)}, "
                                         f"{s.malformed} malformed"))
    if dev.other:
        lines += _wrapped("other", [f"{k} {n} msgs" for k, n in sorted(dev.other.items())])
    if dev.malformed_messages or dev.malformed_readings:
        lines.append(_line("MALFORMED", f"{dev.malformed_messages} messages, {dev.malformed_readings} readings"))
        lines += [_line("", p) for p in dev.problems]
    return lines


ALARM_DETAIL_KEYS = ("seal", "sensor", "side", "c", "limit_c", "zone", "zone_kind", "spn", "fmi",
                     *DROPPED_STREAM_KEYS, "count", "first_seq", "last_seq", "reason")


def _alarm_text(a: dict[str, Any]) -> str:
    severity = f" [{a['severity']}]" if a.get("severity") else ""
    detail = " ".join(f"{k}={a[k]}" for k in ALARM_DETAIL_KEYS if a.get(k) is not None)
    if a.get("authorised") is not None:
        detail += " authorised" if a.get("authorised") else " NOT authorised"
    return f"{a.get('ts')}  {_f(a.get('kind'))} {_f(a.get('state'))}{severity}  {detail}  (seq {a['seq']})".rstrip()


def _preview(x: Any, n: int = 60) -> str:
    text = x.decode("utf-8", errors="replace") if isinstance(x, (bytes, bytearray)) else json.dumps(x)
    return repr(text[:n] + ("..." if len(text) > n else ""))


# -- MQTT ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    """Where and how to subscribe (the command line merged with ``--config``)."""

    host: str = "127.0.0.1"
    port: int = 1883
    prefix: str = "lorry"
    device: str = "+"
    client_id: str | None = None
    keep_session: bool = False
    protocol: str = "3.1.1"
    keepalive: int = 30
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_insecure_hostname: bool = False
    username: str | None = None
    password: str | None = None

    @property
    def topic(self) -> str:
        return f"{self.prefix}/{self.device}/#"


class MqttWatch:
    """A :class:`Watcher` fed by a paho-mqtt client subscribed like the backend.

    paho's network thread (``loop_start``) reconnects with backoff after a broker loss, and
    the subscription is renewed on every connection. ``on_readings`` is called (in that
    thread) with every message's accepted readings; ``note`` with one-line events for a human.
    """

    def __init__(self, opts: Options, watcher: Watcher | None = None, *,
                 on_readings: Callable[[list[dict[str, Any]]], None] | None = None,
                 note: Callable[[str], None] | None = None,
                 reconnect: tuple[float, float] = (RECONNECT_MIN_S, RECONNECT_MAX_S)) -> None:
        self.opts = opts
        self.watcher = watcher or Watcher(opts.prefix)
        self.on_readings = on_readings
        self.note = note or (lambda _line: None)
        self.connected = False
        self.stopping = False
        self.connects = 0
        self.last_error: str | None = None
        self.subscribed = threading.Event()
        """Set once the broker granted the subscription (renewed on each connection)."""
        self.client = self._client(reconnect)

    def _client(self, reconnect: tuple[float, float]) -> mqtt.Client:
        o = self.opts
        v5 = o.protocol == "5"
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=o.client_id or f"lorry-watch-{uuid.uuid4().hex[:8]}",
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if v5 else not o.keep_session,
        )
        client.reconnect_delay_set(*reconnect)
        if o.username is not None:
            client.username_pw_set(o.username, o.password)
        if o.tls_ca is not None:
            client.tls_set(ca_certs=str(o.tls_ca),
                           certfile=str(o.tls_cert) if o.tls_cert else None,
                           keyfile=str(o.tls_key) if o.tls_key else None,
                           cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
            client.tls_insecure_set(o.tls_insecure_hostname)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        return client

    def start(self) -> None:
        o = self.opts
        kwargs: dict[str, Any] = {}
        if o.protocol == "5":
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            kwargs["clean_start"] = not o.keep_session
            if o.keep_session:
                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = 7 * 86400
                kwargs["properties"] = props
        self.client.connect_async(o.host, o.port, keepalive=o.keepalive, **kwargs)
        self.client.loop_start()

    def stop(self) -> None:
        self.stopping = True
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()

    # -- paho callbacks (network thread) --------------------------------------------------

    def _on_connect(self, client: mqtt.Client, _u: Any, flags: Any, reason: Any, _props: Any) -> None:
        o = self.opts
        if reason.is_failure:
            self._error(f"broker {o.host}:{o.port} refused the connection: {reason}")
            return
        self.connected = True
        self.connects += 1
        self.last_error = None
        resumed = " (session resumed)" if getattr(flags, "session_present", False) else ""
        self.note(f"connected to {o.host}:{o.port}{resumed}")
        client.subscribe(o.topic, qos=1)

    def _on_connect_fail(self, _client: mqtt.Client, _u: Any) -> None:
        # paho calls this inside its ``except OSError``: the exception says why (refused,
        # unreachable, a certificate the CA does not vouch for...).
        why = sys.exc_info()[1]
        self._error(f"cannot connect to {self.opts.host}:{self.opts.port}" + (f": {why}" if why else ""), "; retrying")

    def _on_disconnect(self, _client: mqtt.Client, _u: Any, _flags: Any, reason: Any, _props: Any) -> None:
        was = self.connected
        self.connected = False
        self.subscribed.clear()
        if was and not self.stopping:
            self._error(f"connection to {self.opts.host}:{self.opts.port} lost ({reason})", "; reconnecting")

    def _on_subscribe(self, _client: mqtt.Client, _u: Any, _mid: int, reasons: list[Any], _props: Any) -> None:
        if any(r.is_failure for r in reasons):
            self._error(f"the broker refused the subscription to {self.opts.topic} ({reasons[0]})")
            return
        self.note(f"subscribed to {self.opts.topic} (QoS 1)")
        self.subscribed.set()

    def _on_message(self, _client: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        content_type = getattr(msg.properties, "ContentType", None) if msg.properties is not None else None
        readings = self.watcher.on_payload(msg.topic, msg.payload, content_type, retained=bool(msg.retain))
        if readings and self.on_readings is not None:
            self.on_readings(readings)

    def _error(self, text: str, then: str = "") -> None:
        """Note a problem, once while it stays the same (paho retries every few seconds)."""
        if text != self.last_error:
            self.note(text + then)
        self.last_error = text


def _silence(out: TextIO) -> None:
    """After a broken pipe on stdout, send what is left to /dev/null (no error at exit)."""
    if out is sys.stdout:
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass


def watch(opts: Options, *, as_json: bool = False, duration: float | None = None, once: bool = False,
          interval: float = SCREEN_INTERVAL_S, out: TextIO | None = None, err: TextIO | None = None,
          stop: threading.Event | None = None, watcher: Watcher | None = None,
          reconnect: tuple[float, float] = (RECONNECT_MIN_S, RECONNECT_MAX_S)) -> int:
    """Subscribe and print until ``duration`` passed, ``once`` printed its screen, ``stop`` is
    set or Ctrl-C. Returns 0, or 1 if it never managed to subscribe."""
    out = out or sys.stdout
    err = err or sys.stderr
    stop = stop or threading.Event()
    watcher = watcher or Watcher(opts.prefix)
    out_lock = threading.Lock()

    def note(line: str) -> None:
        try:
            print(f"watch: {line}", file=err, flush=True)
        except (OSError, ValueError):
            pass

    def print_json(readings: list[dict[str, Any]]) -> None:
        try:
            with out_lock:
                out.write("".join(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n" for r in readings))
                out.flush()
        except (OSError, ValueError):  # the reader went away (| head): stop quietly
            _silence(out)
            stop.set()

    malformed_seen = 0

    def report_malformed() -> None:
        """In --json mode stdout holds readings only: problems go to stderr as they come."""
        nonlocal malformed_seen
        total = watcher.malformed
        if total > malformed_seen:
            note(f"{total - malformed_seen} malformed message(s) or reading(s); latest: {watcher.last_problem}")
            malformed_seen = total

    session = MqttWatch(opts, watcher, on_readings=print_json if as_json else None, note=note, reconnect=reconnect)
    ever_subscribed = False
    printed: tuple[Any, ...] = ()
    screens = 0

    def shown() -> tuple[Any, ...]:
        """What a screen shows that can change: the messages taken in and the link."""
        return watcher.changes, session.connected, session.last_error

    def screen(final: bool = False) -> None:
        nonlocal printed, screens
        printed = shown()
        screens += 1
        link = "final" if final else "connected" if session.connected else \
            f"DISCONNECTED ({session.last_error or 'connecting'})"
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(watcher.clock()))
        body = watcher.render()
        if not watcher.state and session.connects:
            body += NOTHING_YET_HINT
        text = f"--- {stamp}Z  {opts.host}:{opts.port} {opts.topic}  {link} ---\n{body}\n"
        try:
            with out_lock:
                out.write(text + "\n")
                out.flush()
        except (OSError, ValueError):
            _silence(out)
            stop.set()

    started = time.monotonic()
    deadline = None if duration is None else started + duration
    next_screen: float | None = None
    try:
        session.start()
        while not stop.is_set():
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                break
            if session.subscribed.is_set():
                if not ever_subscribed:
                    ever_subscribed = True
                    next_screen = now + interval  # the retained status and first messages first
            if next_screen is not None and now >= next_screen:
                next_screen = now + interval
                if as_json:
                    report_malformed()
                elif shown() != printed or (once and not screens):
                    screen()
                if once:
                    break
            stop.wait(0.05)
    except KeyboardInterrupt:
        pass
    finally:
        try:
            session.stop()
        except Exception:  # noqa: BLE001 - already going away
            pass
    if as_json:
        report_malformed()
    elif ever_subscribed and not (once and screens):
        screen(final=True)  # the state as of the end (--for, Ctrl-C), even if unchanged
    if not ever_subscribed:
        note(f"never subscribed to {opts.topic} on {opts.host}:{opts.port}"
             + (f": {session.last_error}" if session.last_error else ""))
        return 1
    return 0


# -- command line ---------------------------------------------------------------------------------


def _positive(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {text!r}")
    return v


def _port(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 1..65535: {text!r}")
    return v


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``lorry-agent watch``.

    Connection options default to None in the namespace so that :func:`main` can tell an
    option given on the command line (it wins) from one to take from ``--config`` or the
    built-in default (shown in the help).
    """
    parser.add_argument("--config", "-c", type=Path, metavar="FILE",
                        help="take host, port, prefix, device, TLS and credentials from this agent config "
                             "(e.g. /etc/lorry-agent/agent.toml); options given here win")
    parser.add_argument("--host", help="broker host (default 127.0.0.1)")
    parser.add_argument("--port", type=_port, help="broker port (default 1883)")
    parser.add_argument("--prefix", help='topic prefix (default "lorry")')
    parser.add_argument("--device", help='device id to watch (default: all devices, "+"; with --config: that device)')
    parser.add_argument("--json", action="store_true",
                        help="print every reading received as one JSON object per line (batches flattened, "
                             "in arrival order) and nothing else on stdout")
    parser.add_argument("--tls-ca", type=Path, metavar="FILE", help="CA certificate(s) the broker's must chain to (enables TLS)")
    parser.add_argument("--tls-cert", type=Path, metavar="FILE", help="client certificate (mutual TLS)")
    parser.add_argument("--tls-key", type=Path, metavar="FILE", help="client key (mutual TLS)")
    parser.add_argument("--username", help="broker user name")
    parser.add_argument("--password-file", type=Path, metavar="FILE", help="file holding the password (its first line)")
    parser.add_argument("--client-id", help="MQTT client id (default: lorry-watch-<random>); never the agent's or "
                                            "the backend's own id, or the broker disconnects one of them")
    parser.add_argument("--keep-session", action="store_true",
                        help="ask the broker to keep this client's session (needs --client-id): what is published "
                             "while watch is not running is delivered next time (default: a clean session)")
    parser.add_argument("--for", dest="duration", type=_positive, metavar="SECONDS",
                        help="exit after this long (default: until Ctrl-C)")
    parser.add_argument("--once", action="store_true", help="exit after the first state screen (for scripts)")
    parser.add_argument("--interval", type=_positive, default=SCREEN_INTERVAL_S, metavar="SECONDS",
                        help=f"seconds between state screens (default {SCREEN_INTERVAL_S:g}); a screen is only "
                             "printed when something changed")


class UsageError(Exception):
    pass


def options(args: argparse.Namespace) -> Options:
    """The command line merged with ``--config``: given options win, then the config, then
    the defaults. Raises :class:`UsageError` with a message for a human."""
    a = vars(args)
    base = Options()
    cfg_values: dict[str, Any] = {}
    if a.get("config") is not None:
        from agent import config as config_mod

        try:
            cfg = config_mod.load(a["config"])
        except config_mod.ConfigError as e:
            raise UsageError(str(e)) from None
        m = cfg.mqtt
        cfg_values = {"host": m.host, "port": m.port, "prefix": m.topic_prefix, "device": cfg.device.id,
                      "protocol": m.protocol, "username": m.username, "password_file": m.password_file}
        if m.tls is not None:
            cfg_values |= {"tls_ca": m.tls.ca_file, "tls_cert": m.tls.cert_file, "tls_key": m.tls.key_file,
                           "tls_insecure_hostname": m.tls.insecure_skip_hostname}
        # Never the agent's client id: the broker would disconnect the agent for us.

    def pick(name: str) -> Any:
        if a.get(name) is not None:
            return a[name]
        if cfg_values.get(name) is not None:
            return cfg_values[name]
        return getattr(base, name, None)

    prefix, device = pick("prefix"), pick("device")
    for what, value, wild in (("--prefix", prefix, False), ("--device", device, True)):
        if not value or "/" in value or "#" in value or ("+" in value and not (wild and value == "+")):
            raise UsageError(f"{what} {value!r}: one topic level, without '/', '#' or '+'"
                             + (' (or "+" for every device)' if wild else ""))
    password = None
    password_file = pick("password_file")
    if password_file is not None:
        try:
            text = Path(password_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read the password file {password_file}: {e}") from None
        password = text.splitlines()[0] if text else ""
    username = pick("username")
    if password is not None and username is None:
        raise UsageError("--password-file needs --username")
    tls_ca, tls_cert, tls_key = pick("tls_ca"), pick("tls_cert"), pick("tls_key")
    if (tls_cert is None) != (tls_key is None):
        raise UsageError("--tls-cert and --tls-key go together")
    if tls_cert is not None and tls_ca is None:
        raise UsageError("--tls-cert needs --tls-ca")
    for path in (tls_ca, tls_cert, tls_key):
        if path is not None and not os.access(path, os.R_OK):
            raise UsageError(f"cannot read {path}")
    if a.get("keep_session") and not a.get("client_id"):
        raise UsageError("--keep-session needs --client-id (a session belongs to a client id)")
    return Options(host=pick("host"), port=pick("port"), prefix=prefix, device=device,
                   client_id=a.get("client_id"), keep_session=bool(a.get("keep_session")),
                   protocol=pick("protocol"), tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key,
                   tls_insecure_hostname=bool(pick("tls_insecure_hostname")),
                   username=username, password=password)


def main(args: argparse.Namespace) -> int:
    """``lorry-agent watch``: 0 when done (``--for``, ``--once``, Ctrl-C), 1 if it never got
    subscribed, 2 for unusable options."""
    try:
        opts = options(args)
    except UsageError as e:
        print(f"lorry-agent watch: {e}", file=sys.stderr)
        return 2
    try:
        return watch(opts, as_json=bool(getattr(args, "json", False)), duration=getattr(args, "duration", None),
                     once=bool(getattr(args, "once", False)),
                     interval=getattr(args, "interval", None) or SCREEN_INTERVAL_S)
    except (ssl.SSLError, OSError, ValueError) as e:  # e.g. a TLS file paho cannot load
        print(f"lorry-agent watch: cannot set up the connection: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    _p = argparse.ArgumentParser(prog="lorry-agent watch", description=__doc__.split("\n\n")[0])
    add_arguments(_p)
    sys.exit(main(_p.parse_args()))
