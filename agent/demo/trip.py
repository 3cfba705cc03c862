"""The bundled demo trip: Chongqing → Nanning → Youyiguan / Friendship Pass → Lang Son → Hanoi.

Writes an NMEA capture (RMC + GGA per epoch, talker GN) of a lorry on the China–ASEAN route:
expressway driving on curving roads, a rest stop, a queue and the customs yard at the
Youyiguan border crossing. Deterministic (seeded) so tests can rely on it, and it returns the
ground truth it encoded.

    python -m agent.demo.trip OUT.nmea [--interval 5] [--hours 24]
"""

from __future__ import annotations

import argparse
import bisect
import datetime as dt
import gzip
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from functools import reduce
from pathlib import Path

from agent.model.geo import haversine_m

# (name, lat, lon, speed limit km/h to the next point, stop at this point in minutes)
ROUTE: list[tuple[str, float, float, float, float]] = [
    ("Chongqing, Tuanjiecun logistics park", 29.4838, 106.4460, 80, 0),
    ("Qijiang", 28.9620, 106.6510, 80, 0),
    ("Tongzi", 28.1320, 106.8260, 80, 0),
    ("Zunyi", 27.7060, 106.9330, 80, 0),
    ("Xifeng", 27.0950, 106.7380, 80, 0),
    ("Guiyang ring road", 26.6470, 106.6300, 60, 0),
    ("Guiding service area", 26.5800, 107.2330, 80, 45),
    ("Duyun", 26.2600, 107.5170, 80, 0),
    ("Dushan", 25.8300, 107.5450, 75, 0),
    ("Nandan", 24.9830, 107.5460, 75, 0),
    ("Hechi", 24.6930, 108.0850, 80, 0),
    ("Du'an", 23.9310, 108.1010, 80, 0),
    ("Mashan", 23.7080, 108.1770, 80, 0),
    ("Nanning, Wuxu interchange", 22.8170, 108.3660, 60, 30),
    ("Chongzuo", 22.3780, 107.3650, 80, 0),
    ("Ningming", 22.1400, 107.0700, 80, 0),
    ("Pingxiang", 22.0980, 106.7550, 40, 0),
    ("Youyiguan border queue", 21.9860, 106.7190, 5, 90),
    ("Youyiguan customs yard", 21.9770, 106.7110, 15, 40),
    ("Huu Nghi border gate (VN)", 21.9722, 106.7062, 30, 20),
    ("Dong Dang", 21.9416, 106.6943, 50, 0),
    ("Lang Son", 21.8537, 106.7610, 60, 0),
    ("Chi Lang lay-by (QL1A)", 21.6600, 106.6000, 70, 25),
    ("Bac Giang", 21.2730, 106.1940, 70, 0),
    ("Hanoi, Gia Lam depot", 21.0450, 105.8950, 40, 0),
]

START = dt.datetime(2026, 11, 20, 22, 0, 0, tzinfo=dt.UTC)  # 06:00 in Chongqing


@dataclass(slots=True, frozen=True)
class TruthFix:
    """What the trip encodes for one epoch, at NMEA resolution (ddmm.mmmmm)."""

    ts: dt.datetime
    lat: float
    lon: float
    speed_kmh: float
    course: float
    alt_m: float
    sats: int
    hdop: float
    place: str


def checksum(body: str) -> str:
    return f"{reduce(lambda a, c: a ^ ord(c), body, 0):02X}"


def sentence(body: str) -> str:
    """``$body*CS`` with CRLF, as a receiver sends it."""
    return f"${body}*{checksum(body)}\r\n"


def _ddmm(value: float, deg_digits: int) -> tuple[str, float]:
    a = abs(value)
    deg = int(a)
    minutes = round((a - deg) * 60, 5)
    if minutes >= 60:
        deg, minutes = deg + 1, 0.0
    return f"{deg:0{deg_digits}d}{minutes:08.5f}", deg + minutes / 60


def rmc(f: TruthFix, talker: str = "GN", status: str = "A") -> str:
    lat, _ = _ddmm(f.lat, 2)
    lon, _ = _ddmm(f.lon, 3)
    return sentence(
        f"{talker}RMC,{f.ts:%H%M%S}.{f.ts.microsecond // 10000:02d},{status},"
        f"{lat},{'N' if f.lat >= 0 else 'S'},{lon},{'E' if f.lon >= 0 else 'W'},"
        f"{f.speed_kmh / 1.852:.2f},{f.course:.2f},{f.ts:%d%m%y},,,{'A' if status == 'A' else 'N'}"
    )


def gga(f: TruthFix, talker: str = "GN", quality: int = 1) -> str:
    lat, _ = _ddmm(f.lat, 2)
    lon, _ = _ddmm(f.lon, 3)
    return sentence(
        f"{talker}GGA,{f.ts:%H%M%S}.{f.ts.microsecond // 10000:02d},"
        f"{lat},{'N' if f.lat >= 0 else 'S'},{lon},{'E' if f.lon >= 0 else 'W'},"
        f"{quality},{f.sats:02d},{f.hdop:.1f},{f.alt_m:.1f},M,-28.0,M,,"
    )


