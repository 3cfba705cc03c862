"""bench/bench_wear.py's figures and what it prints: one run's ``Figures``, the tables (rows are
issue 14's; columns this version, the baseline, their ratio) and the goals they are read against."""

from __future__ import annotations

import argparse
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import _wear_proc as kp

TITLES = {"up": "broker up", "down": "broker down", "parked": "parked, no sources"}
DAY = 86_400.0
GOALS = {"wa": 10.0, "parked_day": 5e6, "fsync_drive": 120, "fsync_parked": 10, "cpu": 2.0, "ctx": 100,
         "idle_read_min": 1e6, "idle_cpu_min": 0.1, "vs_empty": 1.5}


@dataclass
class Figures:
    """One run of one version in one scenario."""

    scenario: str
    version: str
    seconds: float = 0.0
    startup_s: float = math.nan
    written: int = 0
    cancelled: int = 0
    read_bytes: int = 0
    rchar: int = 0
    cpu_s: float = 0.0
    ctx: int = 0
    ctx_lost: int = 0
    rss_kb: int = 0
    hwm_kb: int = 0
    threads: int = 0
    syncs: Counter[str] = field(default_factory=Counter)
    fsync_seconds: float = 0.0
    traced_written: int = 0
    readings: int | None = None
    json_bytes: int | None = None
    readings_note: str = ""
    growth: int = 0
    wal_end: int = 0
    store_end: int = 0
    log_bytes: int = 0
    startup_read_bytes: int = 0
    startup_rchar: int = 0
    status_s: float = math.nan
    first_up_s: float = math.nan
    restart_first_s: float = math.nan
    error: str | None = None

    def day(self, x: float) -> float:
        return x * DAY / self.seconds

    @property
    def fsyncs(self) -> int:
        return sum(self.syncs.values())

    @property
    def fsyncs_per_h(self) -> float:
        return self.fsyncs * 3600 / self.fsync_seconds if self.fsync_seconds else math.nan

    @property
    def wa(self) -> float:
        return self.written / self.json_bytes if self.json_bytes else math.nan



# -- output ------------------------------------------------------------------------------------


def ratio(a: float, b: float) -> str:
    if any(map(math.isnan, (a, b))) or b == 0:
        return "–"
    return f"{a / b:.2f}×"


def cells(this: Figures | None, base: Figures | None, value: Any, fmt: Any) -> list[str]:
    def one(f: Figures | None) -> tuple[str, float]:
        if f is None:
            return "–", math.nan
        if f.error and f.seconds == 0:
            return "failed", math.nan
        x = value(f)
        if x is None or (isinstance(x, float) and math.isnan(x)):
            return "n/a", math.nan
        return fmt(x), float(x)

    (ts, tv), (bs, bv) = one(this), one(base)
    return [ts, bs, ratio(tv, bv)]


def bytes_(x: float) -> str:
    return kp.fmt_bytes(x)


def table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * (len(header) - 1)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def driving_table(res: dict[tuple[str, str], Figures], scenarios: list[str], this: str, base: str) -> str:
    header = ["figure"]
    for s in scenarios:
        header += [f"{TITLES[s]}: this", "baseline", "ratio"]
    spec: list[tuple[str, Any, Any]] = [
        ("bytes written to disk per day", lambda f: f.day(f.written), bytes_),
        ("the readings' own size (JSON) per day",
         lambda f: None if f.json_bytes is None else f.day(f.json_bytes), bytes_),
        ("write amplification", lambda f: f.wa, lambda x: f"{x:,.0f}×" if x >= 10 else f"{x:.1f}×"),
        ("fsyncs per hour", lambda f: f.fsyncs_per_h, lambda x: f"{x:,.0f}"),
        ("CPU, whole process (% of a core)", lambda f: 100 * f.cpu_s / f.seconds, lambda x: f"{x:.2f} %"),
        ("context switches per second", lambda f: f.ctx / f.seconds, lambda x: f"{x:,.1f}"),
        ("readings committed per hour", lambda f: None if f.readings is None else f.readings * 3600 / f.seconds,
         lambda x: f"{x:,.0f}"),
        ("store folder growth per day", lambda f: f.day(f.growth), bytes_),
        ("WAL at the end of the window", lambda f: f.wal_end, bytes_),
        ("log output per day (journald's, not counted above)", lambda f: f.day(f.log_bytes), bytes_),
        ("RSS at the end (peak) MB", lambda f: f.rss_kb / 1024, lambda x: f"{x:.1f}"),
        ("start-up to READY=1 (s)", lambda f: f.startup_s, lambda x: f"{x:.2f}"),
    ]
    rows = []
    for label, value, fmt in spec:
        row = [label]
        for s in scenarios:
            row += cells(res.get((s, this)), res.get((s, base)), value, fmt)
        rows.append(row)
    # The peak next to RSS (it is not a ratio of its own).
    for s_i, s in enumerate(scenarios):
        for j, label in ((0, this), (1, base)):
            f = res.get((s, label))
            if f is not None and f.hwm_kb:
                rows[10][1 + 3 * s_i + j] += f" ({f.hwm_kb / 1024:.1f})"
    return table(header, rows)


