"""A buffered backlog written through the store, as a day in a dead zone leaves it."""

from __future__ import annotations

import math
import random
from pathlib import Path

from agent.model.chain import Chain
from agent.model.reading import Reading
from agent.store.buffer import Store

DEVICE = "CQ-HN-0042"


START_MS = 1_795_000_000_000


def backlog(db: Path, positions: int, events: int) -> None:
    """A day's worth of buffered readings, shortened: 1 Hz positions with seal events and
    alarms among them, written through the store (seqs and the chain as the agent makes them)."""
    rng = random.Random(7)
    store = Store(db, device=DEVICE, chain=Chain(DEVICE))
    store.start()
    lat, lon, course = 29.5630, 106.5516, 205.0
    every = max(1, positions // max(1, events))
    for i in range(positions):
        course = (course + rng.gauss(0, 4)) % 360
        lat += 0.0002 * math.cos(math.radians(course))
        lon += 0.0002 * math.sin(math.radians(course))
        ts = START_MS + i * 1000
        store.append(Reading("position", ts, {"lat": round(lat, 7), "lon": round(lon, 7),
                                              "speed_kmh": round(rng.uniform(40, 80), 2), "course": round(course, 2),
                                              "alt_m": round(rng.uniform(200, 300), 1), "sats": rng.randint(7, 14),
                                              "hdop": round(rng.uniform(0.6, 1.8), 1), "fix": "gps"}))
        if i % every == every // 2:
            store.append(Reading("seal", ts, {"seal": "container_door", "event": "opened"}, urgent=True))
            store.append(Reading("alarm", ts, {"kind": "seal_opened", "state": "raised", "severity": "critical",
                                               "seal": "container_door"}, urgent=True))
    store.close()
