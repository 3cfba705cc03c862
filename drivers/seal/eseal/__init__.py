"""E-seal reader line protocols, by name (``[[seals]] protocol``).

A reader on RS-232/RS-485 speaks some line protocol; ``drivers/seal/serial.py`` owns the port,
the reopening and the events, and asks a protocol object only to turn one line into an
:class:`EsealMessage`. Adding a vendor's protocol is one module here with one class (``parse``,
and ``terminator`` if its lines do not end in LF) and one line in ``PROTOCOLS``; ``generic``
is the reference. Modules are named as strings and imported only when a config uses them.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import ClassVar, Literal, Protocol

PROTOCOLS: dict[str, str] = {
    "generic": "drivers.seal.eseal.generic:GenericProtocol",
}

SealState = Literal["sealed", "opened", "tampered"]
SEAL_STATES: tuple[SealState | None, ...] = ("sealed", "opened", "tampered", None)
SEAL_ID = re.compile(r"[A-Za-z0-9._:-]{1,32}")
"""What a seal id may be (the number printed on the seal), whatever the protocol: the driver
refuses a message from any protocol whose id does not match."""


@dataclass(frozen=True, slots=True)
class EsealMessage:
    """What one line from a reader says about one seal.

    There is deliberately no time in it: a seal's or reader's own clock (unset after a battery
    change, or simply wrong) is never believed. The driver notes when the line arrived and the
    agent stamps the event with its trusted clock; a protocol whose lines carry a time drops it.
    The driver checks every message it is handed (``seal_id`` against ``SEAL_ID``, ``state``,
    ``battery_pct`` an int within agent/model/ranges.py ``battery_pct``), whatever the protocol.
    """

    seal_id: str
    state: SealState | None
    """None for a heartbeat: the seal is alive, its state has not changed."""
    battery_pct: int | None


class BadLine(ValueError):
    """A line that is not a valid message. ``reason`` is the status counter it goes to
    (``bad_checksum``, ``garbage``, ``unknown_state``, ``bad_field``; the driver counts any
    other as ``garbage``); the text says why."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class EsealProtocol(Protocol):
    terminator: ClassVar[bytes]
    """What ends a line on the wire (the driver splits on it)."""

    def parse(self, line: bytes) -> EsealMessage | None:
        """The message in ``line`` (terminator removed); None for a blank line; BadLine for
        anything else. Never any other exception: the line came off a wire."""
        ...


class UnknownProtocol(LookupError):
    pass


def protocol_class(name: str) -> type[EsealProtocol]:
    """The class registered as ``name``; an unknown name lists the known ones."""
    target = PROTOCOLS.get(name)
    if target is None:
        raise UnknownProtocol(f"unknown e-seal protocol {name!r}; known: {', '.join(sorted(PROTOCOLS))}")
    module, cls = target.split(":")
    found: type[EsealProtocol] = getattr(importlib.import_module(module), cls)
    return found
