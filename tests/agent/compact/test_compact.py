"""The compact encoding (agent/compact/__init__.py, docs/compact.md): lossless on every stream, small on
1 Hz position backlogs, and a decoder that refuses anything malformed with CompactError only."""

from __future__ import annotations

import functools
import json
import math
import random
import re
from pathlib import Path
from typing import Any

import cbor2
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import compact
from agent.compact import CompactError, encode, is_compact
from agent.compact.decoder import decode
from agent.demo import trip
from agent.model.chain import Chain
from agent.model.reading import Reading, encode_parts, iso_ms, resolved_body
from agent.tools.verify import verify
from drivers.gps.nmea import NmeaAssembler
from support import REPO

DEV = "CQ-HN-0042"
START_MS = 1_795_000_000_000  # 2026-11-18T11:06:40Z
CHAIN_KEY = b"customs-transit-key-CQ-HN-0042"
COMPACT_DOC = REPO / "docs" / "compact.md"


def text(obj: Any) -> str:
    """JSON exactly as the agent writes bodies: 1, 1.0 and true differ, key order shows."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def round_trip(bodies: list[str]) -> bytes:
    """Encode, decode, and check every reading comes back exactly (values, types, key order)."""
    payload = encode(bodies)
    assert is_compact(payload)
    got = decode(payload)
    assert got == [json.loads(b) for b in bodies]
    assert [text(r) for r in got] == [text(json.loads(b)) for b in bodies]
    return payload


def seq_bodies(stream: str, datas: list[dict[str, Any]], *, start_seq: int = 1, start_ms: int = START_MS,
               step_ms: int = 1000) -> list[str]:
    """Bodies as the store holds them: encode_parts around the seq the store assigns."""
    out = []
    for i, data in enumerate(datas):
        head, tail = encode_parts(DEV, Reading(stream, start_ms + i * step_ms, data))
        out.append(head + str(start_seq + i) + tail)
    return out


def positions(n: int, seed: int = 42) -> list[dict[str, Any]]:
    """1 Hz fixes with the fields and rounding of the NMEA driver (as bench/_positions.py)."""
    rng = random.Random(seed)
    lat, lon, course, alt = 29.5630, 106.5516, 205.0, 244.0
    out = []
    for _ in range(n):
        speed = max(0.0, min(95.0, rng.gauss(68.0, 12.0)))
        course = (course + rng.gauss(0.0, 4.0)) % 360.0
        step_km = speed / 3600.0
        lat += step_km / 111.32 * math.cos(math.radians(course))
        lon += step_km / (111.32 * math.cos(math.radians(lat))) * math.sin(math.radians(course))
        alt = max(20.0, alt + rng.gauss(0.0, 0.8))
        out.append({"lat": round(lat, 7), "lon": round(lon, 7), "speed_kmh": round(speed, 2),
                    "course": round(course, 2), "alt_m": round(alt, 1), "sats": rng.randint(7, 18),
                    "hdop": round(rng.uniform(0.6, 1.8), 1), "fix": "gps"})
    return out


def trip_bodies(tmp: Path, hours: float) -> list[str]:
    """The demo trip at 1 Hz through the real NMEA path: what a lorry's backlog holds."""
    capture = tmp / "trip.nmea"
    trip.write(capture, interval_s=1, max_hours=hours)
    asm = NmeaAssembler()
    fixes = [f for line in capture.read_bytes().splitlines(keepends=True) for f in asm.feed(line)]
    fixes += list(asm.finish())
    out = []
    for i, f in enumerate(fixes):
        head, tail = encode_parts(DEV, Reading("position", f.ts_ms, f.as_data()))
        out.append(head + str(i + 1) + tail)
    return out


def columns(payload: bytes) -> dict[str, Any]:
    return cbor2.loads(payload[3:])["cols"]


# -- positions ----------------------------------------------------------------------------------


