"""GPS parsing path: NMEA lines per second through ``NmeaAssembler``, against bare pynmea2.

Project figure: one ``drivers.gps.nmea.NmeaAssembler()`` fed every line in order with ``feed()``
(its generator consumed, as the GPS driver does), then ``finish()``; the clock runs from the
first line until ``finish`` returns. That is all the driver does with a line between reading
it and emitting a fix: find the sentence ('$' noise and collisions), verify the '*hh' checksum
of every line, hand-parse GSA/GSV into receiver state, parse epoch sentences (RMC, GGA, GNS,
GLL, ZDA, VTG) with pynmea2, group them by time into epochs and merge each epoch into a
``Fix`` (dates, week rollover, field checks). Lines are given as ``str``; the driver reads
``bytes`` and the assembler decodes them itself, so that variant is printed too.

Baseline, same run, same lines (the same ``str`` objects): ``pynmea2.parse(line)`` on each,
catching its exceptions (``ParseError``, ``ChecksumError``, ``SentenceTypeError``, all
``ValueError``s). That is the floor for turning a line into a sentence object with the
library the driver is built on: it converts no field (pynmea2 does that lazily, on attribute
access) and assembles nothing. It is also laxer: with its default ``check=False`` a sentence
with no '*hh' checksum at all is accepted (a checksum that is present is verified), whereas our
path rejects every line whose checksum is missing or wrong. On the other side, the baseline
builds an object for every known sentence type, GSV and GSA included, which our path splits by
hand or (after its checksum) ignores, so the ratio is not a pure overhead figure.

Inputs:

* headline: the real receiver captures of gpsd's regression suite (``--captures``, default
  ../shared/data/nmea/gpsd/*.log from the repository root): 34 receivers, all their non-'#'
  lines concatenated in file-name order, repeated whole to about ``--lines``. Real receivers
  send GSV, GSA, VTG, GLL, ZDA and proprietary sentences besides RMC/GGA, plus the odd bad
  checksum and AIS/noise line. (Without the '# Date:' headers the dates of these 2000s-2010s
  captures read as week-rollover victims and are moved forward, which the path does anyway.)
* a synthetic stream from the demo trip: ``agent.demo.trip.nmea_lines(drive(interval_s=1,
  max_hours=lines/7200))``, RMC + GGA per epoch only (the whole trip is 158,096 lines), so
  every line is an epoch sentence: the cheapest mix for the baseline, the dearest for us.

Each side is run ``--repeat`` times, alternating, and the best time is taken
(``time.perf_counter``). Goal (from the issue): >= 0.8x the bare parse rate on the captures.

    python bench/bench_nmea.py [--lines 200000] [--repeat 3] [--captures DIR]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pynmea2
from _positions import REPO

from agent.demo.trip import drive, nmea_lines
from drivers.gps.nmea import NmeaAssembler

GOAL = 0.8
DEFAULT_CAPTURES = REPO.parent / "shared" / "data" / "nmea" / "gpsd"


def capture_lines(folder: Path, target: int) -> tuple[list[bytes], int]:
    """Every non-'#' line of the captures, with its line ending, repeated to ~target lines."""
    files = sorted(folder.glob("*.log"))
    if not files:
        raise SystemExit(f"no *.log captures in {folder}")
    lines = [
        line
        for f in files
        for line in f.read_bytes().splitlines(keepends=True)
        if not line.startswith(b"#")
    ]
    return lines * max(1, round(target / len(lines))), len(files)


def run_ours(lines: list) -> tuple[float, NmeaAssembler, int]:
    asm = NmeaAssembler()
    fixes: list = []
    t0 = time.perf_counter()
    for line in lines:
        fixes.extend(asm.feed(line))
    fixes.extend(asm.finish())
    return time.perf_counter() - t0, asm, len(fixes)


def run_bare(lines: list[str]) -> tuple[float, int]:
    parse = pynmea2.parse
    failed = 0
    t0 = time.perf_counter()
    for line in lines:
        try:
            parse(line)
        except ValueError:  # ParseError, ChecksumError, SentenceTypeError
            failed += 1
    return time.perf_counter() - t0, failed


def bench(title: str, raw: list[bytes], repeat: int) -> float:
    text = [line.decode("ascii") for line in raw]
    n = len(text)
    best_str = best_bytes = best_bare = float("inf")
    for _ in range(repeat):
        t, asm, fixes = run_ours(text)
        best_str = min(best_str, t)
        t, _asm, _fixes = run_ours(raw)
        best_bytes = min(best_bytes, t)
        t, failed = run_bare(text)
        best_bare = min(best_bare, t)
    c = asm.counters
    ours, ours_b, bare = n / best_str, n / best_bytes, n / best_bare
    print(title)
    print(f"  NmeaAssembler.feed + finish (str)    {ours:>10,.0f} lines/s ({best_str:.3f} s)"
          f"  {fixes:,} fixes; {c.bad_checksum:,} bad checksum, {c.garbage:,} garbage,"
          f" {c.ignored:,} ignored")
    print(f"  same, bytes lines as the driver      {ours_b:>10,.0f} lines/s ({best_bytes:.3f} s)")
    print(f"  baseline pynmea2.parse (str)         {bare:>10,.0f} lines/s ({best_bare:.3f} s)"
          f"  {n - failed:,} parsed, {failed:,} raised")
    print(f"  ratio ours/baseline                  {ours / bare:>10.2f}x (bytes: {ours_b / bare:.2f}x)")
    return ours / bare


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lines", type=int, default=200_000, help="about this many lines per input")
    ap.add_argument("--repeat", type=int, default=3, help="runs per side; the best is taken")
    ap.add_argument("--captures", type=Path, default=DEFAULT_CAPTURES, help="folder of gpsd *.log captures")
    a = ap.parse_args()

    raw, files = capture_lines(a.captures, a.lines)
    ratio = bench(f"real captures: {len(raw):,} lines ({files} receivers, {a.captures}), best of {a.repeat}",
                  raw, a.repeat)
    trip = [line.encode("ascii") for line in nmea_lines(drive(interval_s=1, max_hours=a.lines / 7200))]
    bench(f"demo trip, RMC+GGA at 1 Hz: {len(trip):,} lines, best of {a.repeat}", trip, a.repeat)
    print(f"goal >= {GOAL:g}x the bare parse rate on the real captures: {'met' if ratio >= GOAL else 'NOT met'}")


if __name__ == "__main__":
    main()
