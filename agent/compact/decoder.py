"""The compact decoder: one compact message → the readings, exactly as ``json.loads`` gave them.

It reads what a hostile sender may have written: every shape is checked, what it builds is
bounded (MAX_READINGS, MAX_CELLS, a node budget), and anything malformed is a CompactError.
"""

from __future__ import annotations

import io
from array import array
from itertools import accumulate
from typing import Any

import cbor2

from agent.compact.format import (
    BIG_ENDIAN,
    CONST,
    EXACT,
    FLOAT,
    INT,
    MAGIC,
    MAX_CELLS,
    MAX_E,
    MAX_K,
    MAX_READINGS,
    MAX_TS_MS,
    PATCHED,
    PLAIN,
    POW,
    TIME,
    TYPED,
    UNDEFINED,
    VERSION,
    Budget,
    CompactError,
    check,
)
from agent.model.reading import iso_ms


def decode(payload: bytes | bytearray) -> list[dict[str, Any]]:
    """The readings, in order; CompactError for anything malformed (never another exception
    type, never a bogus reading)."""
    try:
        return _decode(bytes(payload))
    except CompactError:
        raise
    except Exception as e:  # noqa: BLE001 - hostile input: whatever cbor2 or a bad shape raises
        raise CompactError(f"malformed compact message ({type(e).__name__}: {e})") from e


def _decode(data: bytes) -> list[dict[str, Any]]:
    if data[:3] != MAGIC:
        raise CompactError("not a compact message (it does not start with the self-describe tag d9d9f7)")
    fp = io.BytesIO(data)
    fp.seek(3)  # the tag is ours to check; cbor2 6 would decode what it wraps as immutable
    msg = cbor2.CBORDecoder(fp).decode()
    if fp.tell() != len(data):
        raise CompactError(f"{len(data) - fp.tell()} bytes after the message")
    if type(msg) is not dict:
        raise CompactError("the message is not a CBOR map")
    unknown = set(msg) - {"v", "n", "cols", "order"}
    if unknown:
        raise CompactError(f"unknown keys {sorted(map(str, unknown))}")
    v, n, cols = msg.get("v"), msg.get("n"), msg.get("cols")
    if type(v) is not int or v != VERSION:
        raise CompactError(f"version {v!r}: this decoder reads version {VERSION}")
    if type(n) is not int or not 1 <= n <= MAX_READINGS:
        raise CompactError(f"n = {n!r}: 1..{MAX_READINGS} readings")
    if type(cols) is not dict or not all(type(k) is str for k in cols):
        raise CompactError("cols is not a map of field names to columns")
    if n * len(cols) > MAX_CELLS:
        raise CompactError(f"{n} readings × {len(cols)} columns: at most {MAX_CELLS}")
    budget = Budget(len(data) + 64)
    names = list(cols)
    columns = []
    absent = False
    for name, col in cols.items():
        try:
            values, gaps = _decode_column(col, n, budget)
        except CompactError as e:
            raise CompactError(f"column {name!r}: {e}") from None
        columns.append(values)
        absent = absent or gaps
    if not names:
        readings: list[dict[str, Any]] = [{} for _ in range(n)]
    elif absent:
        readings = [{k: x for k, x in zip(names, row) if x is not UNDEFINED} for row in zip(*columns)]
    else:
        readings = [dict(zip(names, row)) for row in zip(*columns)]
    order = msg.get("order")
    if order is not None:
        _reorder(readings, order)
    return readings


def _reorder(readings: list[dict[str, Any]], order: Any) -> None:
    if type(order) is not dict:
        raise CompactError("order is not a map")
    for i, keys in order.items():
        if type(i) is not int or not 0 <= i < len(readings):
            raise CompactError(f"order: no reading {i!r}")
        r = readings[i]
        if type(keys) is not list or len(keys) != len(r) or set(keys) != set(r):
            raise CompactError(f"order of reading {i}: not a permutation of its keys")
        readings[i] = {k: r[k] for k in keys}