def test_a_1hz_backlog_round_trips_and_is_at_most_15_bytes_a_position() -> None:
    bodies = seq_bodies("position", positions(300), start_seq=947)
    payload = round_trip(bodies)
    per_position = len(payload) / len(bodies)
    assert per_position <= 15, f"{per_position:.2f} B a position"
    assert sum(map(len, bodies)) / len(bodies) > 190, "against ~200 B of JSON"
    cols = columns(payload)
    assert list(cols) == ["device", "stream", "seq", "ts", "lat", "lon", "speed_kmh", "course", "alt_m", "sats",
                          "hdop", "fix"], "the readings' key order"
    assert cols["device"] == [compact.CONST, DEV] and cols["fix"] == [compact.CONST, "gps"]
    assert cols["seq"] == [compact.INT, 2, [947, 1]], "an arithmetic progression costs nothing a reading"
    assert cols["ts"] == [compact.TIME, 2, [START_MS, 1000]]
    assert cols["lat"][:2] == [compact.FLOAT, 7] and cols["speed_kmh"][:2] == [compact.FLOAT, 2]
    assert cols["sats"][0] == compact.INT


def test_the_demo_trip_at_1hz_round_trips_in_batches(tmp_path: Path) -> None:
    bodies = trip_bodies(tmp_path, hours=0.5)
    assert len(bodies) >= 1500
    sizes = []
    for i in range(0, len(bodies), 200):  # the uplink's default max_batch
        batch = bodies[i:i + 200]
        sizes.append((len(round_trip(batch)), len(batch)))
    full = [s / n for s, n in sizes if n == 200]
    assert max(full) <= 15, f"up to {max(full):.2f} B a position"
    assert len(encode(bodies[:300])) / 300 <= 15


def test_a_batch_of_one_and_of_two() -> None:
    bodies = seq_bodies("position", positions(2))
    round_trip(bodies[:1])
    round_trip(bodies)


def test_held_readings_keep_ts_trusted_false() -> None:
    """A held reading is released with ``"ts_trusted":false`` after its ts: an absent key in most
    readings of the column, a short list of exceptions in the message."""
    datas = positions(40)
    bodies = []
    for i, data in enumerate(datas):
        ms = START_MS + i * 1000
        head, tail = encode_parts(DEV, Reading("position", None if i % 10 == 3 else ms, data))
        body = head + str(i + 1) + tail
        bodies.append(resolved_body(body, ms, trusted=False) if i % 10 == 3 else body)
    assert sum('"ts_trusted":false' in b for b in bodies) == 4
    payload = round_trip(bodies)
    col = columns(payload)["ts_trusted"]
    assert col[0] == compact.PATCHED and col[2] == [compact.CONST, cbor2.undefined]
    assert col[1] == {3: False, 13: False, 23: False, 33: False}
    assert [list(r).index("ts_trusted") for r in decode(payload) if "ts_trusted" in r] == [4] * 4, "right after ts"


def test_nulls_absent_keys_events_and_a_gap() -> None:
    datas = positions(300)
    for i in (5, 6, 7):  # an RMC-only stretch: no altitude, satellites, HDOP
        datas[i] |= {"alt_m": None, "sats": None, "hdop": None}
    datas[20]["course"] = None
    datas[30]["event"] = "stop"
    datas[31]["event"] = "start"
    datas[40]["fix"] = "dgps"
    # A tunnel: an hour without fixes (ts jumps; seq does not), then a gap in seq too.
    bodies = (seq_bodies("position", datas[:45]) + seq_bodies("position", datas[45:150], start_seq=46,
                                                              start_ms=START_MS + 3_600_000)
              + seq_bodies("position", datas[150:], start_seq=160, start_ms=START_MS + 3_700_000))
    payload = round_trip(bodies)
    cols = columns(payload)
    assert cols["alt_m"][0] == compact.PATCHED and cols["alt_m"][1] == {5: None, 6: None, 7: None}
    assert cols["event"] == [compact.PATCHED, {30: "stop", 31: "start"}, [compact.CONST, cbor2.undefined]]
    assert cols["fix"] == [compact.PATCHED, {40: "dgps"}, [compact.CONST, "gps"]]
    assert cols["seq"][:2] == [compact.INT, 2] and cols["ts"][:2] == [compact.TIME, 2]
    assert type(cols["seq"][2]) is dict and type(cols["ts"][2]) is dict, "a progression with gaps: sparse"
    assert len(payload) / len(bodies) <= 15, "a null here and there does not make a column plain"


