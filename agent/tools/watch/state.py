"""What is known about each device from what it published: per stream (:class:`StreamStats`)
and per device (:class:`DeviceState`). Plain data; :class:`~agent.tools.watch.watcher.Watcher`
fills it."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from agent.tools.watch.seqset import SeqSet, format_ranges, size, subtract

DROPPED_STREAM_KEYS = ("dropped_stream",)
"""The field of a ``data_dropped`` alarm naming the stream that lost readings. (docs/cargo.md
calls it ``stream``, but that is the envelope's field, ``alarm`` on this stream, and the agent
refuses to encode a reading whose data sets it.)"""


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
        return subtract(self.seqs.missing(), self.dropped)

    @property
    def missing(self) -> int:
        return size(self.missing_ranges())

    def summary(self) -> str:
        """``position: 1..1176, missing 3 (5, 17-18)``."""
        if not self.seqs.count:
            return f"{self.name}: no readings"
        text = f"{self.name}: {self.seqs.lowest}..{self.seqs.highest}"
        gaps = self.missing_ranges()
        text += f", missing {size(gaps)} ({format_ranges(gaps)})" if gaps else ", no gaps"
        if self.dropped:
            text += f", dropped by the device {size(self.dropped)} ({format_ranges(self.dropped)})"
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
    """The last ``watcher.RECENT_ALARMS`` alarms by seq, oldest first."""
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
        return lookup(self.health, "buffer", "pending")

    @property
    def vin(self) -> Any:
        return lookup(self.health, "vehicle", "vin")

    @property
    def missing(self) -> int:
        """Readings missing over all streams (announced drops excepted)."""
        return sum(s.missing for s in self.streams.values())


def lookup(d: Any, *path: str) -> Any:
    """``d[path[0]][path[1]]...``, or None where a level is missing or not an object."""
    for key in path:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


def newer(reading: dict[str, Any], than: dict[str, Any] | None) -> bool:
    """Whether ``reading`` has a higher seq than ``than`` (or there is nothing yet)."""
    return than is None or reading["seq"] > than.get("seq", 0)
