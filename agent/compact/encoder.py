"""The compact encoder: a batch of readings (the store's JSON bodies) → one compact message.

:func:`encode` is on the uplink's hot path while a backlog drains, so a column is built with
passes that run in C (``map`` over C functions, ``min``, ``max``, ``count``, ``sorted``, list
equality) rather than Python code per value; bench/bench_compact.py measures it.
"""

from __future__ import annotations

import datetime as dt
import json
import json.scanner
from array import array
from bisect import bisect_left
from collections import Counter
from collections.abc import Sequence
from operator import sub
from typing import Any, cast

import cbor2

from agent.compact.format import (
    BIG_ENDIAN,
    CONST,
    FLOAT,
    INT,
    MAX_CELLS,
    MAX_E,
    MAX_READINGS,
    MAX_TS_MS,
    PATCHED,
    PLAIN,
    POW,
    SAFE,
    TIME,
    TYPED,
    UNDEFINED,
    VERSION,
    CompactError,
    check,
)
from agent.model.reading import iso_ms

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MINUTES: dict[str, int] = {}
"""``YYYY-MM-DDTHH:MM`` → its Unix milliseconds, checked against iso_ms: at 1 Hz sixty
readings share one parse."""


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
_scan = json.scanner.make_scanner(_DECODER)  # type: ignore[arg-type]  # typeshed: the context is a decoder


def _parse(body: str | bytes) -> Any:
    """json.loads, with the C scanner called directly: the store's bodies have no surrounding
    blanks, and the per-call wrappers of json.loads cost as much as the parse itself."""
    if type(body) is str:
        try:
            obj, end = _scan(body, 0)
        except StopIteration:
            end = -1
        if end == len(body):
            return obj
    # `type(...) is str` leaves str subclasses in the other branch, where bytes() refuses them.
    return _DECODER.decode(body if type(body) is str else bytes(cast(bytes, body)).decode("utf-8"))


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
        if all(_exact(v) == text for v in vals) and len(vals) * check(vals[0]) <= MAX_CELLS:
            return [CONST, vals[0]]
        return None
    if vals.count(vals[0]) == len(vals):  # bool, null, undefined: one type means == is exact
        check(vals[0], absent_ok=True)
        return [CONST, vals[0]]
    return None


def _exact(v: Any) -> str:
    """A value's identity as JSON: 1, 1.0 and true differ; so do key orders."""
    return json.dumps(v, separators=(",", ":"), ensure_ascii=False)


def _plain(vals: list[Any]) -> list[Any]:
    for v in vals:
        check(v, absent_ok=True)
    return [PLAIN, vals]


def _patched(vals: list[Any]) -> list[Any] | None:
    """A column that is mostly one series or one value, with exceptions (nulls, an absent
    key, an odd type): the regular part coded as such, the rest listed by reading index.
    The smallest of those and plain; None when there is no such candidate."""
    n = len(vals)
    candidates: list[list[Any]] = []
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
            check(v, absent_ok=True)
    plain = _plain(vals)
    return min([plain, *candidates], key=lambda c: len(cbor2.dumps(c)))


def _floats(vals: list[float]) -> list[Any] | None:
    """Scaled by the smallest 10^e (e ≤ 9) with which every value comes back exactly as
    ``round(v * 10^e) / 10^e``; None if there is none (or a value is -0.0, infinite, huge)."""
    e = _min_e(vals[0])
    while e is not None and e <= MAX_E:
        p = POW[e]
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
    for e, p in enumerate(POW):
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
    coded = _series(cast(list[int], ms))
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
    if not (0 <= sec < 60 and 0 <= msec and s[16:] == f":{sec:02d}.{msec:03d}Z"):
        return None
    return base + sec * 1000 + msec


def _series(xs: list[int]) -> tuple[int, list[Any] | dict[int, int]] | None:
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


def _pack(d: list[int], k: int) -> tuple[int, list[Any] | dict[int, int]]:
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
    if BIG_ENDIAN:
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