def test_unicode_nested_values_and_odd_types() -> None:
    readings = [
        {"device": DEV, "stream": "health", "seq": 1, "ts": "2026-11-21T09:00:00.000Z", "uptime_s": 10800,
         "gps": {"connected": True, "satellites_in_view": {"GPS": 11, "BeiDou": 14}, "hdop": 0.8},
         "zones": ["友谊关 / Hữu Nghị", "Lạng Sơn"], "note": "温度 °C \u2028 \"quoted\" \\ \t",
         "empty": {}, "none": []},
        {"device": DEV, "stream": "health", "seq": 2, "ts": "2026-11-21T09:01:00.000Z", "uptime_s": 10860,
         "gps": {"connected": False, "satellites_in_view": {}, "hdop": None},
         "zones": [], "note": "", "empty": {}, "none": [], "big": 2**70, "neg": -(2**64) - 1},
        {"device": DEV, "stream": "health", "seq": 3, "ts": "2026-11-21T09:02:00.000Z", "uptime_s": 10920.0,
         "gps": None, "zones": ["x"], "note": None, "empty": {}, "none": [], "big": 1, "neg": 1.0,
         "mixed": [1, 1.0, True, None, "1", {"1": [1.5e300, -0.0, 5e-324]}]},
    ]
    payload = round_trip([text(r) for r in readings])
    assert columns(payload)["empty"] == [compact.CONST, {}]


def test_exact_numbers() -> None:
    """Scaled only when every value comes back as the same double; ints stay ints, floats
    floats, booleans never numbers, -0.0 keeps its sign."""
    cases = {
        "decimals": [0.1, 0.2, 0.30000000000000004, 1.0, 2.5],
        "tiny": [1e-7, 2e-7, 1.5e-9, 0.0],
        "neg_zero": [0.0, -0.0, 1.5],
        "huge": [1e300, 1e-300, 123456789.123456789],
        "ints_as_floats": [212.0, 213.0, 215.0],
        "ints": [0, -1, 2**52, -(2**52)],
        "beyond": [2**53 + 1, 2**60, 0],
        "int_or_float": [1, 1.0, 2, 2.0],
        "bools": [True, False, True],
        "bool_or_int": [True, 1, 0, False],
        "float_repr": [round(23.9145526 + i * 1e-7, 7) for i in range(50)],
    }
    kinds = {}
    for name, values in cases.items():
        payload = round_trip([text({"seq": i + 1, "x": v}) for i, v in enumerate(values)])
        kinds[name] = columns(payload)["x"][:2]
        if name == "ints_as_floats":
            assert [type(r["x"]) for r in decode(payload)] == [float] * 3
        if name == "neg_zero":
            assert math.copysign(1, decode(payload)[1]["x"]) == -1
    assert kinds["ints_as_floats"] == [compact.FLOAT, 0] and kinds["float_repr"] == [compact.FLOAT, 7]
    assert kinds["ints"][0] == compact.INT
    for name in ("decimals", "tiny", "neg_zero", "huge", "beyond", "int_or_float", "bool_or_int"):
        assert kinds[name][0] in (compact.PLAIN, compact.PATCHED), name


def test_times_that_are_not_the_agents_format_stay_strings() -> None:
    odd = ["2026-11-21T08:42:10Z", "2026-11-21T08:42:10.000+00:00", "pending", "2026-02-30T00:00:00.000Z",
           "1969-12-31T23:59:59.999Z", "2026-11-21T08:42:60.000Z", "2026-11-21T08:42:1٣.000Z",
           "2026-11-21T08:42:-1.000Z", "2026-11-21 08:42:10.000Z", "2026-11-21T08:42:10.000z",
           "+2026-11-21T08:42:10.00Z"]
    for s in odd:
        assert compact._ts_ms(s) is None, s
        bodies = [text({"seq": 1, "ts": "2026-11-21T08:42:09.000Z"}), text({"seq": 2, "ts": s}),
                  text({"seq": 3, "ts": "2026-11-21T08:42:11.000Z"})]
        round_trip(bodies)


@given(st.integers(0, compact.MAX_TS_MS - 1))
def test_the_time_parse_is_the_inverse_of_iso_ms(ms: int) -> None:
    assert compact._ts_ms(iso_ms(ms)) == ms


