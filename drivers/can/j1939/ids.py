"""29-bit J1939 identifiers → priority, PGN, source and destination address."""

from __future__ import annotations

from typing import NamedTuple

GLOBAL = 0xFF
REQUEST_PGN = 59904  # 0xEA00
TP_CM_PGN = 60416  # 0xEC00
TP_DT_PGN = 60160  # 0xEB00


class J1939Id(NamedTuple):
    priority: int
    pgn: int
    sa: int
    da: int
    """Destination: the PS byte for PDU1 (PF < 240) PGNs, global (0xFF) for PDU2 broadcasts."""


def parse_id(can_id: int) -> J1939Id:
    """PDU1 (PF < 240): PS is a destination address and not part of the PGN; PDU2: PS is the
    group extension. EDP and DP are the top bits of the PGN."""
    pf = (can_id >> 16) & 0xFF
    ps = (can_id >> 8) & 0xFF
    pgn = (can_id >> 8) & 0x3FFFF
    if pf < 240:
        return J1939Id((can_id >> 26) & 0x7, pgn & 0x3FF00, can_id & 0xFF, ps)
    return J1939Id((can_id >> 26) & 0x7, pgn, can_id & 0xFF, GLOBAL)


def make_id(priority: int, pgn: int, sa: int, da: int = GLOBAL) -> int:
    """The identifier to send ``pgn`` from ``sa`` (to ``da`` for PDU1 PGNs)."""
    if (pgn >> 8) & 0xFF < 240:
        pgn = (pgn & 0x3FF00) | da
    return (priority & 0x7) << 26 | (pgn & 0x3FFFF) << 8 | (sa & 0xFF)


PDU1_PGN_MASK = 0x3FF0000
"""The identifier bits of a PDU1 PGN (EDP, DP, PF): the PS byte is a destination, not the PGN."""
PDU2_PGN_MASK = 0x3FFFF00
"""The identifier bits of a PDU2 PGN (EDP, DP, PF, PS as group extension)."""


def pgn_match(pgn: int) -> tuple[int, int] | None:
    """``(can_id, mask)`` on a 29-bit identifier that matches exactly the identifiers whose
    :func:`parse_id` PGN is ``pgn``, whatever their priority, source and (PDU1) destination;
    None when no identifier has that PGN (beyond 18 bits, or PDU1 with a non-zero low byte)."""
    if not 0 <= pgn <= 0x3FFFF:
        return None
    if (pgn >> 8) & 0xFF < 240:
        return (pgn << 8, PDU1_PGN_MASK) if pgn & 0xFF == 0 else None
    return pgn << 8, PDU2_PGN_MASK
