"""What the compact encoder and decoder share: the format's constants, limits and value check.

docs/compact.md describes the format; agent/compact/encoder.py writes it (on the device),
agent/compact/decoder.py reads it (the backend's side: ``lorry-agent watch``, tests).
"""

from __future__ import annotations

import sys
from array import array
from typing import Any

import cbor2

CONTENT_TYPE = "application/cbor"
"""The MQTT 5 content type of compact messages."""
MAGIC = b"\xd9\xd9\xf7"
"""Tag 55799 (self-described CBOR): the first three bytes of every compact message."""
VERSION = 1

# Column kinds: the first element of a column array (docs/compact.md, "Columns").
CONST, PLAIN, INT, FLOAT, TIME, PATCHED = range(6)

MAX_READINGS = 100_000
MAX_CELLS = 1_000_000
"""Readings × columns, and the nodes a constant container is copied into: what a decoder
builds is bounded whatever a small hostile payload claims."""
MAX_DEPTH = 64
"""Nesting of a value inside a reading (the agent's readings nest two or three levels)."""
MAX_E = 9
MAX_K = 2
EXACT = 2**53
"""Integers a decoder meets (values and stored differences) stay within ±2^53, so every one
is an exact double: a JavaScript decoder may use plain Numbers."""
SAFE = 2**52
"""Values the encoder puts in a numeric column: their differences then stay within EXACT."""
MAX_TS_MS = 253_402_300_800_000  # 10000-01-01T00:00:00.000Z: ISO years have four digits

UNDEFINED = cbor2.undefined
"""CBOR ``undefined`` (simple value 23): the reading lacks the key."""


def _int32_code(signed: bool) -> str:
    for code in ("i", "l") if signed else ("I", "L"):
        if array(code).itemsize == 4:
            return code
    raise ImportError("no 4-byte array typecode on this platform")


# RFC 8746 typed arrays, little endian only: tag → (array typecode, bytes per item).
TYPED: dict[int, tuple[str, int]] = {
    64: ("B", 1), 69: ("H", 2), 70: (_int32_code(False), 4),
    72: ("b", 1), 77: ("h", 2), 78: (_int32_code(True), 4),
}
BIG_ENDIAN = sys.byteorder == "big"
POW = [float(10**e) for e in range(MAX_E + 1)]


class CompactError(ValueError):
    """Not a compact message (decode), or readings that cannot be one (encode)."""


def is_compact(payload: bytes | bytearray) -> bool:
    """Starts with the self-describe tag (JSON never starts with byte 0xd9)."""
    return bytes(payload[:3]) == MAGIC


class Budget:
    """Nodes a decoder may still validate: a well-formed payload spends at most a node per
    byte, so value sharing (CBOR tags 28/29) cannot make validation blow up."""

    __slots__ = ("left",)

    def __init__(self, left: int) -> None:
        self.left = left


def check(v: Any, absent_ok: bool = False, budget: Budget | None = None, depth: int = 0) -> int:
    """A JSON value as cbor2 decodes one (UNDEFINED too at the top when ``absent_ok``):
    its node count, or CompactError."""
    if budget is not None:
        budget.left -= 1
        if budget.left < 0:
            raise CompactError("more values than the payload can hold (shared references?)")
    t = type(v)
    if t is str or t is int or t is bool or v is None:
        return 1
    if t is float:
        if v - v != 0:
            raise CompactError(f"{v} is not JSON (no NaN or infinities)")
        return 1
    if v is UNDEFINED and absent_ok:
        return 1
    if depth >= MAX_DEPTH:
        raise CompactError(f"nested deeper than {MAX_DEPTH}")
    if t is list:
        return 1 + sum(check(x, budget=budget, depth=depth + 1) for x in v)
    if t is dict:
        nodes = 1
        for k, x in v.items():
            if type(k) is not str:
                raise CompactError(f"a map key {k!r} is not a text string")
            nodes += check(x, budget=budget, depth=depth + 1)
        return nodes
    raise CompactError(f"a {t.__name__} is not a JSON value")
