"""This release's date as evidence about time (agent.RELEASE_DATE): no correct clock or capture
of a running agent can be much earlier or later than it (drivers/gps/gnsstime.py judges GNSS
dates by it; drivers/can/candump.py tells absolute capture times from uptimes by it)."""

from __future__ import annotations

import datetime as dt

from agent import RELEASE_DATE

DAY_MS = 86_400_000
RELEASE_MS = (dt.date.fromisoformat(RELEASE_DATE) - dt.date(1970, 1, 1)).days * DAY_MS
"""Midnight UTC at the start of the release day, in Unix milliseconds."""
