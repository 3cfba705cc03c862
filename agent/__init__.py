"""lorry-agent: the onboard telematics agent (see README.md)."""

__version__ = "0.1.0"
RELEASE_DATE = "2026-12-05"
"""When this version was released: evidence about what dates a receiver can mean before any
trusted time is known (drivers/gps/gnsstime.py). Set with each release; never later than it."""
