"""NMEA 0183 parsing: gpsd's real receiver captures agree with gpsd, and hand-made sentences
exercise every rule of drivers/gps/nmea.py (epochs, talkers, no-fix, damage, dates, hemispheres)."""

from __future__ import annotations

import datetime as dt
import functools
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.demo.trip import sentence
from conftest import GPSD_CAPTURES
from drivers.gps.nmea import Fix, NmeaAssembler

# -- real captures: compare with gpsd's reference output ----------------------------------------

CAPTURES = sorted(p.name for p in GPSD_CAPTURES.glob("*.log")) if GPSD_CAPTURES.is_dir() else []
CAPTURE_PARAMS = CAPTURES or [
    pytest.param(None, marks=pytest.mark.skip(reason=f"no real GPS captures at {GPSD_CAPTURES}"))
]

# Epochs where gpsd reports something the receiver's standard sentences do not say. Each is a
# gpsd-specific value (see the README of the captures: "treat mismatches as things to look at");
# listed by (capture, UTC time) with why, and checked to still disagree so the list stays true.
GPSD_SPECIFIC: dict[tuple[str, str], str] = {
    ("ericsson-gru04-02-70sec.log", "2026-02-12T21:37:13"): (
        "gpsd replaces the position with the timing receiver's proprietary averaged (self-survey) "
        "position $PERC,GPavp (TPV status 7); the standard GNS/GLL fix of that second is 4111.59903N"),
    ("ericsson-gru04-02-70sec.log", "2026-02-12T21:38:13"): ("the same $PERC,GPavp override"),
    ("humminbird-M37.log", "2006-09-16T19:41:02"): (
        "gpsd emits the TPV before the epoch's $INVTG and fills the speed it computes from successive "
        "positions (2.256 m/s); the receiver's VTG says 5.2 kn (2.675 m/s), which we report"),
}

LAT_LON_TOL = 1e-6  # degrees
SPEED_TOL = 0.01  # m/s
TRACK_TOL = 0.01  # degrees
MIN_TOTAL_EPOCHS = 1000


def _ms(iso: str) -> int:
    t = dt.datetime.fromisoformat(iso.replace("Z", "+00:00"))
    return round(t.timestamp() * 1000)


def gpsd_epochs(chk: Path) -> dict[int, dict]:
    """gpsd's TPVs with a 2D/3D fix, a time and a position; the last (most complete) per time."""
    out: dict[int, dict] = {}
    for line in chk.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("class") == "TPV" and rec.get("mode", 0) >= 2 and "time" in rec and "lat" in rec:
            out[_ms(rec["time"])] = rec
    return out


@dataclass
class Comparison:
    gpsd: dict[int, dict]
    ours: dict[int, Fix]
    counters: object

    @property
    def common(self) -> list[int]:
        return sorted(self.gpsd.keys() & self.ours.keys())


@functools.cache
def compare(name: str) -> Comparison:
    log = GPSD_CAPTURES / name
    # The oldest capture is from 2001: no GPS week-rollover correction above that (the default
    # floor is this software's release year). A '# Date:' header raises the floor itself.
    asm = NmeaAssembler()
    ours: dict[int, Fix] = {}
    # Fed whole, '#' header included: its '# Date:' is the capture's date, as for gpsd.
    for line in log.read_bytes().splitlines(keepends=True):
        for fix in asm.feed(line):
            ours[fix.ts_ms] = fix  # some captures repeat times (looped recordings): keep the last
    for fix in asm.finish():
        ours[fix.ts_ms] = fix
    return Comparison(gpsd_epochs(log.with_name(name + ".chk")), ours, asm.counters)


@pytest.mark.parametrize("name", CAPTURE_PARAMS)
def test_capture_values_agree_with_gpsd(gpsd_captures: Path, name: str) -> None:
    c = compare(name)
    wrong = []
    for t in c.common:
        g, f = c.gpsd[t], c.ours[t]
        when = dt.datetime.fromtimestamp(t / 1000, dt.UTC).isoformat()
        if (name, when[:19]) in GPSD_SPECIFIC:
            continue
        if abs(g["lat"] - f.lat) > LAT_LON_TOL or abs(g["lon"] - f.lon) > LAT_LON_TOL:
            wrong.append(f"{when}: position {f.lat},{f.lon} vs gpsd {g['lat']},{g['lon']}")
        if "speed" in g and f.speed_kmh is not None and abs(g["speed"] - f.speed_kmh / 3.6) > SPEED_TOL:
            wrong.append(f"{when}: speed {f.speed_kmh / 3.6} m/s vs gpsd {g['speed']}")
        if "track" in g and f.course is not None and abs(g["track"] - f.course) > TRACK_TOL:
            wrong.append(f"{when}: course {f.course} vs gpsd track {g['track']}")
    assert not wrong, f"{name}: {len(wrong)} disagreements, e.g. {wrong[:5]}"


