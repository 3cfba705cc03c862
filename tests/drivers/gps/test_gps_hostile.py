"""A receiver (or a capture) that lies: impossible dates, absurd values, hostile comment lines.

One bad epoch must never be published, never move the clock, never date the epochs after it
and never decide what else is deleted; an absurd value is published as null, counted.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.demo.broker import Mosquitto
from agent.demo.trip import sentence
from agent.model import ranges
from drivers.gps.gnsstime import ERA_MS, RELEASE_MS, GnssTimeJudge
from drivers.gps.nmea import Fix, NmeaAssembler
from support import REPO, AgentProcess, Backend, agent_config, wait_until, write_config

DAY = dt.date(2026, 11, 24)
T0 = round(dt.datetime(2026, 11, 24, 3, 0, tzinfo=dt.UTC).timestamp() * 1000)
DATA_FIELDS = ("speed_kmh", "course", "alt_m", "sats", "hdop")


def hms(t_ms: int) -> str:
    t = dt.datetime.fromtimestamp(t_ms / 1000, dt.UTC)
    return f"{t:%H%M%S}.00"


def rmc(t_ms: int, *, date: str | None = None, speed: str = "030.0", course: str = "084.4",
        lat: str = "2249.0000,N", lon: str = "10818.0000,E") -> str:
    day = dt.datetime.fromtimestamp(t_ms / 1000, dt.UTC)
    return sentence(f"GPRMC,{hms(t_ms)},A,{lat},{lon},{speed},{course},{date or f'{day:%d%m%y}'},,,A")


def gga(t_ms: int, *, sats: str = "09", hdop: str = "0.9", alt: str = "80.0") -> str:
    return sentence(f"GPGGA,{hms(t_ms)},2249.0000,N,10818.0000,E,1,{sats},{hdop},{alt},M,-20.0,M,,")


def zda(t_ms: int, day: int, month: int, year: int) -> str:
    return sentence(f"GPZDA,{hms(t_ms)},{day:02d},{month:02d},{year:04d},,")


def epoch(t_ms: int, **kw: str) -> list[str]:
    rmc_kw = {k: v for k, v in kw.items() if k in ("date", "speed", "course", "lat", "lon")}
    gga_kw = {k: v for k, v in kw.items() if k in ("sats", "hdop", "alt")}
    return [rmc(t_ms, **rmc_kw), gga(t_ms, **gga_kw)]


def feed(lines: list[str | bytes], asm: NmeaAssembler | None = None) -> tuple[list[Fix], NmeaAssembler]:
    asm = asm or NmeaAssembler()
    out: list[Fix] = []
    for line in lines:
        out += asm.feed(line)
    out += asm.finish()
    return out, asm


# -- dates -------------------------------------------------------------------------------------


def test_an_rmc_dated_2099_is_refused_and_the_fixes_around_it_kept() -> None:
    lines = epoch(T0) + epoch(T0 + 1000) + epoch(T0 + 2000, date="241199") + epoch(T0 + 3000)
    fixes, asm = feed(lines)
    assert [f.ts_ms for f in fixes] == [T0, T0 + 1000, T0 + 3000]
    assert asm.counters.bad_date == 1 and sum(asm.judge.refused.values()) == 1


def test_after_a_zda_in_year_3000_later_fixes_keep_the_believed_date() -> None:
    """A GGA-only receiver dated by ZDA: the bad ZDA's epoch is refused, and the next epochs
    are dated from the last believed ZDA, not from year 3000."""
    lines = [zda(T0, 24, 11, 2026), gga(T0), gga(T0 + 1000), zda(T0 + 2000, 24, 11, 3000), gga(T0 + 2000)]
    lines += [gga(T0 + 3000), gga(T0 + 4000)]
    fixes, asm = feed(lines)
    assert [f.ts_ms for f in fixes] == [T0, T0 + 1000, T0 + 3000, T0 + 4000]
    assert asm.counters.bad_date == 1


@pytest.mark.parametrize("comment", ["# Date: 9999-12-31", "# Date: 0001-01-01", "# Date: 2026-13-45",
                                     "#Date:", "# date: 99999-01-01", "#" + "\x00\xff" * 40])
def test_hostile_comment_lines_never_raise_and_never_move_dates(comment: str) -> None:
    lines = [comment] + epoch(T0) + [comment] + epoch(T0 + 1000)
    fixes, asm = feed(lines)
    assert [f.ts_ms for f in fixes] == [T0, T0 + 1000]
    assert asm.counters.internal_errors == 0


def test_zda_on_the_last_day_of_9999_then_midnight_never_overflows() -> None:
    """Rolling over midnight from 9999-12-31 used to raise OverflowError and kill the driver."""
    lines = [zda(T0, 31, 12, 9999), gga(T0), gga(T0 - 3 * 3600_000 + 86_400_000 - 1000)]  # 23:59:59
    lines += [gga(T0 + 1000 - 3 * 3600_000 + 86_400_000)]  # 00:00:01 the next "day"
    lines += [zda(T0 + 5000, 24, 11, 2026), gga(T0 + 5000)]
    fixes, asm = feed(lines)
    assert [f.ts_ms for f in fixes] == [T0 + 5000]
    assert asm.counters.internal_errors == 0 and asm.counters.bad_date >= 1


def test_one_glitch_within_the_era_does_not_take_the_clock_with_it() -> None:
    """Good fixes, one epoch dated 2031 (possible, but not after 2026 a second ago), good again."""
    later = epoch(T0 + 2000, date="241131")
    fixes, _ = feed(epoch(T0) + epoch(T0 + 1000) + later + epoch(T0 + 3000) + epoch(T0 + 4000))
    assert [f.ts_ms for f in fixes] == [T0, T0 + 1000, T0 + 3000, T0 + 4000]


def test_a_receiver_that_starts_with_a_wrong_date_is_believed_once_it_agrees_with_itself() -> None:
    """The first fix said 2031 (nothing to compare with yet); the next ones agree with each
    other: after a few the receiver, not its first fix, is believed."""
    first = epoch(T0, date="241131")
    rest = [line for i in range(1, 12) for line in epoch(T0 + i * 1000)]
    fixes, asm = feed(first + rest)
    times = [f.ts_ms for f in fixes]
    assert times[-6:] == [T0 + i * 1000 for i in range(6, 12)] and asm.judge.reanchored == 1


# -- week rollover -----------------------------------------------------------------------------


@pytest.mark.parametrize("year", [1, 1000, 1900, 1979, 1950])
def test_a_date_before_gnss_time_is_refused_not_rolled_over_into_the_era(year: int) -> None:
    """Year 1 is no receiver's rollover bug: 'correcting' it by 103 eras would publish a
    plausible-looking wrong date."""
    lines = [zda(T0, 24, 11, year), gga(T0)]
    fixes, asm = feed(lines)
    assert fixes == [] and asm.judge.refused == {"before_gnss_time": 1} and asm.judge.rollover == 0


def test_a_2019_capture_keeps_its_dates() -> None:
    """The floor was fixed at 2025: a 2019 capture moved 1024 weeks on, its own header ignored."""
    t = round(dt.datetime(2019, 3, 28, 16, 45, tzinfo=dt.UTC).timestamp() * 1000)
    for header in (["# Date: 2019-03-28"], []):
        fixes, asm = feed(header + epoch(t) + epoch(t + 1000))
        assert [f.ts_ms for f in fixes] == [t, t + 1000], header
        assert asm.judge.rollover == 0


def test_a_rollover_victim_moves_forward_by_1024_weeks() -> None:
    """gp-320fw's overflow: RMC says 1999-08-22 in a capture of 2019-04-06."""
    true = round(dt.datetime(2019, 4, 6, 12, 0, tzinfo=dt.UTC).timestamp() * 1000)
    fixes, asm = feed(["# Date: 2019-04-06"] + epoch(true - ERA_MS) + epoch(true - ERA_MS + 1000))
    assert [f.ts_ms for f in fixes] == [true, true + 1000] and asm.judge.rollover == 2