@given(st.text(alphabet="0123456789-T:.Z +٣", min_size=24, max_size=24))
def test_the_time_parse_accepts_only_what_iso_ms_prints(s: str) -> None:
    ms = compact._ts_ms(s)
    assert ms is None or iso_ms(ms) == s


# -- every stream -------------------------------------------------------------------------------


@functools.cache
def asyncapi_examples() -> dict[str, list[dict[str, Any]]]:
    """Stream → the readings of the examples of docs/asyncapi.yaml (batches flattened; read
    only: shared between tests)."""
    doc = yaml.safe_load((REPO / "docs" / "asyncapi.yaml").read_text(encoding="utf-8"))
    out: dict[str, list[dict[str, Any]]] = {}
    for message in doc["components"]["messages"].values():
        for example in message.get("examples", []):
            payload = example["payload"]
            for r in payload if isinstance(payload, list) else [payload]:
                if isinstance(r, dict) and "stream" in r and "seq" in r:
                    out.setdefault(r["stream"], []).append(r)
    return out


def test_every_streams_examples_round_trip_alone_and_together() -> None:
    examples = asyncapi_examples()
    assert set(examples) == {"position", "ignition", "seal", "alarm", "temperature", "can", "health"}
    for readings in examples.values():
        for r in readings:
            round_trip([text(r)])
        round_trip([text(r) for r in readings])  # alarms: seven kinds, seven shapes, one message


def test_every_streams_examples_as_a_1hz_backlog() -> None:
    """Each example repeated with seq and ts moving on, values varying a little."""
    for readings in asyncapi_examples().values():
        batch = []
        for i in range(120):
            r = dict(readings[i % len(readings)])
            r["seq"], r["ts"] = 1000 + i, iso_ms(START_MS + i * 1000)
            if isinstance(r.get("c"), float):
                r["c"] = round(r["c"] + i / 100, 2)
            batch.append(r)
        round_trip([text(r) for r in batch])


def test_key_orders_that_no_column_order_gives_are_kept() -> None:
    readings = [{"device": DEV, "stream": "x", "seq": 1, "ts": "2026-11-21T08:42:10.000Z", "a": 1, "b": 2},
                {"device": DEV, "stream": "x", "seq": 2, "ts": "2026-11-21T08:42:11.000Z", "b": 2, "a": 1},
                {"seq": 3, "device": DEV, "stream": "x", "ts": "2026-11-21T08:42:12.000Z", "c": 3},
                {"device": DEV, "stream": "x", "seq": 4, "ts": "2026-11-21T08:42:13.000Z", "a": 1, "b": 2}]
    payload = round_trip([text(r) for r in readings])
    assert set(cbor2.loads(payload[3:])["order"]) == {1, 2}, "only the readings that need it"
    assert [list(r) for r in decode(payload)] == [list(r) for r in readings]


def test_chained_events_still_verify() -> None:
    """Seal and alarm events come back such that their canonical JSON (hash, HMAC) verifies."""
    chain = Chain(DEV, CHAIN_KEY)
    examples = asyncapi_examples()
    events = []
    for i, r in enumerate(examples["seal"] + examples["alarm"]):
        data = {k: v for k, v in r.items() if k not in ("device", "stream", "seq", "ts", "chain_seq", "prev_hash",
                                                        "hash", "hmac")}
        head, tail = encode_parts(DEV, Reading(r["stream"], START_MS + i * 60_000, data))
        events.append(chain.link(head + str(i + 1) + tail))
    decoded = []
    for stream in ("seal", "alarm"):
        batch = [b for b in events if json.loads(b)["stream"] == stream]
        round_trip(batch)
        decoded += decode(encode(batch))
    [report] = verify(decoded, key=CHAIN_KEY)
    assert report.ok and report.events == len(events), report.problems
    decoded[2]["zones"] = ["elsewhere"]
    [report] = verify(decoded, key=CHAIN_KEY)
    assert not report.ok, "the check is not vacuous"


# -- any readings ---------------------------------------------------------------------------------

SCALARS = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=6)
           | st.floats(allow_nan=False, allow_infinity=False)
           | st.builds(lambda i, e: i / 10**e, st.integers(-(10**10), 10**10), st.integers(0, 9)))