@pytest.mark.parametrize("name", CAPTURE_PARAMS)
def test_capture_matches_every_gpsd_epoch(gpsd_captures: Path, name: str) -> None:
    """Every epoch where gpsd reports a 2D/3D fix with a time, we report a fix too."""
    c = compare(name)
    if not c.gpsd:
        # gpsd saw no usable fix in the whole capture (receiver never had one): neither do we.
        assert not c.ours, f"{name}: gpsd has no fixes, we made {len(c.ours)}"
        return
    missing = sorted(c.gpsd.keys() - c.ours.keys())
    assert not missing, (
        f"{name}: no fix for {len(missing)} of gpsd's {len(c.gpsd)} epochs, first "
        f"{dt.datetime.fromtimestamp(missing[0] / 1000, dt.UTC).isoformat()}; counters {c.counters}"
    )


def test_gpsd_specific_differences_are_still_real(gpsd_captures: Path) -> None:
    """Each listed exception still disagrees (else it must come off the list)."""
    for (name, when), why in GPSD_SPECIFIC.items():
        c = compare(name)
        t = _ms(when + "Z")
        g, f = c.gpsd[t], c.ours[t]
        differs = (abs(g["lat"] - f.lat) > LAT_LON_TOL or abs(g["lon"] - f.lon) > LAT_LON_TOL
                   or abs(g.get("speed", 0) - (f.speed_kmh or 0) / 3.6) > SPEED_TOL)
        assert differs, f"{name} {when} now agrees with gpsd; remove it from GPSD_SPECIFIC ({why})"


def test_captures_match_many_epochs_in_total(gpsd_captures: Path) -> None:
    """The per-capture tests cannot pass vacuously: together they compare many epochs."""
    names = sorted(p.name for p in gpsd_captures.glob("*.log"))
    assert len(names) >= 30, names
    total = sum(len(compare(n).common) for n in names)
    assert total >= MIN_TOTAL_EPOCHS, f"only {total} epochs in common with gpsd"


# -- hand-made sentences ------------------------------------------------------------------------

LAT = 48 + 7.038 / 60
LON = 11 + 31 / 60
TS_123519 = round(dt.datetime(2026, 3, 23, 12, 35, 19, tzinfo=dt.UTC).timestamp() * 1000)


def rmc(t: str = "GP", mode: str = "A", time: str = "123519.00", status: str = "A",
        lat: str = "4807.0380,N", lon: str = "01131.0000,E", date: str = "230326") -> str:
    return sentence(f"{t}RMC,{time},{status},{lat},{lon},022.4,084.4,{date},003.1,W,{mode}")


def gga(t: str = "GP", q: int = 1, time: str = "123519.00",
        lat: str = "4807.0380,N", lon: str = "01131.0000,E") -> str:
    return sentence(f"{t}GGA,{time},{lat},{lon},{q},08,0.9,545.4,M,46.9,M,,")


def run(lines, **kw) -> tuple[list[Fix], NmeaAssembler]:
    asm = NmeaAssembler(**kw)
    fixes: list[Fix] = []
    for line in lines:
        fixes.extend(asm.feed(line))
    fixes.extend(asm.finish())
    return fixes, asm


def test_rmc_and_gga_of_one_epoch_make_one_fix_with_every_field() -> None:
    fixes, asm = run([rmc(), gga()])
    assert len(fixes) == 1
    f = fixes[0]
    assert f.ts_ms == TS_123519
    assert f.lat == pytest.approx(LAT, abs=1e-9)
    assert f.lon == pytest.approx(LON, abs=1e-9)
    assert f.speed_kmh == pytest.approx(22.4 * 1.852)
    assert f.course == 84.4
    assert f.alt_m == 545.4
    assert f.sats == 8
    assert f.hdop == 0.9
    assert f.fix == "gps"
    assert asm.counters.fixes == 1 and asm.counters.sentences == 2
    data = f.as_data()
    assert data["lat"] == round(LAT, 7) and data["speed_kmh"] == round(22.4 * 1.852, 2)