def backlog_table(res: dict[tuple[str, str], Figures], this: str, base: str, n: int) -> str:
    header = ["figure", f"{n:,} positions: this", "baseline", "ratio", "empty store: this", "baseline", "ratio",
              "this: backlog ÷ empty"]
    per_min = 60.0
    spec: list[tuple[str, Any, Any]] = [
        ("start-up to READY=1 (s)", lambda f: f.startup_s, lambda x: f"{x:.2f}"),
        ("start-up reads from disk (read_bytes)", lambda f: f.startup_read_bytes, bytes_),
        ("start-up reads, read() calls (rchar)", lambda f: f.startup_rchar, bytes_),
        ("idle reads per minute, read() calls (rchar)", lambda f: f.rchar * per_min / f.seconds, bytes_),
        ("idle reads per minute from disk (read_bytes)", lambda f: f.read_bytes * per_min / f.seconds, bytes_),
        ("CPU seconds per minute", lambda f: f.cpu_s * per_min / f.seconds, lambda x: f"{x:.3f}"),
        ("context switches per second", lambda f: f.ctx / f.seconds, lambda x: f"{x:,.1f}"),
        ("bytes written to disk per day", lambda f: f.day(f.written), bytes_),
        ("fsyncs per hour", lambda f: f.fsyncs_per_h, lambda x: f"{x:,.0f}"),
        ("store folder at the end", lambda f: f.store_end, bytes_),
        ("RSS at the end MB", lambda f: f.rss_kb / 1024, lambda x: f"{x:.1f}"),
        ("`lorry-agent status` wall time (s)", lambda f: f.status_s, lambda x: f"{x:.2f}"),
        ("broker up -> first position received (s)", lambda f: f.first_up_s, lambda x: f"{x:.2f}"),
        ("restart (broker up) -> first position received (s)", lambda f: f.restart_first_s, lambda x: f"{x:.2f}"),
    ]
    rows = []
    for label, value, fmt in spec:
        row = [label]
        row += cells(res.get(("backlog", this)), res.get(("backlog", base)), value, fmt)
        row += cells(res.get(("empty", this)), res.get(("empty", base)), value, fmt)
        full, empty = res.get(("backlog", this)), res.get(("empty", this))
        row.append(ratio(float(value(full)), float(value(empty))) if full and empty and full.seconds and empty.seconds
                   else "–")
        rows.append(row)
    return table(header, rows)


def goals(res: dict[tuple[str, str], Figures], this: str) -> list[str]:
    out = []

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    for s in ("up", "down"):
        f = res.get((s, this))
        if f and not math.isnan(f.wa):
            out.append(f"write amplification <= {GOALS['wa']:.0f}x, {TITLES[s]}: {verdict(f.wa <= GOALS['wa'])} "
                       f"({f.wa:,.0f}x)")
    if (f := res.get(("parked", this))) and f.seconds:
        day = f.day(f.written)
        out.append(f"parked <= 5 MB written per day: {verdict(day <= GOALS['parked_day'])} ({kp.fmt_bytes(day)})")
        per_h = f.fsyncs_per_h
        out.append(f"parked <= {GOALS['fsync_parked']} fsyncs/h: {verdict(per_h <= GOALS['fsync_parked'])} "
                   f"({per_h:,.0f})")
    for s in ("up", "down"):
        if (f := res.get((s, this))) and f.seconds:
            per_h = f.fsyncs_per_h
            out.append(f"driving, {TITLES[s]}, <= {GOALS['fsync_drive']} fsyncs/h: "
                       f"{verdict(per_h <= GOALS['fsync_drive'])} ({per_h:,.0f})")
    if (f := res.get(("up", this))) and f.seconds:
        cpu, ctx = 100 * f.cpu_s / f.seconds, f.ctx / f.seconds
        out.append(f"typical load CPU <= {GOALS['cpu']:.0f} % of a core: {verdict(cpu <= GOALS['cpu'])} ({cpu:.2f} %)")
        out.append(f"typical load <= {GOALS['ctx']} context switches/s: {verdict(ctx <= GOALS['ctx'])} ({ctx:,.0f})")
    if (f := res.get(("backlog", this))) and f.seconds:
        rd, cpu = f.rchar * 60 / f.seconds, f.cpu_s * 60 / f.seconds
        out.append(f"backlog idle reads <= 1 MB/min (rchar): {verdict(rd <= GOALS['idle_read_min'])} "
                   f"({kp.fmt_bytes(rd)}/min)")
        out.append(f"backlog idle CPU <= {GOALS['idle_cpu_min']} s/min: {verdict(cpu <= GOALS['idle_cpu_min'])} "
                   f"({cpu:.3f} s/min)")
        if (e := res.get(("empty", this))) and e.seconds:
            for label, a, b in (("`status`", f.status_s, e.status_s),
                                ("first position after a restart", f.restart_first_s, e.restart_first_s)):
                if not (math.isnan(a) or math.isnan(b)) and b > 0:
                    out.append(f"{label} within {GOALS['vs_empty']}x of an empty store: "
                               f"{verdict(a <= GOALS['vs_empty'] * b)} ({a:.2f} s vs {b:.2f} s)")
    return out



