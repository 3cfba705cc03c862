"""The tamper-evident event chain for seal and alarm events (docs/chain.md).

Which streams are chained is the ``chained`` column of the stream catalogue
(agent/model/streams.py). Each chained event gets ``chain_seq`` (1, 2, 3… across the device's
seal and alarm events), ``prev_hash`` (the previous event's hash; the first one links to a
genesis hash of the device id) and ``hash`` = SHA-256 of the event's canonical JSON without
``hash`` and ``hmac``. With a per-device key, ``hmac`` = HMAC-SHA256 of the same bytes.
Canonical JSON is RFC 8785 (JCS): keys sorted, no whitespace, numbers as ECMAScript prints
them — so a backend in any language recomputes the same bytes from the parsed object.

Deleting, altering or reordering an event breaks the links that follow it; without the key
nobody can forge a consistent replacement chain.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
from decimal import Decimal
from pathlib import Path
from typing import Any, overload

from agent.model.secrets import read_secret

CHAIN_FIELDS = ("hash", "hmac")


@overload
def read_key(path: Path, private: bool = True) -> bytes: ...


@overload
def read_key(path: Path | None, private: bool = True) -> bytes | None: ...


def read_key(path: Path | None, private: bool = True) -> bytes | None:
    """The per-device HMAC key: the file's bytes, surrounding whitespace stripped. On the
    device (``private``) the file must not be readable by everyone."""
    if path is None:
        return None
    key = (read_secret(path) if private else path.read_bytes()).strip()
    if len(key) < 16:
        raise ValueError(f"{path}: an HMAC key needs at least 16 bytes")
    return key


def genesis(device: str) -> str:
    return hashlib.sha256(f"lorry-agent chain genesis:{device}".encode()).hexdigest()


class Chain:
    """Links events in the order they are committed; its state lives in the store's
    transaction (``state()`` / ``restore()``), so a crash cannot fork it."""

    def __init__(self, device: str, key: bytes | None = None):
        self.device = device
        self.key = key
        self.seq = 0
        self.last = genesis(device)

    def state(self) -> tuple[int, str]:
        return self.seq, self.last

    def restore(self, seq: int, last: str) -> None:
        self.seq, self.last = seq, last

    def link(self, body: str) -> str:
        """The event body with its chain fields added (and the chain advanced)."""
        obj = json.loads(body)
        obj["chain_seq"] = self.seq + 1
        obj["prev_hash"] = self.last
        data = canonical(obj).encode()
        digest = hashlib.sha256(data).hexdigest()
        obj["hash"] = digest
        if self.key is not None:
            obj["hmac"] = hmac.new(self.key, data, hashlib.sha256).hexdigest()
        self.seq += 1
        self.last = digest
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def canonical(obj: Any) -> str:
    """RFC 8785 JSON Canonicalization Scheme."""
    if isinstance(obj, dict):
        items = sorted(obj.items(), key=lambda kv: kv[0].encode("utf-16-be"))
        return "{" + ",".join(f"{_string(k)}:{canonical(v)}" for k, v in items) + "}"
    if isinstance(obj, list):
        return "[" + ",".join(canonical(v) for v in obj) + "]"
    if isinstance(obj, str):
        return _string(obj)
    if obj is True:
        return "true"
    if obj is False:
        return "false"
    if obj is None:
        return "null"
    if isinstance(obj, int):
        return _number(float(obj)) if abs(obj) >= 2**53 else str(obj)
    if isinstance(obj, float):
        return _number(obj)
    raise TypeError(f"not JSON: {type(obj).__name__}")


def _string(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def _number(x: float) -> str:
    """ECMAScript Number.prototype.toString for a double (what JCS requires)."""
    if not math.isfinite(x):
        raise ValueError("NaN and infinities are not JSON")
    if x == 0:
        return "0"
    r = repr(x)  # shortest round-trip digits, like ECMAScript
    d = Decimal(r)
    exponent = d.adjusted()  # position of the first significant digit
    sign = "-" if x < 0 else ""
    digits = "".join(map(str, d.as_tuple().digits)).rstrip("0") or "0"
    if -7 < exponent < 21:
        s = format(abs(d), "f")
        if "." in s:
            s = s.rstrip("0").rstrip(".")
        return sign + s
    tail = digits[1:]
    return f"{sign}{digits[0]}{'.' + tail if tail else ''}e{'+' if exponent > 0 else '-'}{abs(exponent)}"
