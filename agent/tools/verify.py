"""``lorry-agent verify-chain``: prove that no seal or alarm event was deleted, altered or
reordered between the lorry and a customs record (the scheme: agent/model/chain.py, docs/chain.md).

Input: a file of received events, one JSON value per line — a reading object, a batch (an
array of them), or a ``{"topic": ..., "payload": ...}`` line as ``run --dry-run`` and
``watch --json`` print. Messages delivered twice (QoS 1) are fine when identical.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.model.chain import CHAIN_FIELDS, canonical, genesis


@dataclass
class ChainReport:
    device: str
    events: int = 0
    first: int | None = None
    last: int | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def events_in(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    """Every chained event in the input, whatever the wrapping."""
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"line {n}: not JSON") from None
        if isinstance(value, dict) and "payload" in value and "topic" in value:
            value = value["payload"]
            if isinstance(value, str):
                value = json.loads(value)
        for obj in value if isinstance(value, list) else [value]:
            if isinstance(obj, dict) and "chain_seq" in obj:
                yield obj


def verify(events: Iterable[dict[str, Any]], key: bytes | None = None, partial: bool = False) -> list[ChainReport]:
    by_device: dict[str, dict[int, dict[str, Any]]] = {}
    reports: dict[str, ChainReport] = {}
    for e in events:
        device = str(e.get("device"))
        report = reports.setdefault(device, ChainReport(device))
        seen = by_device.setdefault(device, {})
        n = e.get("chain_seq")
        if not isinstance(n, int):
            report.problems.append(f"an event without a valid chain_seq: {_short(e)}")
            continue
        if n in seen:
            if seen[n] != e:
                report.problems.append(f"chain_seq {n}: two different events carry it (altered)")
            continue
        seen[n] = e
    for device, seen in by_device.items():
        _check(reports[device], seen, key, partial)
    return list(reports.values())


def _check(report: ChainReport, seen: dict[int, dict[str, Any]], key: bytes | None, partial: bool) -> None:
    order = sorted(seen)
    report.events = len(order)
    if not order:
        return
    report.first, report.last = order[0], order[-1]
    if order[0] != 1 and not partial:
        report.problems.append(f"events 1..{order[0] - 1} are missing (the record starts at {order[0]})")
    prev_seq, prev_hash = (0, genesis(report.device)) if order[0] == 1 else (None, None)
    for n in order:
        e = seen[n]
        body = {k: v for k, v in e.items() if k not in CHAIN_FIELDS}
        data = canonical(body).encode()
        if hashlib.sha256(data).hexdigest() != e.get("hash"):
            report.problems.append(f"chain_seq {n}: content does not match its hash (altered)")
        if key is not None and not hmac.compare_digest(
            hmac.new(key, data, hashlib.sha256).hexdigest(), str(e.get("hmac", ""))
        ):
            report.problems.append(f"chain_seq {n}: HMAC wrong or missing (not written by this device's key)")
        if prev_seq is not None and n != prev_seq + 1:
            report.problems.append(f"events {prev_seq + 1}..{n - 1} are missing (deleted or not received)")
        elif prev_hash is not None and e.get("prev_hash") != prev_hash:
            report.problems.append(f"chain_seq {n}: does not follow {n - 1} (altered or reordered)")
        prev_seq, prev_hash = n, e.get("hash")


def render(reports: list[ChainReport]) -> str:
    if not reports:
        return "no chained events found"
    lines = []
    for r in reports:
        span = f"chain_seq {r.first}..{r.last}" if r.events else "no events"
        lines.append(f"{r.device}: {r.events} events, {span}: {'OK' if r.ok else 'BROKEN'}")
        lines += [f"  {p}" for p in r.problems]
    return "\n".join(lines)


def verify_file(path: Path, key: bytes | None, partial: bool) -> list[ChainReport]:
    with open(path, encoding="utf-8") as f:
        return verify(events_in(f), key, partial)


def _short(e: dict[str, Any]) -> str:
    return json.dumps(e)[:120]
