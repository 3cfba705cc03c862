"""Realistic position readings for the benchmarks: a lorry heading south-west from Chongqing.

One fix a second, with the fields and rounding the NMEA driver produces (drivers/gps/nmea.py
``Fix.as_data``), so payload sizes match what a real backlog holds (~200 bytes a reading).
Deterministic (seeded), so every run and both sides of a comparison see the same data.
"""

from __future__ import annotations

import math
import random
import sys
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "tests"):  # tests/ holds the test kit the benchmarks share (linksim)
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from agent.model.reading import Reading  # noqa: E402

DEVICE = "CQ-HN-0042"
START_MS = 1_795_000_000_000  # 2026-11-18T11:06:40Z


def positions(n: int, seed: int = 42) -> Iterator[Reading]:
    rng = random.Random(seed)
    lat, lon, course, alt = 29.5630, 106.5516, 205.0, 244.0
    for i in range(n):
        speed = max(0.0, min(95.0, rng.gauss(68.0, 12.0)))
        course = (course + rng.gauss(0.0, 4.0)) % 360.0
        step_km = speed / 3600.0
        lat += step_km / 111.32 * math.cos(math.radians(course))
        lon += step_km / (111.32 * math.cos(math.radians(lat))) * math.sin(math.radians(course))
        alt = max(20.0, alt + rng.gauss(0.0, 0.8))
        yield Reading(
            "position",
            START_MS + i * 1000,
            {
                "lat": round(lat, 7),
                "lon": round(lon, 7),
                "speed_kmh": round(speed, 2),
                "course": round(course, 2),
                "alt_m": round(alt, 1),
                "sats": rng.randint(7, 18),
                "hdop": round(rng.uniform(0.6, 1.8), 1),
                "fix": "gps",
            },
        )
