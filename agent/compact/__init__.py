"""The compact encoding of a batch of readings: columnar, delta-encoded, self-described CBOR.

One message is one CBOR item (RFC 8949) behind the self-describe tag 55799 (bytes ``d9 d9 f7``),
so a subscriber tells it from JSON by its first byte even over MQTT 3.1.1, where there is no
content type. The item is a map ``{"v": 1, "n": count, "cols": {field: column, …}}``: one column
per field, in the readings' key order, each coded by the cheapest of a few kinds (a constant, an
integer or scaled-decimal series stored as k-th differences, ISO times as milliseconds, plain
values). Lossless: :func:`decode` gives back exactly what ``json.loads`` gave for each body
(types, key order, nulls, absent keys). The format, for a backend: docs/compact.md.

:func:`encode` is on the uplink's hot path while a backlog drains, so a column is built with
passes that run in C (``map`` over C functions, ``min``, ``max``, ``count``, ``sorted``, list
equality) rather than Python code per value; bench/bench_compact.py measures it.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import json.scanner
import sys
from array import array
from bisect import bisect_left
from collections import Counter
from collections.abc import Sequence
from itertools import accumulate
from operator import sub
from typing import Any

import cbor2

from agent.model.reading import iso_ms

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
_BIG_ENDIAN = sys.byteorder == "big"
_POW = [float(10**e) for e in range(MAX_E + 1)]
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MINUTES: dict[str, int] = {}
"""``YYYY-MM-DDTHH:MM`` → its Unix milliseconds, checked against iso_ms: at 1 Hz sixty
readings share one parse."""


class CompactError(ValueError):
    """Not a compact message (decode), or readings that cannot be one (encode)."""


def is_compact(payload: bytes) -> bool:
    """Starts with the self-describe tag (JSON never starts with byte 0xd9)."""
    return bytes(payload[:3]) == MAGIC


# -- encoding ------------------------------------------------------------------------------------


def encode(bodies: Sequence[str]) -> bytes:
    """JSON texts of readings of one device and one stream, in seq order (the store's row
    bodies) → one compact message. CompactError if a body is not a JSON object (or holds NaN,
    infinities, nesting deeper than MAX_DEPTH) or the batch exceeds the decoder's limits."""
    n = len(bodies)
    if not n:
        raise CompactError("nothing to encode")
    if n > MAX_READINGS:
        raise CompactError(f"{n} readings: at most {MAX_READINGS} a message")
    try:
        readings = [_parse(b) for b in bodies]
    except (ValueError, TypeError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise CompactError(f"a body is not JSON: {e}") from None
    for i, r in enumerate(readings):
        if type(r) is not dict:
            raise CompactError(f"body {i + 1} is not a JSON object")
    names, shapes, order = _key_order(readings)
    if n * len(names) > MAX_CELLS:
        raise CompactError(f"{n} readings × {len(names)} fields: at most {MAX_CELLS} a message")
    if len(shapes) == 1:  # every reading has the same keys in the same order: transpose in C
        columns = [list(c) for c in zip(*[r.values() for r in readings])]
    else:
        columns = [[r.get(k, UNDEFINED) for r in readings] for k in names]
    msg: dict[str, Any] = {"v": VERSION, "n": n, "cols": {k: _column(v) for k, v in zip(names, columns)}}
    if order:
        msg["order"] = order
    return cbor2.dumps(cbor2.CBORTag(55799, msg))


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (no NaN or infinities)")


_DECODER = json.JSONDecoder(parse_constant=_no_constant)
_scan = json.scanner.make_scanner(_DECODER)


def _parse(body: str) -> Any:
    """json.loads, with the C scanner called directly: the store's bodies have no surrounding
    blanks, and the per-call wrappers of json.loads cost as much as the parse itself."""
    if type(body) is str:
        try:
            obj, end = _scan(body, 0)
        except StopIteration:
            end = -1
        if end == len(body):
            return obj
    return _DECODER.decode(body if type(body) is str else bytes(body).decode("utf-8"))


def _key_order(readings: list[dict[str, Any]]) -> tuple[list[str], dict[tuple[str, ...], None], dict[int, list[str]]]:
    """The columns' order, the distinct key sequences, and the readings whose own key order
    the columns' order cannot give (index → keys)."""
    shapes = dict.fromkeys(tuple(r) for r in readings)
    first = next(iter(shapes))
    if len(shapes) == 1:
        return list(first), shapes, {}
    # Merge: a new key goes right after the key that precedes it in the first reading that
    # has it, so readings of different kinds (alarms) mostly keep their own order.
    names: list[str] = []
    for shape in shapes:
        at = 0
        for key in shape:
            if key in names:
                at = max(at, names.index(key) + 1)
            else:
                names.insert(at, key)
                at += 1
    pos = {k: i for i, k in enumerate(names)}
    odd = set()
    for shape in shapes:
        idx = [pos[k] for k in shape]
        if idx != sorted(idx):
            odd.add(shape)
    order = {i: list(r) for i, r in enumerate(readings) if odd and tuple(r) in odd}
    return names, shapes, order


def _column(vals: list[Any]) -> list[Any]:
    types = set(map(type, vals))
    if len(types) == 1:
        col = _uniform(types.pop(), vals)
        if col is not None:
            return col
    return _patched(vals) or _plain(vals)


def _uniform(t: type, vals: list[Any]) -> list[Any] | None:
    """One type in the whole column: a numeric or time series, or a constant."""
    if t is float:
        return _floats(vals)
    if t is int:
        return _ints(vals)
    if t is str:
        if vals.count(vals[0]) == len(vals):
            return [CONST, vals[0]]
        return _times(vals)
    if t is dict or t is list:
        text = _exact(vals[0])
        if all(_exact(v) == text for v in vals) and len(vals) * _check(vals[0]) <= MAX_CELLS:
            return [CONST, vals[0]]
        return None
    if vals.count(vals[0]) == len(vals):  # bool, null, undefined: one type means == is exact
        _check(vals[0], absent_ok=True)
        return [CONST, vals[0]]
    return None


def _exact(v: Any) -> str:
    """A value's identity as JSON: 1, 1.0 and true differ; so do key orders."""
    return json.dumps(v, separators=(",", ":"), ensure_ascii=False)


def _plain(vals: list[Any]) -> list[Any]:
    for v in vals:
        _check(v, absent_ok=True)
    return [PLAIN, vals]


def _patched(vals: list[Any]) -> list[Any] | None:
    """A column that is mostly one series or one value, with exceptions (nulls, an absent
    key, an odd type): the regular part coded as such, the rest listed by reading index.
    The smallest of those and plain; None when there is no such candidate."""
    n = len(vals)
    candidates = []
    by_type = Counter(map(type, vals))
    for t in (float, int, str):  # a series over the readings of that type
        m = by_type.get(t, 0)
        if 2 <= m < n:
            idx = [i for i, v in enumerate(vals) if type(v) is t]
            inner = _uniform(t, [vals[i] for i in idx])
            if inner is not None:
                keep = set(idx)
                candidates.append([PATCHED, {i: v for i, v in enumerate(vals) if i not in keep}, inner])
    # One value for many readings: (type, value) keys, as 1, 1.0 and true are == in Python.
    keyed = [(type(v), v) if v is None or v is UNDEFINED or type(v) in (str, int, bool) else None for v in vals]
    common = Counter(k for k in keyed if k is not None).most_common(1)
    if common and 2 <= common[0][1] < n:
        key = common[0][0]
        candidates.append([PATCHED, {i: vals[i] for i, k in enumerate(keyed) if k != key}, [CONST, key[1]]])
    if not candidates:
        return None
    for col in candidates:
        for v in col[1].values():
            _check(v, absent_ok=True)
    plain = _plain(vals)
    return min([plain, *candidates], key=lambda c: len(cbor2.dumps(c)))


def _floats(vals: list[float]) -> list[Any] | None:
    """Scaled by the smallest 10^e (e ≤ 9) with which every value comes back exactly as
    ``round(v * 10^e) / 10^e``; None if there is none (or a value is -0.0, infinite, huge)."""
    e = _min_e(vals[0])
    while e is not None and e <= MAX_E:
        p = _POW[e]
        try:  # map over C methods: no Python frame a value
            xs = list(map(round, map(p.__mul__, vals)))
        except (OverflowError, ValueError):  # infinities, NaN: plain, where _check refuses them
            return None
        back = list(map(p.__rtruediv__, xs))  # x / p, as a decoder does
        if back == vals:
            if 0 in xs and any(str(v)[0] == "-" for v in vals if v == 0):
                return None  # -0.0 == 0.0: only a plain float keeps the sign
            coded = _series(xs)
            return None if coded is None else [FLOAT, e, *coded]
        i = next(i for i, (a, b) in enumerate(zip(back, vals)) if a != b)
        need = _min_e(vals[i])
        e = None if need is None else max(e + 1, need)
    return None


def _min_e(v: float) -> int | None:
    for e, p in enumerate(_POW):
        try:
            if round(v * p) / p == v:
                return e
        except (OverflowError, ValueError):
            return None
    return None


def _ints(vals: list[int]) -> list[Any] | None:
    coded = _series(vals)
    if coded is not None:
        return [INT, *coded]
    if vals.count(vals[0]) == len(vals):
        return [CONST, vals[0]]
    return None


def _times(vals: list[str]) -> list[Any] | None:
    """ISO times as Unix milliseconds, when each one is exactly what iso_ms prints for it."""
    ms = list(map(_ts_ms, vals))
    if None in ms:
        return None
    coded = _series(ms)
    return None if coded is None else [TIME, *coded]


def _ts_ms(s: str) -> int | None:
    """Unix ms of ``s`` if ``iso_ms`` prints exactly ``s`` for it, else None.

    The minute (``YYYY-MM-DDTHH:MM``) is checked against iso_ms once and remembered: at 1 Hz
    sixty readings share it. The rest is ``:SS.mmmZ``, which iso_ms prints as below for any
    second of that minute (POSIX time has no leap seconds)."""
    if len(s) != 24:
        return None
    minute = s[:16]
    base = _MINUTES.get(minute)
    if base is None:
        try:
            t = dt.datetime(int(s[:4]), int(s[5:7]), int(s[8:10]), int(s[11:13]), int(s[14:16]), tzinfo=dt.UTC)
        except ValueError:
            return None
        base = (t - _EPOCH) // dt.timedelta(milliseconds=1)
        if not 0 <= base < MAX_TS_MS or iso_ms(base)[:16] != minute:
            return None
        if len(_MINUTES) >= 4096:
            _MINUTES.clear()
        _MINUTES[minute] = base
    try:
        sec, msec = int(s[17:19]), int(s[20:23])
    except ValueError:
        return None
    if not (0 <= sec < 60 and 0 <= msec and s[16:] == ":%02d.%03dZ" % (sec, msec)):
        return None
    return base + sec * 1000 + msec


def _series(xs: list[int]) -> tuple[int, list[Any]] | None:
    """(k, data) for integers: the k-th differences (k = 0, 1, 2) that encode smallest,
    trailing zeros dropped; None when a value is beyond ±SAFE."""
    if min(xs) < -SAFE or max(xs) > SAFE:
        return None
    d1 = xs[:1] + list(map(sub, xs[1:], xs))
    if len(xs) > 2 and d1.count(d1[1]) - (d1[0] == d1[1]) == len(d1) - 1:
        return 2, _trim(d1[:2])  # an arithmetic progression (seq, 1 Hz ts): x0, step
    # At about a byte a value, a higher order gains only when the differences are mostly one
    # step (an arithmetic progression with a gap: zeros at k = 2, stored sparse).
    mostly_steps = len(xs) > 1 and 2 * d1.count(d1[1]) >= len(xs)
    best = (*_pack(_trim(xs), 0), 0)
    for k in (1, 2):
        if len(xs) >= 32 and best[0] <= len(xs) + 8 and not mostly_steps:
            break
        d = d1 if k == 1 else d1[:2] + list(map(sub, d1[2:], d1[1:]))
        size, data = _pack(_trim(d), k)
        if size < best[0]:
            best = size, data, k
    return best[2], best[1]


def _trim(d: list[int]) -> list[int]:
    if d and d[-1] == 0:
        end = len(d) - 1
        while end and d[end - 1] == 0:
            end -= 1
        return d[:end]
    return d


def _pack(d: list[int], k: int) -> tuple[int, list[Any]]:
    """(bytes, data) for one candidate: the integers as they are, or the first k (the
    differences' starting values, large) as integers and the rest as one typed array, whichever
    is smaller. An array of CBOR integers costs 1 byte for -24..23, 2 up to ±256, 3 up to
    ±65536…: it wins for short columns and for small values with rare outliers."""
    if not d:
        return 1, d
    dense = _dense(d, k)
    nonzero = len(d) - d.count(0)
    if 4 * nonzero < len(d):  # mostly zeros: perhaps {index: value} for the others
        sparse = {i: x for i, x in enumerate(d) if x}
        size = _head(nonzero) + sum(map(_int_size, sparse)) + sum(map(_int_size, sparse.values()))
        if size < dense[0]:
            return size, sparse
    return dense


def _dense(d: list[int], k: int) -> tuple[int, list[Any]]:
    lo, hi = min(d), max(d)
    if -24 <= lo and hi <= 23:
        return _head(len(d)) + len(d), d
    seeds, rest = d[:k], d[k:]
    tag = _typed_tag(min(rest), max(rest)) if k and rest else _typed_tag(lo, hi)
    if tag is None or len(rest) < 4:
        return _ints_size(d), d
    code, width = TYPED[tag]
    nbytes = width * len(rest)
    typed = _head(k + 1) + sum(map(_int_size, seeds)) + 2 + _head(nbytes) + nbytes
    # Integers of 1 byte a value lose to a typed array of width 1 (they are not all small);
    # wider, they win when most values are small and a few are not (a gap in a 1 Hz ts).
    if width > 1 and (size := _ints_size(d)) <= typed:
        return size, d
    a = array(code, rest)
    if _BIG_ENDIAN:
        a.byteswap()
    return typed, [*seeds, cbor2.CBORTag(tag, a.tobytes())]


def _ints_size(d: list[int]) -> int:
    """Bytes of ``d`` as an array of CBOR integers (x >= 0 is coded as x, x < 0 as -1-x)."""
    s = sorted(d)
    n = len(s)
    size = _head(n) + n
    for limit, extra in ((24, 1), (0x100, 1), (0x10000, 2), (0x100000000, 4)):
        outside = bisect_left(s, -limit) + n - bisect_left(s, limit)
        if not outside:
            break
        size += extra * outside
    return size


def _int_size(x: int) -> int:
    u = x if x >= 0 else ~x
    return 1 if u < 24 else 2 if u < 0x100 else 3 if u < 0x10000 else 5 if u < 0x100000000 else 9


def _typed_tag(lo: int, hi: int) -> int | None:
    if lo >= 0:
        return 64 if hi < 0x100 else 69 if hi < 0x10000 else 70 if hi < 0x100000000 else None
    if lo >= -0x80 and hi < 0x80:
        return 72
    if lo >= -0x8000 and hi < 0x8000:
        return 77
    if lo >= -0x80000000 and hi < 0x80000000:
        return 78
    return None


def _head(length: int) -> int:
    """Bytes of a CBOR head announcing ``length``."""
    return 1 if length < 24 else 2 if length < 0x100 else 3 if length < 0x10000 else 5


# -- decoding ------------------------------------------------------------------------------------


def decode(payload: bytes) -> list[dict[str, Any]]:
    """The readings, in order; CompactError for anything malformed (never another exception
    type, never a bogus reading)."""
    try:
        return _decode(bytes(payload))
    except CompactError:
        raise
    except Exception as e:  # noqa: BLE001 - hostile input: whatever cbor2 or a bad shape raises
        raise CompactError(f"malformed compact message ({type(e).__name__}: {e})") from e


class _Budget:
    """Nodes a decoder may still validate: a well-formed payload spends at most a node per
    byte, so value sharing (CBOR tags 28/29) cannot make validation blow up."""

    __slots__ = ("left",)

    def __init__(self, left: int) -> None:
        self.left = left


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
    budget = _Budget(len(data) + 64)
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


def _decode_column(col: Any, n: int, budget: _Budget, inner: bool = False) -> tuple[list[Any], bool]:
    """A column's n values (UNDEFINED where a reading lacks the key), and whether any is."""
    if type(col) is not list or not col or type(col[0]) is not int:
        raise CompactError("not a column (an array starting with its kind)")
    kind = col[0]
    if kind == CONST and len(col) == 2:
        value = col[1]
        nodes = _check(value, absent_ok=True, budget=budget)
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
            _check(x, absent_ok=True, budget=budget)
        return values, any(x is UNDEFINED for x in values)
    if kind == INT and len(col) == 3:
        return _integers(col[1], col[2], n), False
    if kind == FLOAT and len(col) == 4:
        e = col[1]
        if type(e) is not int or not 0 <= e <= MAX_E:
            raise CompactError(f"scale exponent {e!r}: 0..{MAX_E}")
        p = _POW[e]
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
            _check(x, absent_ok=True, budget=budget)
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
            if _BIG_ENDIAN:
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


def _check(v: Any, absent_ok: bool = False, budget: _Budget | None = None, depth: int = 0) -> int:
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
        return 1 + sum(_check(x, budget=budget, depth=depth + 1) for x in v)
    if t is dict:
        nodes = 1
        for k, x in v.items():
            if type(k) is not str:
                raise CompactError(f"a map key {k!r} is not a text string")
            nodes += _check(x, budget=budget, depth=depth + 1)
        return nodes
    raise CompactError(f"a {t.__name__} is not a JSON value")


def _copy(v: Any) -> Any:
    """A fresh copy of a constant container for each reading, as json.loads would give."""
    if type(v) is dict:
        return {k: _copy(x) for k, x in v.items()}
    if type(v) is list:
        return [_copy(x) for x in v]
    return v