def _initial_bearing(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    p1, p2, dl = math.radians(lat1), math.radians(lat2), math.radians(lon2 - lon1)
    y = math.sin(dl) * math.cos(p2)
    x = math.cos(p1) * math.sin(p2) - math.sin(p1) * math.cos(p2) * math.cos(dl)
    return math.degrees(math.atan2(y, x)) % 360


def _road(seed: int) -> list[tuple[float, float, float, str]]:
    """The route densified every ~200 m with smooth bends: (lat, lon, limit km/h, place)."""
    rng = random.Random(seed)
    points: list[tuple[float, float, float, str]] = []
    for (name, la1, lo1, limit, _stop), (_n2, la2, lo2, _l2, _s2) in zip(ROUTE, ROUTE[1:]):
        length = haversine_m(la1, lo1, la2, lo2)
        n = max(2, int(length / 200))
        # Lateral bends: a few sine waves whose amplitude vanishes at both ends of the leg.
        waves = [(rng.uniform(0.002, 0.012) * length / 1000 / 10, rng.randint(1, 6), rng.uniform(0, math.tau))
                 for _ in range(3)]
        nx, ny = -(lo2 - lo1), (la2 - la1)
        norm = math.hypot(nx, ny) or 1.0
        for i in range(n):
            t = i / n
            off = sum(a * math.sin(math.pi * k * t + ph) for a, k, ph in waves) * math.sin(math.pi * t)
            points.append((la1 + (la2 - la1) * t + off * nx / norm / 100,
                           lo1 + (lo2 - lo1) * t + off * ny / norm / 100, limit, name))
    last = ROUTE[-1]
    points.append((last[1], last[2], 0, last[0]))
    return points


def drive(interval_s: float = 5.0, seed: int = 2026, max_hours: float | None = None) -> Iterator[TruthFix]:
    """The lorry's fixes, one per ``interval_s``, from Chongqing to Hanoi."""
    rng = random.Random(seed + 1)
    road = _road(seed)
    cum = [0.0]
    for a, b in zip(road, road[1:]):
        cum.append(cum[-1] + haversine_m(a[0], a[1], b[0], b[1]))
    minutes = {name: m for name, _la, _lo, _lim, m in ROUTE}
    # Stops at the first road point of each leg that begins with a stop, and at the end.
    stops = [(cum[j], minutes[road[j][3]] * 60) for j in range(1, len(road))
             if minutes.get(road[j][3]) and road[j - 1][3] != road[j][3]]
    stops.append((cum[-1], 600.0))
    end = None if max_hours is None else START + dt.timedelta(hours=max_hours)
    t, s, speed, alt, course = START, 0.0, 0.0, 260.0, 0.0
    standing = 0.0
    while stops and (end is None or t < end):
        j = max(0, bisect.bisect_right(cum, s) - 1)
        j = min(j, len(road) - 2)
        (la1, lo1, limit, place), (la2, lo2, _l, _p) = road[j], road[j + 1]
        k = min(1.0, (s - cum[j]) / ((cum[j + 1] - cum[j]) or 1.0))
        if s >= cum[-1]:
            place = road[-1][3]
        if standing > 0:
            speed = 0.0
            standing -= interval_s
            if standing <= 0 and s >= cum[-1]:
                break  # parked at the destination
        else:
            target = limit * rng.uniform(0.85, 1.0)
            speed = max(3.0, speed + max(-15.0, min(8.0, target - speed)))  # lorries accelerate slowly
            course = _initial_bearing(la1, lo1, la2, lo2)
        alt = max(10.0, alt + rng.uniform(-3, 3))
        yield TruthFix(
            ts=t,
            lat=round(la1 + (la2 - la1) * k + rng.gauss(0, 5e-6), 7),  # ~1.5 m receiver noise
            lon=round(lo1 + (lo2 - lo1) * k + rng.gauss(0, 5e-6), 7),
            speed_kmh=round(speed, 1),
            course=round(course, 1),
            alt_m=round(alt, 1),
            sats=rng.randint(9, 18),
            hdop=round(rng.uniform(0.6, 1.4), 1),
            place=place,
        )
        t += dt.timedelta(seconds=interval_s)
        if standing <= 0:
            s += speed / 3.6 * interval_s
            if s >= stops[0][0]:
                s, standing = stops[0][0], stops[0][1]
                if len(stops) > 1:
                    stops.pop(0)


def nmea_lines(fixes: Iterator[TruthFix]) -> Iterator[str]:
    for f in fixes:
        yield rmc(f)
        yield gga(f)


def write(path: Path, interval_s: float = 5.0, max_hours: float | None = None, seed: int = 2026) -> list[TruthFix]:
    fixes = list(drive(interval_s, seed, max_hours))
    header = [
        "# Name: lorry-agent demo trip, Chongqing -> Youyiguan -> Hanoi\n",
        f"# Generated by: python -m agent.demo.trip (interval {interval_s:g} s, seed {seed})\n",
        f"# Date: {START:%Y-%m-%d}\n",
    ]
    text = "".join(header) + "".join(nmea_lines(iter(fixes)))
    if path.suffix == ".gz":
        # mtime=0 and no file name: the same trip always gives the same bytes.
        with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as f:
            f.write(text.encode("ascii"))
    else:
        path.write_text(text, encoding="ascii", newline="")
    return fixes


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--interval", type=float, default=5.0, help="seconds between fixes")
    p.add_argument("--hours", type=float, default=None, help="stop after this long")
    p.add_argument("--seed", type=int, default=2026)
    a = p.parse_args(argv)
    fixes = write(a.out, a.interval, a.hours, a.seed)
    km = sum(haversine_m(x.lat, x.lon, y.lat, y.lon) for x, y in zip(fixes, fixes[1:])) / 1000
    print(f"{a.out}: {len(fixes)} fixes, {km:.0f} km, {(fixes[-1].ts - fixes[0].ts)} "
          f"from {fixes[0].ts:%Y-%m-%d %H:%M}Z")


if __name__ == "__main__":
    main()