VALUES = st.recursive(SCALARS, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=3), kids,
                                                                                         max_size=3), max_leaves=6)
KEYS = st.sampled_from(["lat", "lon", "c", "event", "values", "ts_trusted", "ö", ""])


@st.composite
def reading_lists(draw: st.DrawFn) -> list[dict[str, Any]]:
    n = draw(st.integers(1, 25))
    seq = draw(st.integers(1, 10**6))
    ms = draw(st.integers(0, 4 * 10**12))
    stream = draw(st.sampled_from(["position", "alarm", "can"]))
    readings = []
    for _ in range(n):
        seq += draw(st.integers(1, 3))
        ms += draw(st.sampled_from([1000, 1000, 1000, 999, 0, 3_600_000]))
        ts = iso_ms(ms) if draw(st.integers(0, 9)) else draw(st.sampled_from(["pending", "2026-11-21T08:42:10Z"]))
        data = draw(st.dictionaries(KEYS, VALUES, max_size=6))
        r = {"device": DEV, "stream": stream, "seq": seq, "ts": ts, **data}
        if draw(st.integers(0, 7)) == 0:  # now and then a key order of its own
            keys = draw(st.permutations(list(r)))
            r = {k: r[k] for k in keys}
        readings.append(r)
    return readings


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(reading_lists())
def test_any_json_readings_round_trip_exactly(readings: list[dict[str, Any]]) -> None:
    round_trip([text(r) for r in readings])


SCALED = st.builds(lambda i, e: i / 10**e, st.integers(-(2**40), 2**40), st.integers(0, 9))


@settings(max_examples=300)
@given(st.lists(st.one_of(SCALED, st.floats(allow_nan=False, allow_infinity=False), st.integers(-(2**60), 2**60),
                          st.just(-0.0), st.none()), min_size=1, max_size=40),
       st.sampled_from([0, 1, 2]))
def test_any_numeric_column_round_trips_exactly(values: list[Any], smooth: int) -> None:
    if smooth:  # a running sum: what the differences are for
        acc, out = 0, []
        for v in values:
            if isinstance(v, int) and not isinstance(v, bool):
                acc += v % 1000
                v = acc if smooth == 1 else acc * 10
            out.append(v)
        values = out
    round_trip([text({"seq": i + 1, "x": v}) for i, v in enumerate(values)])


# -- what encode refuses --------------------------------------------------------------------------


@pytest.mark.parametrize("bodies,why", [
    ([], "nothing"),
    (["[1,2]"], "not a JSON object"),
    (['{"a":1}', "42"], "body 2"),
    (["{garbage"], "not JSON"),
    (['{"c":NaN}'], "NaN"),
    (['{"c":1e999}'], "infinities"),
    (['{"c":[1e999,2]}'], "infinities"),
    (['{"a":' + "[" * 70 + "]" * 70 + "}"], "nested deeper"),
])
def test_encode_refuses_what_is_not_readings(bodies: list[str], why: str) -> None:
    with pytest.raises(CompactError, match=why):
        encode(bodies)


# -- what decode refuses --------------------------------------------------------------------------


def message(**change: Any) -> bytes:
    """A valid two-reading message, with top-level keys changed (``...`` removes one)."""
    m: dict[str, Any] = {"v": 1, "n": 2, "cols": {"device": [0, DEV], "seq": [2, 2, [5, 1]], "c": [1, [1.5, None]]}}
    for k, v in change.items():
        if v is ...:
            del m[k]
        else:
            m[k] = v
    return cbor2.dumps(cbor2.CBORTag(55799, m))


def column(col: Any, n: int = 2) -> bytes:
    return message(n=n, cols={"x": col})


def tag(number: int, value: Any) -> cbor2.CBORTag:
    return cbor2.CBORTag(number, value)


def test_the_hand_made_message_is_valid() -> None:
    assert decode(message()) == [{"device": DEV, "seq": 5, "c": 1.5}, {"device": DEV, "seq": 6, "c": None}]
    assert decode(column([5, {1: "b"}, [0, "a"]], 3)) == [{"x": "a"}, {"x": "b"}, {"x": "a"}]
    assert decode(column([3, 2, 1, [10, tag(72, b"\x01\xff")]], 3)) == [{"x": 0.1}, {"x": 0.11}, {"x": 0.1}]
    assert decode(column([4, 1, [0, tag(70, b"\x00\x00\x00\x00\xe8\x03\x00\x00")]], 3)) == [
        {"x": "1970-01-01T00:00:00.000Z"}, {"x": "1970-01-01T00:00:00.000Z"}, {"x": "1970-01-01T00:00:01.000Z"}]
    assert decode(message(n=3, cols={})) == [{}, {}, {}]