def test_fix_comes_out_on_the_last_sentence_of_an_epoch_once_the_cadence_is_known() -> None:
    asm = NmeaAssembler()
    assert list(asm.feed(rmc())) == []
    assert list(asm.feed(gga())) == []  # first epoch: the sentence set is not known yet
    first = list(asm.feed(rmc(time="123520.00")))
    assert [f.ts_ms for f in first] == [TS_123519]
    second = list(asm.feed(gga(time="123520.00")))  # RMC+GGA now known: no need to wait
    assert [f.ts_ms for f in second] == [TS_123519 + 1000]
    assert list(asm.finish()) == []


@pytest.mark.parametrize("talker", ["GP", "GN", "GL", "GA", "BD", "GB"])
def test_any_talker_works(talker: str) -> None:
    fixes, _ = run([rmc(talker), gga(talker)])
    assert len(fixes) == 1
    assert fixes[0].lat == pytest.approx(LAT) and fixes[0].alt_m == 545.4


@pytest.mark.parametrize(("quality", "kind"), [(1, "gps"), (2, "dgps"), (4, "rtk"), (5, "rtk_float"), (6, "estimated")])
def test_gga_quality_gives_the_fix_kind(quality: int, kind: str) -> None:
    fixes, _ = run([rmc(), gga(q=quality)])
    assert [f.fix for f in fixes] == [kind]


def test_rmc_mode_gives_the_fix_kind_without_gga() -> None:
    fixes, _ = run([rmc(mode="D")])
    assert [f.fix for f in fixes] == ["dgps"]
    assert fixes[0].alt_m is None and fixes[0].sats is None and fixes[0].hdop is None


@pytest.mark.parametrize(
    "lines",
    [
        pytest.param([rmc(status="V", mode="N")], id="rmc-status-V"),
        pytest.param([rmc(status="V", mode="N"), gga(q=1)], id="rmc-V-with-gga"),
        pytest.param([rmc(), gga(q=0)], id="gga-quality-0"),
        pytest.param([rmc(mode="N")], id="rmc-mode-N"),
    ],
)
def test_receiver_without_a_position_gives_no_fix_and_counts_no_fix(lines: list[str]) -> None:
    fixes, asm = run(lines)
    assert fixes == []
    assert asm.counters.no_fix == 1
    assert asm.counters.fixes == 0


def _corrupt(line: str) -> str:
    body, cs = line.rstrip("\r\n").rsplit("*", 1)
    return f"{body}*{(int(cs, 16) ^ 0x5A):02X}\r\n"


def test_bad_checksum_is_counted_and_gives_no_fix() -> None:
    fixes, asm = run([_corrupt(rmc()), _corrupt(gga())])
    assert fixes == []
    assert asm.counters.bad_checksum == 2
    assert asm.counters.sentences == 0


def test_bad_checksum_on_one_sentence_leaves_the_other() -> None:
    fixes, asm = run([rmc(), _corrupt(gga())])
    assert asm.counters.bad_checksum == 1
    assert len(fixes) == 1 and fixes[0].alt_m is None and fixes[0].speed_kmh is not None


@pytest.mark.parametrize(
    "line",
    [
        pytest.param(bytes(range(256)), id="all-bytes"),
        pytest.param(b"\x8f\x02\x11\xa0\xb5\x62\x01\x07\x5c\x00" * 5, id="binary-ubx-like"),
        pytest.param("$GPRMC,123519.00,A,4807.03°,N,01131.000,E*00".encode(), id="non-ascii-bytes"),
        pytest.param("$GPRMC,12351ü,A*41", id="non-ascii-text"),
        pytest.param("$GPRMC,123519.00,A,4807.0380,N,011", id="truncated-no-checksum"),
        pytest.param(b"$GPRMC,123519.00,A,4807.0380,N,01131.0000,E,022.4\r\n", id="truncated-bytes"),
        pytest.param("hello world", id="text"),
        pytest.param("$GP", id="short"),
        pytest.param("*FF", id="star-only"),
        pytest.param("$GPRMC,,,,,,,,,,,,*ZZ", id="non-hex-checksum"),
    ],
)
def test_garbage_is_counted_and_never_raises(line: bytes | str) -> None:
    fixes, asm = run([line])
    assert fixes == []
    assert asm.counters.lines == 1
    assert asm.counters.garbage + asm.counters.bad_checksum == 1
    assert asm.counters.sentences == 0


def test_empty_lines_are_counted_as_lines_only() -> None:
    fixes, asm = run(["", "\r\n", b"", b"\n", "   "])
    assert fixes == []
    assert asm.counters.lines == 5
    assert asm.counters.garbage == 0 and asm.counters.sentences == 0


def test_garbage_between_good_sentences_does_not_disturb_the_epoch() -> None:
    fixes, asm = run([rmc(), b"\xff\xfe\x00junk\r\n", "", "$GPGGA,1235", gga()])
    assert len(fixes) == 1 and fixes[0].alt_m == 545.4 and fixes[0].speed_kmh is not None
    assert asm.counters.garbage == 2


