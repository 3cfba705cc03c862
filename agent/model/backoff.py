"""Retry delays shared by everything that reconnects (broker, serial ports)."""

from __future__ import annotations

import random


def backoff_delay(attempt: int, low: float, high: float) -> float:
    """Capped exponential backoff with jitter, so a fleet of lorries leaving the same dead
    zone (or a broker coming back) does not retry in lockstep. ``attempt`` counts from 1."""
    base: float = min(high, low * 2 ** min(max(attempt - 1, 0), 20))
    return base * random.uniform(0.5, 1.0)
