"""Fix quality: thresholds from [gps] and the jump filter."""

from __future__ import annotations

from agent.pipeline.fixfilter import JUMP_BELIEVE_AFTER, FixFilter
from drivers.gps.config import GpsConfig

T0 = 1_790_000_000_000
DEG_PER_KM = 1 / 111.195


def f(lat: float = 22.0, sats: int | None = 9, hdop: float | None = 0.9) -> dict:
    return {"lat": lat, "lon": 106.7, "sats": sats, "hdop": hdop}


def test_quality_thresholds() -> None:
    ff = FixFilter(GpsConfig(replay="x", min_sats=5, max_hdop=4.0, min_mode="3d"))
    assert ff.reject_reason(T0, f(sats=4), 3) == "few_sats"
    assert ff.reject_reason(T0, f(hdop=5.5), 3) == "high_hdop"
    assert ff.reject_reason(T0, f(), 2) == "2d_only"
    assert ff.reject_reason(T0, f(sats=None, hdop=None), None) is None, "unknown values pass"
    assert dict(ff.rejected) == {"few_sats": 1, "high_hdop": 1, "2d_only": 1}


def test_zero_disables_a_threshold() -> None:
    ff = FixFilter(GpsConfig(replay="x", min_sats=0, max_hdop=0, max_speed_kmh=0))
    assert ff.reject_reason(T0, f(sats=1, hdop=50), 2) is None
    assert ff.reject_reason(T0 + 1000, f(lat=30.0), 2) is None


def test_jump_filter_rejects_impossible_moves_and_recovers() -> None:
    ff = FixFilter(GpsConfig(replay="x", max_speed_kmh=200))
    assert ff.reject_reason(T0, f(), 3) is None
    # 1 km in a second: multipath, not a lorry.
    assert ff.reject_reason(T0 + 1000, f(lat=22.0 + DEG_PER_KM), 3) == "jump"
    # 30 m a second (108 km/h) from the last good fix is fine.
    assert ff.reject_reason(T0 + 2000, f(lat=22.0 + 0.06 * DEG_PER_KM), 3) is None
    # After a long gap (a tunnel, 10 min) 15 km is possible at 90 km/h.
    assert ff.reject_reason(T0 + 602_000, f(lat=22.0 + 15.06 * DEG_PER_KM), 3) is None
    # A receiver that really is far away (after a ferry) is believed after a few fixes.
    far = 23.0
    results = [ff.reject_reason(T0 + 603_000 + i * 1000, f(lat=far), 3) for i in range(JUMP_BELIEVE_AFTER)]
    assert results == ["jump"] * (JUMP_BELIEVE_AFTER - 1) + [None]
    assert ff.reject_reason(T0 + 700_000, f(lat=far), 3) is None