NOISE = [
    b"r",  # as in tomtom-mkII: 'r$GPRMC...'
    b"\x00\x7f noise ",
    b"$",  # '$$GPRMC' as in st-teseo-liv4f
    b"$GPGGA,12",  # a collision: the tail of a lost sentence
    b"\xff",  # serial noise at power-up
    b"\x80\xfe\x00",
]


@pytest.mark.parametrize(
    ("prefix", "as_bytes"),
    [
        pytest.param(p, as_bytes, id=f"{'bytes' if as_bytes else 'str'}-{p!r}")
        for p in NOISE
        for as_bytes in (True, False)
    ],
)
def test_noise_before_the_dollar_still_parses(prefix: bytes, as_bytes: bool) -> None:
    lines = [prefix + rmc().encode(), prefix + gga().encode()]
    fixes, asm = run(lines if as_bytes else [x.decode("latin-1") for x in lines])
    assert len(fixes) == 1
    assert fixes[0].lat == pytest.approx(LAT) and fixes[0].alt_m == 545.4
    assert asm.counters.sentences == 2


@pytest.mark.parametrize(
    "lat",
    [
        "48O7.0380,N",  # letter O for zero
        "abcd.efgh,N",
        "9107.0380,N",  # beyond 90 degrees
        "4867.0380,N",  # 67 minutes
        "807.0380,N",  # degrees not two digits
        "4807.0380,Q",  # no such hemisphere
        "48070380,N",  # no decimal point
        pytest.param("4807.0380,", id="hemisphere-missing"),
        pytest.param("4807.0380,NS", id="hemisphere-NS"),
        pytest.param("-130.0000,N", id="signed-degrees"),
    ],
)
def test_valid_checksum_but_junk_latitude_counts_bad_field(lat: str) -> None:
    fixes, asm = run([rmc(lat=lat), gga(lat=lat)])
    assert fixes == []
    assert asm.counters.bad_field == 1
    assert asm.counters.fixes == 0


def test_junk_speed_counts_bad_field() -> None:
    fixes, asm = run([sentence("GPRMC,123519.00,A,4807.0380,N,01131.0000,E,fast,084.4,230326,,,A")])
    assert fixes == [] and asm.counters.bad_field == 1


def test_signed_latitude_is_junk() -> None:
    fixes, asm = run([rmc(lat="-130.0000,N"), gga(lat="-130.0000,N")])
    assert fixes == [], f"accepted as lat={fixes[0].lat}"
    assert asm.counters.bad_field == 1


def test_no_fix_sentences_without_time_count_no_fix_not_bad_field() -> None:
    fixes, asm = run([sentence("GPRMC,,V,,,,,,,,,,N"), sentence("GPGGA,,,,,,0,,,,M,,M,,")])
    assert fixes == []
    assert asm.counters.bad_field == 0
    assert asm.counters.no_fix >= 1


@pytest.mark.parametrize(
    ("lat", "lon", "want"),
    [
        ("4807.0380,N", "01131.0000,E", (LAT, LON)),
        ("3352.0000,S", "15112.6000,E", (-(33 + 52 / 60), 151 + 12.6 / 60)),  # Sydney
        ("4042.7400,N", "07400.3600,W", (40 + 42.74 / 60, -(74 + 0.36 / 60))),  # New York
        ("2254.4200,S", "04310.3200,W", (-(22 + 54.42 / 60), -(43 + 10.32 / 60))),  # Rio
        ("0000.0000,N", "00000.0000,E", (0.0, 0.0)),
        ("9000.0000,S", "18000.0000,W", (-90.0, -180.0)),
    ],
)
def test_hemispheres_give_signs(lat: str, lon: str, want: tuple[float, float]) -> None:
    fixes, _ = run([rmc(lat=lat, lon=lon), gga(lat=lat, lon=lon)])
    assert len(fixes) == 1
    assert (fixes[0].lat, fixes[0].lon) == pytest.approx(want, abs=1e-9)


def _utc_ms(*args: int) -> int:
    return round(dt.datetime(*args, tzinfo=dt.UTC).timestamp() * 1000)