def shared_bomb() -> Any:
    x: Any = ["boom"]
    for _ in range(60):
        x = [x, x]
    return x


MALFORMED = {
    "JSON": b'{"seq":1}',
    "empty": b"",
    "only the tag": b"\xd9\xd9\xf7",
    "another tag": cbor2.dumps(cbor2.CBORTag(55800, {"v": 1})),
    "not a map": cbor2.dumps(cbor2.CBORTag(55799, [1, 2])),
    "trailing bytes": message() + b"\x00",
    "two items": message() + message(),
    "version 2": message(v=2),
    "version true": message(v=True),
    "no version": message(v=...),
    "no n": message(n=...),
    "n zero": message(n=0),
    "n negative": message(n=-1),
    "n a float": message(n=2.0),
    "huge n": message(n=10**12),
    "huge n, 64 bits": message(n=2**64 - 1),
    "too many cells": message(n=compact.MAX_READINGS, cols={f"c{i}": [0, i] for i in range(11)}),
    "unknown key": message(extra=1),
    "cols a list": message(cols=[[0, 1]]),
    "a column name not text": message(cols={1: [0, 1]}),
    "a column not an array": column({"kind": 0}),
    "an empty column": column([]),
    "kind unknown": column([9, 1]),
    "kind a float": column([0.0, 1]),
    "const without value": column([0]),
    "const with two": column([0, 1, 2]),
    "plain too short": column([1, [1]]),
    "plain too long": column([1, [1, 2, 3]]),
    "plain not a list": column([1, "ab"]),
    "plain with a datetime": column([1, [tag(0, "2026-11-21T08:42:10Z"), 1]]),
    "plain with bytes": column([1, [b"\x01", 1]]),
    "plain with NaN": column([1, [math.nan, 1]]),
    "plain with infinity": column([1, [math.inf, 1]]),
    "plain with a nested undefined": column([1, [[cbor2.undefined], 1]]),
    "plain with an int map key": column([1, [{1: "a"}, 1]]),
    "plain with a set": column([1, [tag(258, [1]), 1]]),
    "plain with an unknown tag": column([1, [tag(4000, 1), 1]]),
    "plain with a simple value": column([1, [cbor2.CBORSimpleValue(99), 1]]),
    "shared reference bomb": cbor2.dumps(cbor2.CBORTag(55799, {"v": 1, "n": 1, "cols": {"x": [1, [shared_bomb()]]}}),
                                         value_sharing=True),
    "deep nesting": column([0, json.loads("[" * 80 + "]" * 80)]),
    "a huge constant": message(n=100_000, cols={"x": [0, list(range(20))]}),
    "int k 3": column([2, 3, [1]]),
    "int k negative": column([2, -1, [1]]),
    "int k true": column([2, True, [1]]),
    "int data a float": column([2, 0, [1.0, 2]]),
    "int data a bool": column([2, 0, [True]]),
    "int data a string": column([2, 0, "12"]),
    "int data not a list": column([2, 0, tag(72, b"\x01\x02")]),
    "int data too long": column([2, 0, [1, 2, 3]]),
    "typed array too long": column([2, 0, [tag(72, b"\x01\x02\x03")]]),
    "typed array odd bytes": column([2, 0, [tag(77, b"\x01\x02\x03")]]),
    "typed array big endian": column([2, 0, [tag(65, b"\x00\x01\x00\x02")]]),
    "typed array of floats": column([2, 0, [tag(85, b"\x00" * 8)]]),
    "typed array not bytes": column([2, 0, [tag(72, [1, 2])]]),
    "int beyond 2^53": column([2, 0, [2**53 + 1, 0]]),
    "sum beyond 2^53": column([2, 1, [2**53, 2**53]]),
    "float e 10": column([3, 10, 0, [1, 2]]),
    "float e negative": column([3, -1, 0, [1, 2]]),
    "float missing e": column([3, 0, [1, 2]]),
    "time negative": column([4, 0, [-1, 0]]),
    "time year 10000": column([4, 0, [compact.MAX_TS_MS, 0]]),
    "patch index out of range": column([5, {2: "b"}, [0, "a"]]),
    "patch index negative": column([5, {-1: "b"}, [0, "a"]]),
    "patch index a bool": column([5, {True: "b"}, [0, "a"]]),
    "patch index text": column([5, {"1": "b"}, [0, "a"]]),
    "patches not a map": column([5, [[1, "b"]], [0, "a"]]),
    "too many patches": column([5, {0: "a", 1: "b", 2: "c"}, [0, "a"]]),
    "patch within patch": column([5, {0: "b"}, [5, {0: "c"}, [0, "a"]]]),
    "patched inner too long": column([5, {0: "b"}, [1, ["a", "a"]]]),
    "patch with NaN": column([5, {0: math.nan}, [0, "a"]]),
    "order not a map": message(order=[[0, ["seq"]]]),
    "order of a reading that is not there": message(order={2: ["device", "seq", "c"]}),
    "order not a permutation": message(order={0: ["device", "seq"]}),
    "order with a repeat": message(order={0: ["device", "seq", "seq"]}),
    "order with an unknown key": message(order={0: ["device", "seq", "x"]}),
    "order keys not text": message(order={0: [["device"], "seq", "c"]}),
    "invalid UTF-8": column([0, "x"]).replace(b"ax", b"a\xff"),
    "indefinite garbage": b"\xd9\xd9\xf7\xbf\xff\xff",
    "a break alone": b"\xd9\xd9\xf7\xff",
    "a huge byte string": b"\xd9\xd9\xf7\x5b\xff\xff\xff\xff\xff\xff\xff\xff",
    "a huge array": b"\xd9\xd9\xf7\x9b\x00\xff\xff\xff\xff\xff\xff\xff",
    "a huge map": b"\xd9\xd9\xf7\xbb\x00\xff\xff\xff\xff\xff\xff\xff",
    "arrays nested 100000 deep": b"\xd9\xd9\xf7" + b"\x81" * 100_000 + b"\x00",
}


