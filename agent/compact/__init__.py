"""The compact encoding of a batch of readings: columnar, delta-encoded, self-described CBOR.

One message is one CBOR item (RFC 8949) behind the self-describe tag 55799 (bytes ``d9 d9 f7``),
so a subscriber tells it from JSON by its first byte even over MQTT 3.1.1, where there is no
content type. The item is a map ``{"v": 1, "n": count, "cols": {field: column, …}}``: one column
per field, in the readings' key order, each coded by the cheapest of a few kinds (a constant, an
integer or scaled-decimal series stored as k-th differences, ISO times as milliseconds, plain
values). Lossless: agent/compact/decoder.py :func:`decode` gives back exactly what ``json.loads`` gave for each body
(types, key order, nulls, absent keys). The format, for a backend: docs/compact.md.

The package: agent/compact/format.py (constants, limits, the value check both sides share),
agent/compact/encoder.py (:func:`encode`, on the device's hot path), agent/compact/decoder.py
(:func:`decode`, for the backend's side: import it from there; the device never loads it).
"""

from __future__ import annotations

from agent.compact.encoder import _ts_ms, encode
from agent.compact.format import (
    CONST,
    CONTENT_TYPE,
    EXACT,
    FLOAT,
    INT,
    MAGIC,
    MAX_CELLS,
    MAX_DEPTH,
    MAX_E,
    MAX_K,
    MAX_READINGS,
    MAX_TS_MS,
    PATCHED,
    PLAIN,
    SAFE,
    TIME,
    TYPED,
    UNDEFINED,
    VERSION,
    CompactError,
    is_compact,
)

__all__ = [
    "CONST", "CONTENT_TYPE", "EXACT", "FLOAT", "INT", "MAGIC", "MAX_CELLS", "MAX_DEPTH", "MAX_E", "MAX_K",
    "MAX_READINGS", "MAX_TS_MS", "PATCHED", "PLAIN", "SAFE", "TIME", "TYPED", "UNDEFINED", "VERSION",
    "CompactError", "_ts_ms", "encode", "is_compact",
]
