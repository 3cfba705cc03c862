"""The generic e-seal line protocol: what a reader (or a gateway in front of a vendor's reader)
sends when no vendor module fits. ASCII, one message per line, ended by LF (CR LF accepted)::

    $SEAL,<seal_id>,<state>,<battery_pct>*hh

- ``seal_id``: 1-32 of ``A-Z a-z 0-9 . _ : -`` (the number printed on the seal).
- ``state``: ``SEALED``, ``OPEN`` (→ opened), ``TAMPER`` or ``CUT`` (→ tampered), or ``HB``: a
  heartbeat, the seal is alive and its state unchanged. Case is ignored.
- ``battery_pct``: 0-100, or empty when the seal does not report it.
- ``hh``: the NMEA 0183 checksum, two hex digits: the XOR of every byte between ``$`` and ``*``.

Example: ``$SEAL,ES-001234,SEALED,87*1D``. Anything before the last ``$`` is ignored (noise as a
reader powers up). A bad line raises BadLine with its reason: ``garbage`` (no ``$...*hh``
frame, not ASCII, not a SEAL message), ``bad_checksum``, ``unknown_state``, ``bad_field``
(wrong field count, a bad seal id or battery value). A line carries no time: one with an
extra field (a reader's own timestamp, say) is ``bad_field``, never a time to believe.
"""

from __future__ import annotations

import re
from functools import reduce
from operator import xor

from drivers.seal.eseal import SEAL_ID, BadLine, EsealMessage, SealState

STATES: dict[str, SealState | None] = {
    "SEALED": "sealed",
    "OPEN": "opened",
    "TAMPER": "tampered",
    "CUT": "tampered",
    "HB": None,
}
HEX = re.compile(rb"[0-9A-Fa-f]{2}")


class GenericProtocol:
    terminator = b"\n"

    def parse(self, line: bytes) -> EsealMessage | None:
        line = line.strip()
        if not line:
            return None
        start = line.rfind(b"$")
        star = line.rfind(b"*")
        if start < 0 or star < start or not HEX.fullmatch(line[star + 1 :]):
            raise BadLine("garbage", f"no $...*hh frame in {line[:40]!r}")
        body = line[start + 1 : star]
        if not body.isascii():
            raise BadLine("garbage", f"not ASCII: {body[:40]!r}")
        want, got = reduce(xor, body, 0), int(line[star + 1 :], 16)
        if want != got:
            raise BadLine("bad_checksum", f"checksum {got:02X}, computed {want:02X}")
        fields = body.decode("ascii").split(",")
        if fields[0] != "SEAL":
            raise BadLine("garbage", f"not a SEAL message: {fields[0][:20]!r}")
        if len(fields) != 4:
            raise BadLine("bad_field", f"{len(fields)} fields, expected 4")
        _, seal_id, state, battery = fields
        if not SEAL_ID.fullmatch(seal_id):
            raise BadLine("bad_field", f"bad seal id {seal_id[:40]!r}")
        if state.upper() not in STATES:
            raise BadLine("unknown_state", f"unknown state {state[:20]!r}")
        if battery and not (battery.isdigit() and len(battery) <= 3 and int(battery) <= 100):
            raise BadLine("bad_field", f"battery {battery[:20]!r} is not 0-100")
        return EsealMessage(seal_id, STATES[state.upper()], int(battery) if battery else None)


def sentence(seal_id: str, state: str, battery_pct: int | None = None) -> bytes:
    """One line of the protocol (``state`` as on the wire: SEALED, OPEN, ...): for tests and
    bench simulators of a reader."""
    body = f"SEAL,{seal_id},{state},{'' if battery_pct is None else battery_pct}".encode("ascii")
    return b"$%s*%02X\r\n" % (body, reduce(xor, body, 0))