def test_malformed_names_are_unique_and_the_bases_are_valid() -> None:
    assert decode(message(order={0: ["c", "seq", "device"]}))[0] == {"c": 1.5, "seq": 5, "device": DEV}
    assert decode(column([5, {0: "b"}, [1, ["a"]]])) == [{"x": "b"}, {"x": "a"}]


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_payloads_raise_compact_error_only(name: str) -> None:
    with pytest.raises(CompactError):
        decode(MALFORMED[name])


def test_every_truncation_raises_compact_error() -> None:
    payload = encode(seq_bodies("position", positions(200)))
    for cut in range(len(payload)):
        with pytest.raises(CompactError):
            decode(payload[:cut])


def assert_readings(got: list[Any]) -> None:
    """What decode returned is readings: a non-empty list of JSON objects."""
    assert type(got) is list and got
    for r in got:
        assert type(r) is dict
        json.dumps(r, allow_nan=False)


@functools.cache
def sample_payloads() -> tuple[bytes, bytes]:
    return encode(seq_bodies("position", positions(30))), encode([text(r) for r in asyncapi_examples()["alarm"]])


@settings(max_examples=500)
@given(st.data())
def test_corrupted_payloads_raise_compact_error_or_give_readings(data: st.DataObject) -> None:
    payload = bytearray(data.draw(st.sampled_from(sample_payloads())))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(3, len(payload) - 1))
        payload[i] = data.draw(st.integers(0, 255))
    try:
        got = decode(bytes(payload))
    except CompactError:
        return
    assert_readings(got)


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_garbage_raises_compact_error(garbage: bytes) -> None:
    for payload in (garbage, compact.MAGIC + garbage):
        try:
            got = decode(payload)
        except CompactError:
            continue
        assert_readings(got)


def test_is_compact() -> None:
    assert is_compact(encode(['{"seq":1}']))
    assert is_compact(bytearray(b"\xd9\xd9\xf7\xa0"))
    for payload in (b"", b"\xd9", b"\xd9\xd9", b'{"seq":1}', b"[]", b"\xd9\xd9\xf6", "\u0665".encode()):
        assert not is_compact(payload)


