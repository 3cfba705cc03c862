"""The state of every device, fed one MQTT message at a time (no MQTT here, no threads)."""

from __future__ import annotations

import bisect
import json
import threading
import time
from collections.abc import Callable
from typing import Any

from agent.tools.watch.decoding import DecodeError, decode
from agent.tools.watch.render import device_lines
from agent.tools.watch.state import DROPPED_STREAM_KEYS, DeviceState, newer

RECENT_ALARMS = 10
RECENT_PROBLEMS = 5
NON_READING_TOPICS = frozenset({"status", "cmd"})
"""Single-level topics under a device that carry no readings (``cmd/reply`` has two levels)."""


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

    def on_payload(self, topic: str, payload: bytes | bytearray, content_type: str | None = None,
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
            if newer(r, stats.latest):
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
            if newer(r, dev.seals.get(name)):
                dev.seals[name] = r
        elif stream == "temperature":
            name = str(r.get("sensor"))
            if r.get("error") is not None:
                dev.temperature_errors[name] += 1
            if newer(r, dev.temperatures.get(name)):
                dev.temperatures[name] = r
        elif stream == "can":
            values = r.get("values")
            for v in values if isinstance(values, list) else []:
                if not isinstance(v, dict):
                    continue
                key = (str(v.get("name")), v.get("sa"))
                if newer(r, dev.can.get(key)):
                    dev.can[key] = {**v, "seq": r["seq"], "ts": r["ts"]}
        elif stream == "health":
            if newer(r, dev.health):
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
            if newer(r, dev.dtcs.get(key)):
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
                return "\n".join(device_lines(dev, now))
            except Exception as e:  # noqa: BLE001 - a bad value must not stop the screen
                return f"{dev.id}: cannot show this device ({type(e).__name__}: {e})"


def _preview(x: Any, n: int = 60) -> str:
    text = x.decode("utf-8", errors="replace") if isinstance(x, (bytes, bytearray)) else json.dumps(x)
    return repr(text[:n] + ("..." if len(text) > n else ""))