def test_a_live_receiver_with_the_rollover_bug_is_corrected_against_this_release() -> None:
    judge = GnssTimeJudge(live=True)
    assert judge.judge(T0 - ERA_MS, 0) == T0
    assert judge.judge(T0 + 1000, 10**9) == T0 + 1000


def test_a_live_receiver_is_judged_by_ntp_time_when_the_kernel_has_it() -> None:
    ntp = T0 + 5000
    judge = GnssTimeJudge(live=True, system_now_ms=lambda: ntp)
    assert judge.judge(T0 + 2 * 86_400_000, 0) is None, "two days from NTP time"
    assert judge.refused == {"disagrees_with_system_time": 1}
    assert judge.judge(T0, 0) == T0


def test_live_dates_long_before_this_release_are_refused() -> None:
    judge = GnssTimeJudge(live=True)
    year_ago = RELEASE_MS - 365 * 86_400_000
    assert judge.judge(year_ago, 0) is None and judge.refused == {"outside_release_era": 1}


# -- values ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kw", "field"), [
    ({"hdop": "-5"}, "hdop"), ({"hdop": "0"}, "hdop"), ({"sats": "99999"}, "sats"), ({"sats": "-3"}, "sats"),
    ({"alt": "1e300"}, "alt_m"), ({"course": "9999"}, "course"), ({"course": "-90"}, "course"),
    ({"speed": "-50.0"}, "speed_kmh"), ({"speed": "1000000"}, "speed_kmh"),
])
def test_impossible_values_are_published_as_null_and_counted(kw: dict[str, str], field: str) -> None:
    fixes, asm = feed(epoch(T0, **kw))
    assert len(fixes) == 1
    assert fixes[0].as_data()[field] is None
    assert asm.ranges.counts == {field: 1}
    others = {k: v for k, v in fixes[0].as_data().items() if k in DATA_FIELDS and k != field}
    assert None not in others.values(), "the other fields of the epoch are kept"


