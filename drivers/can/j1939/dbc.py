"""A fleet's own DBC files, decoded with cantools, matched to frames by PGN.

J1939 DBCs name a message by a full identifier (priority and source address included), but
the same PGN arrives from whichever ECU sends it: frames are matched on the PGN alone.
cantools knows nothing of J1939's "not available" and "error" values, so they are filtered
here the J1939 way: a most significant byte of 0xFB..0xFF, or an all-ones / all-ones-minus-
one field narrower than a byte, is not a number.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import cantools

from drivers.can.j1939.ids import parse_id

if TYPE_CHECKING:
    from cantools.typechecking import SignalDictType


@dataclass(frozen=True, slots=True)
class DbcSignal:
    name: str
    spn: int | None
    unit: str
    deadband: float
    scale: float
    offset: float
    length: int


class DbcMessage:
    """One DBC message: decodes all its signals from a frame's data at once."""

    def __init__(self, message: cantools.database.can.Message):
        self.message = message
        self.pgn = parse_id(message.frame_id).pgn
        self.signals = [
            DbcSignal(s.name, s.spn or None, s.unit or "", 0.0, float(s.scale), float(s.offset), s.length)
            for s in message.signals
        ]

    def decode(self, data: bytes) -> list[float | None]:
        try:
            # Not a container message (decode_containers is off): a dict of signals.
            raw = cast("SignalDictType", self.message.decode(data, decode_choices=False, scaling=False))
        except Exception:  # noqa: BLE001 - cantools raises several types for short/odd frames
            return [None] * len(self.signals)
        out: list[float | None] = []
        for s in self.signals:
            r = raw.get(s.name)
            if not isinstance(r, int) or _not_a_number(r, s.length):
                out.append(None)
            else:
                v = r * s.scale + s.offset
                out.append(round(v, 6) if s.scale != 1 else v)
        return out


def _not_a_number(raw: int, length: int) -> bool:
    if length >= 8:
        return (raw >> (length - 8)) & 0xFF >= 0xFB
    return raw >= (1 << length) - 2


def load(paths: list[Path]) -> dict[int, DbcMessage]:
    """Messages by PGN; a later file overrides an earlier one for the same PGN."""
    by_pgn: dict[int, DbcMessage] = {}
    for path in paths:
        # A DBC file gives a CAN database (a .cdd would give a diagnostics one, without messages).
        db = cast(cantools.database.can.Database, cantools.database.load_file(str(path), strict=False))
        for message in db.messages:
            if message.is_extended_frame:
                m = DbcMessage(message)
                by_pgn[m.pgn] = m
    return by_pgn
