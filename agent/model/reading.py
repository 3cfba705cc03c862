"""The reading: what every driver produces and every other part of the agent carries."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

# Keys every payload object starts with; stream data may not override them. `ts_trusted`
# (false) is added when the time could not be established.
ENVELOPE_KEYS = ("device", "stream", "seq", "ts", "ts_trusted")
# Stands for the time in a held reading's body until the time is known (Store.release_held).
PENDING_TS = '"ts":"pending"'


@dataclass(slots=True, frozen=True)
class Reading:
    stream: str
    """Its topic's last level; what the agent does with a stream is in the stream catalogue
    (agent/model/streams.py)."""
    ts_ms: int | None
    """When the reading was taken: Unix time in milliseconds, UTC; None while the time is not
    known (a Pi without RTC before GPS or NTP): the store holds it until it is."""
    data: dict[str, Any] = field(default_factory=dict)
    urgent: bool = False
    """Made power-cut safe and sent at once (seal events, alarms)."""
    meta: dict[str, Any] = field(default_factory=dict, compare=False)
    """For the pipeline, never published: ``mono_ns`` (when it was taken, monotonic clock),
    ``mode`` (GPS fix mode 2/3), ``source`` (a replay, a live device)."""


def iso_ms(ts_ms: int) -> str:
    """ISO 8601 UTC with milliseconds: ``2026-11-24T03:00:00.123Z``."""
    secs, ms = divmod(ts_ms, 1000)
    t = time.gmtime(secs)
    return (
        f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}T"
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}.{ms:03d}Z"
    )


def encode_parts(device: str, reading: Reading) -> tuple[str, str]:
    """The reading's JSON object split around its seq, which the store assigns at commit.

    ``head + str(seq) + tail`` is the payload object of docs/contract.md. Encoding here, in
    the producer's thread, rejects a reading that cannot be JSON (NaN, a stray object) before
    it takes a seq, with ValueError/TypeError.
    """
    clash = [k for k in ENVELOPE_KEYS if k in reading.data]
    if clash:
        raise ValueError(f"reading data may not set envelope keys {clash}")
    head = f'{{"device":{_dumps(device)},"stream":{_dumps(reading.stream)},"seq":'
    fields = _dumps(reading.data)
    tail = "," + (PENDING_TS if reading.ts_ms is None else f'"ts":"{iso_ms(reading.ts_ms)}"')
    tail += "}" if fields == "{}" else "," + fields[1:]
    return head, tail


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def resolved_body(body: str, ts_ms: int, trusted: bool) -> str:
    """A held reading's body with its time filled in (and flagged when not trustworthy)."""
    ts = f'"ts":"{iso_ms(ts_ms)}"' + ("" if trusted else ',"ts_trusted":false')
    return body.replace(PENDING_TS, ts, 1)


def now_ms() -> int:
    return time.time_ns() // 1_000_000