def test_satellites_in_view_out_of_range_are_counted_not_shown() -> None:
    asm = NmeaAssembler()
    feed([sentence("GPGSV,1,1,99999,01,40,083,46"), sentence("GLGSV,1,1,-4,01,40,083,46"),
          sentence("GAGSV,1,1,07,01,40,083,46")], asm)
    assert asm.satellites_in_view == {"Galileo": 7}
    assert asm.counters.bad_field == 2 and asm.ranges.counts == {"sats_in_view": 2}


# -- properties --------------------------------------------------------------------------------

NUMBER = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(min_value=-10**30, max_value=10**30).map(str),
    st.sampled_from(["", " ", "nan", "inf", "-0", "1e300", "-1e-300", "0x10", "1_0", "٣"]),
)


def _in_range(fix: Fix) -> list[str]:
    data = fix.as_data()
    bad = [k for k in DATA_FIELDS if data[k] is not None and not ranges.in_range(k, data[k])]
    return bad + [k for k in ("lat", "lon") if not ranges.in_range(k, data[k])]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(speed=NUMBER, course=NUMBER, sats=NUMBER, hdop=NUMBER, alt=NUMBER)
def test_no_out_of_range_value_is_ever_published(speed: str, course: str, sats: str, hdop: str, alt: str) -> None:
    fixes, asm = feed(epoch(T0, speed=speed, course=course, sats=sats, hdop=hdop, alt=alt) + epoch(T0 + 1000))
    assert all(not _in_range(f) for f in fixes), [(_in_range(f), f) for f in fixes]
    assert fixes and fixes[-1].ts_ms == T0 + 1000, "the good epoch after a bad one is not lost"
    assert asm.counters.internal_errors == 0


DATE_FIELD = st.one_of(
    st.text(alphabet="0123456789", min_size=0, max_size=8),
    st.text(max_size=8).filter(lambda s: "," not in s and "*" not in s and s.isascii() and s.isprintable()),
)


@settings(max_examples=400, deadline=None)
@given(rmc_date=DATE_FIELD, zda_day=st.integers(-5, 40), zda_month=st.integers(-1, 14),
       zda_year=st.integers(0, 99_999), comment=st.text(max_size=40))
def test_no_date_ever_raises_dates_a_good_fix_wrongly_or_is_published_far_off(
        rmc_date: str, zda_day: int, zda_month: int, zda_year: int, comment: str) -> None:
    """Whatever dates arrive (RMC, ZDA, a '#' line), nothing raises, nothing published lies
    outside the era of this release, and the good epochs after the bad ones come through."""
    bad = [rmc(T0, date=rmc_date or None), sentence(f"GPZDA,{hms(T0 + 1000)},{zda_day},{zda_month},{zda_year},,"),
           "# " + comment.replace("\n", " "), gga(T0 + 1000)]
    good = [line for i in range(2, 10) for line in epoch(T0 + i * 1000)]
    fixes, asm = feed(bad + good)
    assert asm.counters.internal_errors == 0
    lo, hi = RELEASE_MS - ERA_MS // 2, RELEASE_MS + ERA_MS // 2
    assert all(lo <= f.ts_ms <= hi for f in fixes), [f.ts_ms for f in fixes]
    assert {T0 + i * 1000 for i in range(7, 10)} <= {f.ts_ms for f in fixes}, "good epochs lost"