def test_gga_only_epochs_after_midnight_roll_the_date_over() -> None:
    lines = [
        rmc(time="235958.00", date="311226"),
        gga(time="235958.00"),
        gga(time="235959.00"),  # the receiver stops sending RMC: only GGA from here
        gga(time="000000.00"),
        gga(time="000001.00"),
    ]
    fixes, asm = run(lines)
    assert [f.ts_ms for f in fixes] == [
        _utc_ms(2026, 12, 31, 23, 59, 58),
        _utc_ms(2026, 12, 31, 23, 59, 59),
        _utc_ms(2027, 1, 1, 0, 0, 0),
        _utc_ms(2027, 1, 1, 0, 0, 1),
    ]
    assert asm.counters.no_date == 0


def test_gga_without_any_rmc_has_no_date() -> None:
    fixes, asm = run([gga(time="120000.00"), gga(time="120001.00")])
    assert fixes == []
    assert asm.counters.no_date == 2


def test_default_date_serves_until_an_rmc_arrives() -> None:
    fixes, _ = run([gga(time="120000.00")], default_date=dt.date(2026, 3, 1))
    assert [f.ts_ms for f in fixes] == [_utc_ms(2026, 3, 1, 12, 0, 0)]


def test_rmc_across_midnight_in_steady_state() -> None:
    lines = []
    for time, date in [("235958.00", "311226"), ("235959.00", "311226"), ("000000.00", "010127")]:
        lines += [rmc(time=time, date=date), gga(time=time)]
    fixes, _ = run(lines)
    assert [f.ts_ms for f in fixes] == [
        _utc_ms(2026, 12, 31, 23, 59, 58),
        _utc_ms(2026, 12, 31, 23, 59, 59),
        _utc_ms(2027, 1, 1, 0, 0, 0),
    ]


def test_epoch_closed_by_the_first_rmc_after_midnight_keeps_its_date() -> None:
    fixes, _ = run([
        rmc(time="235959.00", date="311226"),
        rmc(time="000000.00", date="010127"),
    ])
    assert [f.ts_ms for f in fixes] == [
        _utc_ms(2026, 12, 31, 23, 59, 59),
        _utc_ms(2027, 1, 1, 0, 0, 0),
    ]


def test_repeated_time_is_not_a_second_fix() -> None:
    fixes, _ = run([rmc(), gga(), rmc(time="123520.00"), gga(time="123520.00"), gga(time="123520.00")])
    assert [f.ts_ms for f in fixes] == [TS_123519, TS_123519 + 1000]


# -- fuzzing ------------------------------------------------------------------------------------

def _check(asm: NmeaAssembler, lines) -> None:
    for line in lines:
        for f in asm.feed(line):
            assert -90 <= f.lat <= 90 and -180 <= f.lon <= 180, f
    for f in asm.finish():
        assert -90 <= f.lat <= 90 and -180 <= f.lon <= 180, f


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.lists(st.binary(max_size=120), max_size=20))
def test_fuzz_arbitrary_bytes(lines: list[bytes]) -> None:
    asm = NmeaAssembler(default_date=dt.date(2026, 1, 1))
    _check(asm, [rmc(), *lines, gga(time="123520.00")])
    assert asm.counters.lines == len(lines) + 2


@FUZZ
@given(st.lists(st.text(max_size=120), max_size=20))
def test_fuzz_arbitrary_text(lines: list[str]) -> None:
    _check(NmeaAssembler(default_date=dt.date(2026, 1, 1)), lines)


_num = st.from_regex(r"\A[-+ 0-9]{0,6}(\.[0-9e+-]{0,6})?\Z")
_hemi = st.sampled_from(["N", "S", "E", "W", "X", ""])


@FUZZ
@given(
    talker=st.sampled_from(["GP", "GN", "BD"]),
    time=st.from_regex(r"\A[0-9]{6}(\.[0-9]{0,3})?\Z") | _num,
    lat=_num, ns=_hemi, lon=_num, ew=_hemi,
    status=st.sampled_from(["A", "V", ""]),
    mode=st.sampled_from(["A", "D", "N", "E", ""]),
    quality=st.sampled_from(["0", "1", "2", "9", ""]),
    num=_num,
)
def test_fuzz_checksummed_sentences_with_odd_fields(talker, time, lat, ns, lon, ew, status, mode, quality, num) -> None:
    """Valid checksums around odd field values: the part that random bytes never reach."""
    pos = f"{lat},{ns},{lon},{ew}"
    _check(NmeaAssembler(default_date=dt.date(2026, 1, 1)), [
        sentence(f"{talker}RMC,{time},{status},{pos},{num},{num},230326,,,{mode}"),
        sentence(f"{talker}GGA,{time},{pos},{quality},{num},{num},{num},M,,M,,"),
        sentence(f"{talker}GLL,{pos},{time},{status},{mode}"),
        sentence(f"{talker}GNS,{time},{pos},{mode}{mode},{num},{num},{num},,,"),
    ])