def _decode_column(col: Any, n: int, budget: Budget, inner: bool = False) -> tuple[list[Any], bool]:
    """A column's n values (UNDEFINED where a reading lacks the key), and whether any is."""
    if type(col) is not list or not col or type(col[0]) is not int:
        raise CompactError("not a column (an array starting with its kind)")
    kind = col[0]
    if kind == CONST and len(col) == 2:
        value = col[1]
        nodes = check(value, absent_ok=True, budget=budget)
        if type(value) is dict or type(value) is list:
            if n * nodes > MAX_CELLS:
                raise CompactError(f"a constant of {nodes} nodes for {n} readings")
            return [_copy(value) for _ in range(n)], False
        return [value] * n, value is UNDEFINED
    if kind == PLAIN and len(col) == 2:
        values = col[1]
        if type(values) is not list or len(values) != n:
            raise CompactError(f"plain values: not an array of {n}")
        for x in values:
            check(x, absent_ok=True, budget=budget)
        return values, any(x is UNDEFINED for x in values)
    if kind == INT and len(col) == 3:
        return _integers(col[1], col[2], n), False
    if kind == FLOAT and len(col) == 4:
        e = col[1]
        if type(e) is not int or not 0 <= e <= MAX_E:
            raise CompactError(f"scale exponent {e!r}: 0..{MAX_E}")
        p = POW[e]
        return [x / p for x in _integers(col[2], col[3], n)], False
    if kind == TIME and len(col) == 3:
        xs = _integers(col[1], col[2], n)
        if xs and (min(xs) < 0 or max(xs) >= MAX_TS_MS):
            raise CompactError("a time outside 1970..9999")
        return [iso_ms(x) for x in xs], False
    if kind == PATCHED and len(col) == 3 and not inner:
        patches = col[1]
        if type(patches) is not dict or len(patches) > n:
            raise CompactError("patches: not a map of at most n entries")
        for i, x in patches.items():
            if type(i) is not int or not 0 <= i < n:
                raise CompactError(f"patch for reading {i!r} of {n}")
            check(x, absent_ok=True, budget=budget)
        rest, gaps = _decode_column(col[2], n - len(patches), budget, inner=True)
        it = iter(rest)
        values = [patches[i] if i in patches else next(it) for i in range(n)]
        return values, gaps or any(x is UNDEFINED for x in patches.values())
    raise CompactError(f"unknown column kind {kind} with {len(col) - 1} parameters")


def _integers(k: Any, data: Any, n: int) -> list[int]:
    """Undo the k-th differences: the data (zero-padded to n) summed k times."""
    if type(k) is not int or not 0 <= k <= MAX_K:
        raise CompactError(f"difference order {k!r}: 0..{MAX_K}")
    if type(data) is list:
        xs = _pieces(data, n)
    elif type(data) is dict:
        xs = _sparse(data, n)
    else:
        raise CompactError("integer data is neither an array nor a map")
    if xs and (min(xs) < -EXACT or max(xs) > EXACT):
        raise CompactError("an integer beyond ±2^53")
    xs += [0] * (n - len(xs))
    for j in range(k - 1, -1, -1):
        xs[j:] = accumulate(xs[j:])
    if xs and (min(xs) < -EXACT or max(xs) > EXACT):
        raise CompactError("a value beyond ±2^53")
    return xs


def _pieces(data: list[Any], n: int) -> list[int]:
    """Integers and typed arrays, joined."""
    xs: list[int] = []
    for piece in data:
        if type(piece) is int:
            xs.append(piece)
        elif type(piece) is cbor2.CBORTag and piece.tag in TYPED and type(piece.value) is bytes:
            code, width = TYPED[piece.tag]
            if len(piece.value) % width:
                raise CompactError(f"a typed array of {len(piece.value)} bytes, not a multiple of {width}")
            a = array(code)
            a.frombytes(piece.value)
            if BIG_ENDIAN:
                a.byteswap()
            xs += a.tolist()
        else:
            raise CompactError("integer data holds neither an integer nor a typed array (tags 64 69 70 72 77 78)")
        if len(xs) > n:
            raise CompactError(f"more than {n} integers for {n} readings")
    return xs


def _sparse(data: dict[Any, Any], n: int) -> list[int]:
    """{index: integer}, 0 elsewhere."""
    xs = [0] * n
    for i, x in data.items():
        if type(i) is not int or not 0 <= i < n or type(x) is not int:
            raise CompactError(f"sparse integer data {i!r}: {x!r} for {n} readings")
        xs[i] = x
    return xs


def _copy(v: Any) -> Any:
    """A fresh copy of a constant container for each reading, as json.loads would give."""
    if type(v) is dict:
        return {k: _copy(x) for k, x in v.items()}
    if type(v) is list:
        return [_copy(x) for x in v]
    return v
