"""One MQTT message's payload → its readings: JSON (one reading or a batch) or a compact
CBOR batch (docs/compact.md). The only part of ``watch`` that knows payload encodings."""

from __future__ import annotations

import json
from typing import Any

from agent import compact
from agent.compact.decoder import decode as decode_compact

JSON_CONTENT_TYPES = frozenset({"application/json", "text/json"})


class DecodeError(ValueError):
    """A payload that is not one reading or a batch of readings."""


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed (docs/contract.md: no NaN or infinities)")


def decode(payload: bytes | bytearray, content_type: str | None = None) -> list[dict[str, Any]]:
    """One message's readings, in order: a JSON object (one reading) or array (a batch), or a
    compact batch (docs/compact.md).

    ``content_type`` is the message's MQTT 5 content type, or None (MQTT 3.1.1, or not set).
    ``application/cbor`` is a compact batch; without a content type, so is a payload that
    starts with the self-describe tag (bytes d9 d9 f7, which no JSON text starts with);
    anything else is JSON. Raises :class:`DecodeError` for anything that is not readings.
    """
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    if kind == compact.CONTENT_TYPE or (not kind and compact.is_compact(payload)):
        try:
            return decode_compact(payload)
        except compact.CompactError as e:
            raise DecodeError(f"content type {content_type!r}: {e}" if content_type else str(e)) from None
    if kind and kind not in JSON_CONTENT_TYPES:
        raise DecodeError(f"unsupported content type {content_type!r}")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DecodeError(f"not UTF-8: {e}") from None
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except ValueError as e:  # json.JSONDecodeError is a ValueError
        raise DecodeError(f"not JSON: {e}") from None
    if isinstance(obj, dict):
        return [obj]
    if isinstance(obj, list):
        if not obj:
            raise DecodeError("an empty batch")
        for i, item in enumerate(obj):
            if not isinstance(item, dict):
                raise DecodeError(f"batch item {i + 1} is a JSON {_json_type(item)}, not an object")
        return obj
    raise DecodeError(f"a JSON {_json_type(obj)}, not an object or an array")


def _json_type(x: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(x), "number")