# -- end to end --------------------------------------------------------------------------------


def hostile_capture(path: Path, n: int = 120) -> list[int]:
    """A 1 Hz drive with bad epochs mixed in; returns the times of the good fixes."""
    lines: list[str] = ["# Date: 9999-12-31\n"]
    good = []
    for i in range(n):
        t = T0 + i * 1000
        if i == 30:
            lines += [x + "\r\n" for x in epoch(t, date="241199")]  # 2099
        elif i == 60:
            lines += [zda(t, 24, 11, 3000) + "\r\n", "# Date: 0001-01-01\n"]
        elif i == 90:
            lines += [x + "\r\n" for x in epoch(t, hdop="-5", sats="99999", alt="1e300", course="9999")]
            good.append(t)
        else:
            lines += [x + "\r\n" for x in epoch(t, lat=f"22{49 + i // 600:02d}.{i % 600:04d},N")]
            good.append(t)
    path.write_text("".join(lines))
    return good


def _published(stdout: str) -> list[dict]:
    out = []
    for line in stdout.splitlines():
        msg = json.loads(line)
        payload = msg["payload"]
        out += payload if isinstance(payload, list) else [payload]
    return out


def test_dry_run_publishes_every_good_fix_and_no_bad_one(tmp_path: Path) -> None:
    capture = tmp_path / "drive.nmea"
    good = hostile_capture(capture)
    cfg = write_config(tmp_path / "agent.toml", {
        "device": {"id": "CQ-HN-0042"},
        "store": {"path": str(tmp_path / "buffer.db"), "max_age_days": 1},
        "gps": {"replay": str(capture), "replay_speed": 0, "min_sats": 0, "max_hdop": 0},
        "reporting": {"min_period_s": 0, "min_distance_m": 0, "min_heading_deg": 0},
        "health": {"interval_s": 0},
    })
    proc = subprocess.run([sys.executable, "-m", "agent", "run", "--config", str(cfg), "--dry-run"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    readings = _published(proc.stdout)
    positions = [r for r in readings if r["stream"] == "position"]
    times = sorted(round(dt.datetime.fromisoformat(p["ts"].replace("Z", "+00:00")).timestamp() * 1000)
                   for p in positions)
    assert times == good, f"{len(times)} of {len(good)} good fixes published"
    assert [r for r in readings if r["stream"] == "alarm" and r.get("kind") == "data_dropped"] == []
    odd = next(p for p in positions if p["ts"].endswith("03:01:30.000Z"))
    assert (odd["hdop"], odd["sats"], odd["alt_m"], odd["course"]) == (None, None, None, None)


def test_a_bad_date_buffered_with_the_broker_down_sheds_nothing(tmp_path: Path, broker: Mosquitto) -> None:
    """The outside tester's case: with the broker away, the store aged every real position
    against the one dated 2099 and shed them all as too_old. Through a real mosquitto."""
    capture = tmp_path / "drive.nmea"
    good = hostile_capture(capture)
    broker.stop()
    cfg = agent_config(tmp_path, broker.port, gps={"replay": str(capture), "replay_speed": 0, "min_sats": 0,
                                                   "max_hdop": 0},
                       store_extra={"max_age_days": 1}, health={"interval_s": 0},
                       time={"trust_system_clock": "never"})
    with AgentProcess(cfg, "--until-drained") as agent:
        wait_until(lambda: "GPS" in agent.log() or (tmp_path / "state" / "buffer.db").exists(), 30, "the agent")
        import time

        time.sleep(12)  # past the store's maintenance interval (10 s), replay long finished
        broker.start()
        backend = Backend(broker.port)
        try:
            assert agent.wait(60) == 0, agent.log()[-3000:]
            wait_until(lambda: len(backend.readings("position")) >= len(good), 30, "every position")
            positions = backend.readings("position")
            assert sorted(p["seq"] for p in positions) == list(range(1, len(good) + 1))
            assert not [a for a in backend.readings("alarm") if a.get("kind") == "data_dropped"]
        finally:
            backend.close()
    status = subprocess.run([sys.executable, "-m", "agent", "status", "--config", str(cfg)],
                            capture_output=True, text=True, cwd=REPO, timeout=30)
    assert "dates not believed: bad_capture_date 2, disagrees_with_last_fix 1" in status.stdout, status.stdout
    assert "values out of range (published as null): " in status.stdout and "hdop 1" in status.stdout