def report(args: argparse.Namespace, bench: Any, this: Any, base: Any,
           res: dict[tuple[str, str], Figures], imports: dict[str, kp.Imports], check: tuple[int, int, int],
           load0: tuple[float, float, float], took: float) -> None:
    driving = [s for s in ("up", "down", "parked") if s in args.scenario]
    print(f"wear and wake-ups of the whole agent process: `python -m agent run`, measured from outside "
          f"({os.cpu_count()} CPUs, load {load0[0]:.1f} at the start and {os.getloadavg()[0]:.1f} at the end; "
          f"{took / 60:.1f} min)")
    print(f"  this: working tree {this.rev} (snapshot of agent/ and drivers/); baseline: {base.rev} "
          f"(git worktree of --baseline {args.baseline})")
    print(f"  per day = the window's amount x 86,400 / window; each run: READY=1, {args.warmup:g} s warm-up, "
          f"a {args.seconds:g} s window (parked {args.parked_seconds:g} s) with nothing attached, then one as long "
          "with strace attached for the sync calls")
    if {"up", "down"} & set(args.scenario):
        print(f"  typical load: 1 Hz NMEA on a pty; CAN: {bench.can_note}{bench.can_kind}; "
              "a DS18B20 (sysfs tree, 60 s); a simulated seal; default settings")
    synced, unsynced, unsynced_w = check
    print(f"  write_bytes on this filesystem: 64 appends of 100 B each fsynced count {synced:,} B "
          f"({synced / 64:,.0f} B each: a page a sync); unsynced, {unsynced_w:,} B written count {unsynced:,} B")
    if driving:
        print()
        print(driving_table(res, driving, "this", "baseline"))
    if "backlog" in args.scenario:
        print()
        fills = ", ".join(f"{k[0]} {v:.0f} s" for k, v in bench.fill_s.items() if k[1] > 1)
        print(f"idle with a backlog: {args.backlog:,} positions, broker down, no sources, max_mb "
              f"{args.backlog_max_mb:g} (filled by each version's Store: {fills or '–'}); store files evicted from "
              "the page cache before each start")
        print()
        print(backlog_table(res, "this", "baseline", args.backlog))
    print()
    print("sync calls in the second window (strace attached), by call and file; bytes written per day in that "
          "window beside the first's (a check that tracing did not change what is written):")
    for (name, label), f in res.items():
        if f.fsync_seconds:
            calls = kp.counter_text(f.syncs, 6) or "none"
            print(f"  {name:8} {label:9} {f.fsyncs:5} in {f.fsync_seconds:.0f} s: {calls}"
                  f"; written/day {kp.fmt_bytes(f.day(f.traced_written) * f.seconds / f.fsync_seconds)} traced, "
                  f"{kp.fmt_bytes(f.day(f.written))} untraced")
    for label in ("this", "baseline"):
        if (imp := imports.get(label)) is not None:
            heavy = ", ".join(f"{n} {s:.2f}" for n, s in imp.heaviest[:4])
            print(f"imports of `run` ({label}): {imp.modules} modules, {imp.total_s:.2f} s cumulative under "
                  f"-X importtime; backend tools: {', '.join(imp.backend_tools) or 'none'}; heaviest (s): {heavy}")
    notes = []
    for (name, label), f in res.items():
        if f.error:
            first, *rest = f.error.splitlines()
            notes.append(f"{name} {label}: {first[:300]}")
            if rest:
                notes.append("    " + "\n    ".join(rest[-15:]))
        if f.readings_note:
            notes.append(f"{name} {label}: {f.readings_note}")
        if f.ctx_lost:
            notes.append(f"{name} {label}: {f.ctx_lost} thread(s) ended in the window; their switches are not counted")
        if f.cancelled:
            notes.append(f"{name} {label}: {kp.fmt_bytes(f.cancelled)} of dirty pages cancelled before writeback "
                         "(cancelled_write_bytes; not subtracted)")
    if notes:
        print("notes:")
        for n in notes:
            print(f"  {n}")
    lines = goals(res, "this")
    if "this" in imports:
        lines.append(f"`run` imports no backend tool: {'met' if not imports['this'].backend_tools else 'NOT met'} "
                     f"({', '.join(imports['this'].backend_tools) or 'none'})")
    if lines:
        print("goals (issue 14), this version:")
        for line in lines:
            print(f"  {line}")