def test_decode_accepts_bytes_like_payloads() -> None:
    payload = encode(seq_bodies("position", positions(5)))
    assert decode(bytearray(payload)) == decode(memoryview(payload)) == decode(payload)


# -- the documents ---------------------------------------------------------------------------------


def diagnostic(item: Any) -> str:
    """RFC 8949 section 8 diagnostic notation of a decoded CBOR item."""
    if isinstance(item, cbor2.CBORTag):
        return f"{item.tag}({diagnostic(item.value)})"
    if item is cbor2.undefined:
        return "undefined"
    if isinstance(item, bool) or item is None:
        return json.dumps(item)
    if isinstance(item, (int, str)):
        return json.dumps(item, ensure_ascii=False)
    if isinstance(item, float):
        return repr(item)
    if isinstance(item, bytes):
        return f"h'{item.hex()}'"
    if isinstance(item, list):
        return "[" + ", ".join(map(diagnostic, item)) + "]"
    if isinstance(item, dict):
        return "{" + ", ".join(f"{diagnostic(k)}: {diagnostic(v)}" for k, v in item.items()) + "}"
    raise TypeError(type(item))


def doc_blocks(section: str) -> dict[str, list[str]]:
    """Language → the fenced code blocks of one section of docs/compact.md, in order."""
    doc = COMPACT_DOC.read_text(encoding="utf-8")
    start = doc.index(f"\n## {section}\n")
    end = doc.find("\n## ", start + 1)
    out: dict[str, list[str]] = {}
    for lang, body in re.findall(r"```(\S*)\n(.*?)```", doc[start:end if end > 0 else None], re.S):
        out.setdefault(lang, []).append(body)
    return out


def test_the_worked_example_in_the_doc_is_what_the_encoder_produces() -> None:
    blocks = doc_blocks("Worked example")
    bodies = blocks["json"][0].strip().splitlines()
    assert len(bodies) == 3 and all(json.loads(b)["stream"] == "position" for b in bodies)
    payload = encode(bodies)
    assert re.sub(r"\s", "", blocks["hex"][0]) == payload.hex()
    diag = "55799(" + diagnostic(cbor2.loads(payload[3:])) + ")"
    assert re.sub(r"\s", "", blocks["cbor-diag"][0]) == re.sub(r"\s", "", diag)
    assert json.loads(blocks["json"][1]) == decode(payload) == [json.loads(b) for b in bodies]
    sizes = re.search(r"(\d+) bytes of JSON\b.*?(\d+) bytes", COMPACT_DOC.read_text(encoding="utf-8"), re.S)
    assert sizes and (int(sizes[1]), int(sizes[2])) == (len("[" + ",".join(bodies) + "]"), len(payload))


def test_the_asyncapi_compact_example_is_the_worked_example() -> None:
    doc = yaml.safe_load((REPO / "docs" / "asyncapi.yaml").read_text(encoding="utf-8"))
    message = doc["components"]["messages"]["compactBatch"]
    assert message["contentType"] == compact.CONTENT_TYPE
    [example] = message["examples"]
    bodies = doc_blocks("Worked example")["json"][0].strip().splitlines()
    assert cbor2.dumps(cbor2.CBORTag(55799, example["payload"])) == encode(bodies)


# -- real data ------------------------------------------------------------------------------------


def test_real_receiver_captures_round_trip(gpsd_captures: Path) -> None:
    """Every fix of gpsd's 34 receiver captures, as position bodies, in batches of 200."""
    total = 0
    for log in sorted(gpsd_captures.glob("*.log")):
        asm = NmeaAssembler()
        fixes = [f for line in log.read_bytes().splitlines(keepends=True) for f in asm.feed(line)]
        fixes += list(asm.finish())
        bodies = []
        for i, f in enumerate(fixes):
            head, tail = encode_parts(DEV, Reading("position", f.ts_ms, f.as_data()))
            bodies.append(head + str(i + 1) + tail)
        for i in range(0, len(bodies), 200):
            round_trip(bodies[i:i + 200])
        total += len(bodies)
    assert total >= 900
