"""Reporting policy: how many positions (and bytes) the agent sends, and how true the track stays.

Input: the bundled demo trip, ``agent.demo.trip.drive()`` with its defaults (15,827 fixes 5 s
apart, Chongqing -> Youyiguan -> Hanoi: expressway bends, a rest stop, a border queue and a
customs yard). Each ``TruthFix`` becomes the dict the GPS driver produces (``Fix.as_data``:
lat, lon, speed_kmh, course, alt_m, sats, hdop, fix="gps") and is fed, in order, to
``ReportingPolicy.decide(ts_ms, fix)``. These are the trip's own values; the NMEA round trip
gives the same to within rounding (a lat/lon may move by 1e-7 degree, and the speed gains a
second decimal from the knots conversion: ~0.4 B more a body, on both sides). The pipeline's
fix-quality filter is not applied: with its defaults it passes every fix of this trip (9-18
satellites, HDOP <= 1.4, no jumps).

Project figure, per setting: positions reported, counting a ``Decision.corner`` (an earlier
fix reported first) and the fix itself when ``Decision.report``; and the bytes of their JSON
bodies, encoded as the agent publishes them: ``encode_parts(device, Reading("position", ts,
data))`` -> ``head + str(seq) + tail``, with ``"event"`` added to the data as the pipeline
does and seq counting up from 1 per stream as the store assigns it. (The uplink's batches add
``[``, ``,`` and ``]`` around bodies: about a byte a reading, not counted on either side.)

Baseline, same run, same fixes: reporting every fix (what the policy does with all three
moving thresholds at 0), encoded the same way. It is the track at full fidelity, so the ratio
is what the policy saves, and the fidelity figure below says what that saving costs.

Fidelity: the largest distance from any fix of the full track to the polyline through the
reported fixes (for each fix between two consecutive reported ones, its distance to that
segment, in ``agent.model.geo.local_xy`` metres around the segment's start), and the place
(``TruthFix.place``) where it occurs. Fixes after the last report have no segment yet (the
next report was not due when the track ended) and are not measured; their number is printed.

Goal (from the issue): the default policy reports >= 5x fewer positions than every fix, with
no fix of the track more than 25 m from the reported polyline. The alternative settings show
why the defaults are what they are: the defaults without the corridor rule, a typical
fleet-tracker profile ("Teltonika-like": 60 s / 500 m / 10 degrees, no corridor), and that
profile with the 20 m corridor added.

    python bench/bench_policy.py [--interval 5] [--hours H]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from _positions import DEVICE

from agent.config import ReportingConfig
from agent.demo.trip import TruthFix, drive
from agent.model.geo import local_xy, segment_distance_m
from agent.model.reading import Reading, encode_parts
from agent.pipeline.reporting import ReportingPolicy

FEWER_GOAL = 5.0
DEVIATION_GOAL_M = 25.0

SETTINGS: list[tuple[str, dict]] = [
    ("default (120 s / 1000 m / 8 deg, 20 m corridor)", {}),
    ("corridor off (max_deviation_m=0)", {"max_deviation_m": 0}),
    ("Teltonika-like (60 s / 500 m / 10 deg, no corridor)",
     {"min_period_s": 60, "min_distance_m": 500, "min_heading_deg": 10, "max_deviation_m": 0}),
    ("Teltonika-like + 20 m corridor",
     {"min_period_s": 60, "min_distance_m": 500, "min_heading_deg": 10, "max_deviation_m": 20}),
]


def ts_ms(f: TruthFix) -> int:
    return int(f.ts.timestamp()) * 1000 + f.ts.microsecond // 1000


def as_data(f: TruthFix) -> dict:
    """What drivers/gps/nmea.py ``Fix.as_data`` gives for this epoch."""
    return {"lat": f.lat, "lon": f.lon, "speed_kmh": f.speed_kmh, "course": f.course,
            "alt_m": f.alt_m, "sats": f.sats, "hdop": f.hdop, "fix": "gps"}


def body_bytes(readings: list[Reading]) -> int:
    total = 0
    for seq, r in enumerate(readings, 1):
        head, tail = encode_parts(DEVICE, r)
        total += len(f"{head}{seq}{tail}".encode())
    return total


@dataclass
class Result:
    readings: list[Reading]
    indices: list[int]
    """Index in the track of each reported fix, in the order reported."""
    corners: int
    events: int


def run_policy(config: ReportingConfig, times: list[int], data: list[dict]) -> Result:
    policy = ReportingPolicy(config)
    index = {id(d): i for i, d in enumerate(data)}
    readings: list[Reading] = []
    indices: list[int] = []
    corners = events = 0
    for t, d in zip(times, data):
        decision = policy.decide(t, d)
        if decision.corner is not None:
            ct, cd = decision.corner
            readings.append(Reading("position", ct, cd))
            indices.append(index[id(cd)])
            corners += 1
        if decision.report:
            if decision.event:
                events += 1
                readings.append(Reading("position", t, {**d, "event": decision.event}))
            else:
                readings.append(Reading("position", t, d))
            indices.append(index[id(d)])
    return Result(readings, indices, corners, events)


def max_deviation(fixes: list[TruthFix], reported: list[int]) -> tuple[float, int]:
    """(metres, track index) of the fix farthest from the reported polyline."""
    if not reported or reported[0] != 0:
        raise RuntimeError("the first fix was not reported")
    if any(b <= a for a, b in zip(reported, reported[1:])):
        raise RuntimeError("reported fixes are not in track order")
    worst, at = 0.0, 0
    for a, b in zip(reported, reported[1:]):
        fa = fixes[a]
        pb = local_xy(fa.lat, fa.lon, fixes[b].lat, fixes[b].lon)
        for i in range(a + 1, b):
            f = fixes[i]
            d = segment_distance_m(local_xy(fa.lat, fa.lon, f.lat, f.lon), (0.0, 0.0), pb)
            if d > worst:
                worst, at = d, i
    return worst, at


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--interval", type=float, default=5.0, help="seconds between fixes (trip default 5)")
    ap.add_argument("--hours", type=float, default=None, help="only the first H hours of the trip")
    a = ap.parse_args()

    fixes = list(drive(interval_s=a.interval, max_hours=a.hours))
    times = [ts_ms(f) for f in fixes]
    data = [as_data(f) for f in fixes]
    n = len(fixes)

    every = run_policy(ReportingConfig(min_period_s=0, min_distance_m=0, min_heading_deg=0), times, data)
    if len(every.readings) != n:
        raise RuntimeError(f"every-fix setting reported {len(every.readings)} of {n}")
    base_bytes = body_bytes(every.readings)
    hours = (times[-1] - times[0]) / 3_600_000
    print(f"reporting policy, demo trip: {n:,} fixes {a.interval:g} s apart over {hours:.1f} h "
          f"({fixes[0].place} -> {fixes[-1].place})")
    print(f"  baseline, every fix:  {n:>6,} positions  {base_bytes:>10,} B  "
          f"(~{base_bytes // n} B each)")

    default_ok = None
    for name, overrides in SETTINGS:
        r = run_policy(ReportingConfig(**overrides), times, data)
        k = len(r.readings)
        b = body_bytes(r.readings)
        dev, at = max_deviation(fixes, r.indices)
        f = fixes[at]
        print(f"  {name}")
        print(f"    positions {k:>6,} ({r.corners:,} corners, {r.events:,} events)  "
              f"{n / k:>5.1f}x fewer   bytes {b:>9,}  {base_bytes / b:>5.1f}x fewer")
        tail = n - 1 - r.indices[-1]
        print(f"    max distance of a fix from the reported polyline {dev:6.1f} m, "
              f"at {f.place} ({f.ts:%Y-%m-%d %H:%M:%S}Z, {f.speed_kmh:g} km/h)"
              + (f"; {tail:,} fixes after the last report not measured" if tail else ""))
        if default_ok is None:
            default_ok = n / k >= FEWER_GOAL and dev <= DEVIATION_GOAL_M
    print(f"  goal (default): >= {FEWER_GOAL:g}x fewer positions, no fix > {DEVIATION_GOAL_M:g} m "
          f"from the polyline: {'met' if default_ok else 'NOT met'}")


if __name__ == "__main__":
    main()
