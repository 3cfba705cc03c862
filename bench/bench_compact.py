"""Compact encoding: readings/s through ``agent.compact.encode`` / ``decode``, and payload bytes.

Project figures: ``compact.encode(bodies)`` of 200-position batches (the uplink's default
``max_batch``), the bodies exactly as the store holds them (``encode_parts`` around the seq),
best of N runs; and ``compact.decode`` of the resulting messages. Encode is on the uplink's hot
path while a backlog drains; decode runs on the backend and in ``lorry-agent watch``.

Baselines, same run, same readings: ``json.dumps`` of the same list of dicts (the cost of
producing a JSON batch from values, which is what encode does from the bodies' values), and
``json.loads`` of the JSON batch for decode. Encode parses the JSON bodies and builds columns,
so it cannot beat json.dumps; the ratio says what the bytes saved cost in CPU.
Goal: encode >= 50,000 readings/s on a 2-core x86 (the target ARM board is several times
slower).

Bytes: payload bytes per position (no MQTT or TCP overhead), JSON batch (``[`` + bodies
joined by ``,`` + ``]``, as the uplink publishes it) vs compact, for 200- and 300-reading
batches of these 1 Hz positions and of the demo trip at 1 Hz through the NMEA driver. Goal:
<= 15 B a position (JSON: ~190-200 B).

    python bench/bench_compact.py [--batch 200] [--batches 50] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from _positions import DEVICE, positions

from agent import compact
from agent.compact.decoder import decode
from agent.demo import trip
from agent.model.reading import Reading, encode_parts
from drivers.gps.nmea import NmeaAssembler

ENCODE_GOAL = 50_000
BYTES_GOAL = 15.0


def bodies_of(readings: list[Reading], first_seq: int = 1) -> list[str]:
    out = []
    for i, r in enumerate(readings):
        head, tail = encode_parts(DEVICE, r)
        out.append(head + str(first_seq + i) + tail)
    return out


def trip_bodies(hours: float) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        capture = Path(tmp) / "trip.nmea"
        trip.write(capture, interval_s=1, max_hours=hours)
        asm = NmeaAssembler()
        fixes = [f for line in capture.read_bytes().splitlines(keepends=True) for f in asm.feed(line)]
        fixes += list(asm.finish())
    return bodies_of([Reading("position", f.ts_ms, f.as_data()) for f in fixes])


def best_rate(fn, items: list, per_item: int, repeat: int) -> float:  # noqa: ANN001
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for item in items:
            fn(item)
        best = min(best, time.perf_counter() - t0)
    return len(items) * per_item / best


def sizes(bodies: list[str], batch: int) -> tuple[float, float]:
    """(JSON, compact) payload bytes a reading over the full batches of ``bodies``."""
    full = [bodies[i:i + batch] for i in range(0, len(bodies) - batch + 1, batch)]
    n = len(full) * batch
    json_bytes = sum(len(("[" + ",".join(b) + "]").encode()) for b in full)
    compact_bytes = sum(len(compact.encode(b)) for b in full)
    return json_bytes / n, compact_bytes / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=200, help="readings a message (default 200)")
    ap.add_argument("--batches", type=int, default=50, help="messages timed per run (default 50)")
    ap.add_argument("--repeat", type=int, default=5, help="runs; the best counts (default 5)")
    a = ap.parse_args()

    bodies = bodies_of(list(positions(a.batch * a.batches)))
    batches = [bodies[i:i + a.batch] for i in range(0, len(bodies), a.batch)]
    dicts = [[json.loads(b) for b in batch] for batch in batches]
    payloads = [compact.encode(b) for b in batches]
    json_texts = ["[" + ",".join(b) + "]" for b in batches]
    for batch, payload in zip(dicts, payloads):  # lossless, or the figures mean nothing
        if decode(payload) != batch:
            raise RuntimeError("compact round trip is not exact")

    enc = best_rate(compact.encode, batches, a.batch, a.repeat)
    base_enc = best_rate(json.dumps, dicts, a.batch, a.repeat)
    dec = best_rate(decode, payloads, a.batch, a.repeat)
    base_dec = best_rate(json.loads, json_texts, a.batch, a.repeat)

    print(f"compact encoding, {a.batches} batches of {a.batch} positions at 1 Hz, best of {a.repeat}")
    print(f"  compact.encode(bodies)          {enc:>10,.0f} readings/s")
    print(f"  baseline json.dumps(dicts)      {base_enc:>10,.0f} readings/s")
    print(f"  ratio encode/baseline           {enc / base_enc:>10.2f}x")
    print(f"  compact.decode(payload)         {dec:>10,.0f} readings/s")
    print(f"  baseline json.loads(batch)      {base_dec:>10,.0f} readings/s")
    print(f"  ratio decode/baseline           {dec / base_dec:>10.2f}x")
    print(f"  goal encode >= {ENCODE_GOAL:,} readings/s: {'met' if enc >= ENCODE_GOAL else 'NOT met'}")

    print("payload bytes a position (JSON batch -> compact)")
    worst = 0.0
    demo = trip_bodies(hours=2)
    for name, data in (("bench positions (noisy speed)", bodies), ("demo trip via NMEA", demo)):
        for batch in (200, 300):
            j, c = sizes(data, batch)
            worst = max(worst, c)
            print(f"  {name:<30} batch {batch}:  {j:6.1f} B -> {c:5.2f} B  ({j / c:4.1f}x smaller)")
    print(f"  goal <= {BYTES_GOAL:g} B a position: {'met' if worst <= BYTES_GOAL else 'NOT met'}")


if __name__ == "__main__":
    main()
