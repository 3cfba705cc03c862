"""Wear and wake-ups: what the whole agent process writes, reads, syncs and burns, per day.

The real agent, ``python -m agent run --config F``, runs as a separate process, as systemd runs
it (``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` of the unit's ``WatchdogSec=30``), and is measured
from outside. Each run: start, READY=1, a warm-up (``--warmup``, default 110 s: past the first
health reading, due 60 s after start, and the group that numbers it: a stream's first seq
reserves its block in the seq ledger, a one-off write of 8 pages that a window must not
count as a daily rate), then two windows of ``--seconds`` (default 60): the
first with nothing attached (bytes, CPU, context switches, readings), the second with strace
attached (sync calls only: an attached strace stops the agent on every system call, which
would inflate CPU and context switches; ``strace -f --seccomp-bpf`` from the start was tried
and also tripled the CAN thread's context switches).

Scenarios:

* ``up``: typical load, broker up. 1 Hz GPS at real time through a pseudo-terminal (RMC + GGA
  of the demo trip on the expressway, ~75 km/h, stamped with the current time); the truck's
  J1939 bus (~1,450 frames/s: the mix of bench/bench_can.py, built with tests/canlog.py) on a
  vcan interface when one can be made, else a generated candump capture replayed by the
  agent at ``replay_speed = 1`` (it waits for each frame's time, as a bus would deliver it);
  a DS18B20 in a 1-Wire sysfs tree under a temp root; a simulated seal (sealed a minute before
  start); every other setting at its default. A private mosquitto on loopback.
* ``down``: the same, the broker's port closed: everything stays in the store.
* ``parked``: no sources (health readings and the status only), broker up; the windows are
  ``--parked-seconds`` (default 300, the health interval: any such window holds exactly one).
* ``backlog``: a store pre-filled with ``--backlog`` positions (default 1,000,000, ~200 B
  each, written by that version's own ``Store``), broker down, no sources; ``[store] max_mb``
  ``--backlog-max-mb`` (default 4096, so nothing is shed: the default 256 would shed a third
  of it at the first maintenance) and ``reconnect_min_s``/``max_s`` 0.5/1 (so the broker
  coming back is seen within a second); beside the same with a store of one position
  ("empty"). The store's files are dropped from the page cache first (only those files), so
  start-up reads come from the disk.

Figures (per day = the window's amount x 86,400 / window):

* bytes written: ``write_bytes`` of ``/proc/<pid>/io`` (the whole thread group). The kernel
  counts a page when the process makes it dirty: each 4 KiB page written through ``write()``
  or an mmap (SQLite's ``-shm``) that was clean, i.e. what writeback will send to the device;
  a page rewritten while still dirty counts once, one rewritten after an fsync counts again
  (each run of the bench checks this first: 64 appends of 100 B, each fsynced, count 64
  pages). Not counted: the filesystem's journal and metadata (ext4's jbd2 thread), the card's
  own amplification (erase blocks), what the agent prints (journald writes it: shown apart as
  log output). ``cancelled_write_bytes`` (dirty pages deleted before writeback) is not
  subtracted (a note says when there are any). On tmpfs nothing is counted: the bench refuses.
  The store folder's growth and the WAL's size are shown beside it.
* the readings' own JSON size: broker up, the bytes of every reading object the bench's
  subscriber received in the window (a batch ``[a,b]`` counts ``a`` and ``b``); broker down,
  the body bytes of the rows the store holds with ``stored_ms`` in the window (read from a
  copy after the stop).
* write amplification: bytes written ÷ the readings' JSON size.
* fsyncs: ``fsync``/``fdatasync``/``sync_file_range``/``msync``/``syncfs``/``sync`` calls in
  the second window, from ``strace -f -ttt -y -p PID``, by call and file; that window's bytes
  written are printed beside the first's as a check.
* CPU: utime + stime of ``/proc/<pid>/stat`` (the thread group) ÷ the window, % of one core.
* context switches: voluntary + nonvoluntary of every ``/proc/<pid>/task/*/status`` (a thread
  that ends within the window takes its count with it: a note says when).
* RSS at the end of the first window and its peak (VmRSS, VmHWM); start-up: from the process's
  start to READY=1.
* backlog: start-up reads until READY (``read_bytes``: from the disk, the interpreter's own
  files included when not cached; ``rchar``: bytes returned by read() calls, page cache
  included: the empty store's column is the interpreter's and imports' share), idle reads and
  CPU seconds per minute, the wall time of ``lorry-agent status`` (a new process, imports
  included) against the running agent's store, the time from the broker coming up to the first
  position at the subscriber (up to a second of it is the reconnect backoff), and from starting
  the agent on a fresh copy of the store (cold cache, broker up) to it.
* imports: ``python -X importtime`` of ``run`` with the typical config until READY + 2 s:
  modules imported, their cumulative time, and any backend tool (``agent.tools``, ``agent.demo``,
  ``agent.daemon.dropin``, ``agent.compact.decoder``).

Baseline, same run, same inputs, same broker: the previous version, ``git worktree add`` of
``--baseline`` (default ``RESTRUCTURE_HEAD``: ``restructure`` when issue 14's work began), its
processes importing its own tree (checked). This version is a snapshot of the working tree's agent/ and drivers/ taken
when the bench starts. Both are byte-compiled first, as an installed package is, and run with
PYTHONDONTWRITEBYTECODE. The versions take turns to go first. CPU and context switches are
noisy on a shared machine; bytes and sync counts much less so, but they come in steps (a status
write every 30 s, a temperature every 60 s, CAN values every 30 s, a health reading every
300 s): the longer the window, the steadier the figure.

Goals (issue 14): write amplification <= 10x (broker up and down); parked <= 5 MB/day; fsyncs
<= 120/h driving, <= 10/h parked; CPU <= 2 % of a core and <= 100 context switches/s at the
typical load; with the backlog, idle reads <= 1 MB/min and CPU <= 0.1 s/min, ``status`` and the
first position after a restart within 1.5x of an empty store; ``run`` imports no backend tool.

    python bench/bench_wear.py [--seconds 60] [--warmup 110] [--parked-seconds 300]
        [--backlog 1000000] [--backlog-max-mb 4096] [--scenario up|down|parked|backlog ...]
        [--baseline REV] [--can auto|vcan|replay] [--quick] [--tmp DIR] [--keep]
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _positions import REPO

sys.path.insert(0, str(REPO / "tests"))  # canlog, for the CAN mix

import _wear_agent as ag  # noqa: E402
import _wear_inputs as inp  # noqa: E402
import _wear_proc as kp  # noqa: E402
from _wear_report import Figures, report  # noqa: E402

from agent.demo.broker import Mosquitto, free_port, mosquitto_binary  # noqa: E402

RESTRUCTURE_HEAD = "372356262cc5b9a605438fbfd3f5dee7e1d68d7e"
"""``restructure`` when issue 14's work began (issue 13's layout, nothing of issue 14 yet): the
default baseline, so every figure is read against the agent as it was before."""
BASELINE_DEFAULT = RESTRUCTURE_HEAD
SCENARIOS = ("up", "down", "parked", "backlog")


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path):
        self.args = args
        self.tmp = tmp
        self.python = sys.executable
        self.strace = kp.need_strace()
        self.broker: Mosquitto | None = None
        self.vcan: str | None = None
        self.can_note = ""
        self.can_kind = "?"
        self._fills: dict[tuple[str, int], Path] = {}
        self.fill_s: dict[tuple[str, int], float] = {}

    # -- set-up ----------------------------------------------------------------------------

    def start(self) -> None:
        if mosquitto_binary() is None:
            raise SystemExit("bench_wear: mosquitto is not installed (apt-get install -y mosquitto)")
        self.broker = Mosquitto(self.tmp / "broker", persistence=False).start()
        if self.args.can in ("auto", "vcan") and {"up", "down"} & set(self.args.scenario):
            name = f"lwear{os.getpid() % 100_000}"
            why = inp.vcan_available(name)
            if why is None:
                self.vcan = name
            elif self.args.can == "vcan":
                raise SystemExit(f"bench_wear: no vcan interface: {why}")
            else:
                self.can_note = f"no vcan here (`ip link add type vcan`: {why}), so "

    def close(self) -> None:
        if self.broker is not None:
            self.broker.stop()
        if self.vcan:
            inp.remove_vcan(self.vcan)

    def config(self, path: Path, **kw: Any) -> Path:
        return inp.agent_config(path, trust_system_clock=self.args.trust_system_clock, **kw)

    def workdir(self, v: ag.Version, name: str) -> Path:
        d = self.tmp / v.label / name
        shutil.rmtree(d, ignore_errors=True)
        (d / "state").mkdir(parents=True)
        return d

    # -- one measured window ---------------------------------------------------------------

    def measure(self, run: ag.AgentRun, f: Figures, seconds: float, state: Path) -> tuple[kp.Sample, kp.Sample]:
        """Two windows of ``seconds`` after the warm-up: the first with nothing attached (bytes,
        CPU, context switches, readings), the second with strace attached (sync calls only).
        Returns the first window's samples."""
        f.startup_s = run.wait_ready()
        ready = kp.sample(run.pid)
        f.startup_read_bytes, f.startup_rchar = ready.io["read_bytes"], ready.io["rchar"]
        self._sleep(run, self.args.warmup)
        s0, sizes0, log0 = kp.sample(run.pid), kp.folder_sizes(state), run.log_bytes
        self._sleep(run, seconds)
        s1, sizes1, log1 = kp.sample(run.pid), kp.folder_sizes(state), run.log_bytes
        f.seconds = s1.mono - s0.mono
        f.written = s1.io["write_bytes"] - s0.io["write_bytes"]
        f.cancelled = s1.io["cancelled_write_bytes"] - s0.io["cancelled_write_bytes"]
        f.read_bytes = s1.io["read_bytes"] - s0.io["read_bytes"]
        f.rchar = s1.io["rchar"] - s0.io["rchar"]
        f.cpu_s = s1.cpu_s - s0.cpu_s
        f.ctx, f.ctx_lost = kp.ctx_between(s0, s1)
        f.rss_kb, f.hwm_kb, f.threads = s1.rss_kb, s1.hwm_kb, s1.threads
        f.growth = sum(sizes1.values()) - sum(sizes0.values())
        f.wal_end = sizes1.get("buffer.db-wal", 0)
        f.store_end = sum(sizes1.values())
        f.log_bytes = log1 - log0
        tracer = kp.StraceAttach(self.strace, run.pid, run.workdir / f"strace-{time.monotonic_ns() % 10**9}.txt")
        try:
            t0 = kp.sample(run.pid)
            self._sleep(run, seconds)
            t1 = kp.sample(run.pid)
        finally:
            calls = tracer.detach()
        f.fsync_seconds = t1.mono - t0.mono
        f.traced_written = t1.io["write_bytes"] - t0.io["write_bytes"]
        for call in calls:
            if t0.wall <= call.ts < t1.wall:
                f.syncs[f"{call.call} {Path(call.path).name or '?'}"] += 1
        return s0, s1

    @staticmethod
    def _sleep(run: ag.AgentRun, seconds: float) -> None:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            if not run.alive():
                raise RuntimeError(f"the agent exited ({run.proc.returncode}) during the measurement:\n{run.log()}")
            time.sleep(min(1.0, left))

    # -- scenarios ---------------------------------------------------------------------------

    def typical(self, v: ag.Version, scenario: str) -> Figures:
        f = Figures(scenario, v.label)
        wd = self.workdir(v, scenario)
        assert self.broker is not None
        up = scenario == "up"
        inputs = inp.typical_inputs(wd, int(self.args.warmup + self.args.seconds + 90), self.vcan)
        self.can_kind = inputs.can_kind
        sub = run = None
        try:
            sub = ag.Subscriber(self.broker.port) if up else None
            config = self.config(wd / "agent.toml", port=self.broker.port if up else free_port(),
                                 store=wd / "state" / "buffer.db", sources=inputs.sections)
            run = ag.AgentRun(v, config, wd, self.python)
            s0, s1 = self.measure(run, f, self.args.seconds, wd / "state")
        finally:
            if run is not None:
                run.stop()
            inputs.close()
            if sub is not None:
                time.sleep(0.5)
                sub.close()
        if sub is not None:
            f.readings, f.json_bytes = sub.between(s0.wall, s1.wall)
        else:
            got = ag.stored_between(wd / "state", "buffer.db", int(s0.wall * 1000), int(s1.wall * 1000))
            if isinstance(got, str):
                f.readings_note = got
            else:
                f.readings, f.json_bytes = got
        return f

    def parked(self, v: ag.Version) -> Figures:
        f = Figures("parked", v.label)
        wd = self.workdir(v, "parked")
        assert self.broker is not None
        sub = ag.Subscriber(self.broker.port)
        run = None
        try:
            config = self.config(wd / "agent.toml", port=self.broker.port, store=wd / "state" / "buffer.db")
            run = ag.AgentRun(v, config, wd, self.python)
            s0, s1 = self.measure(run, f, self.args.parked_seconds, wd / "state")
        finally:
            if run is not None:
                run.stop()
            time.sleep(0.5)
            sub.close()
        f.readings, f.json_bytes = sub.between(s0.wall, s1.wall)
        return f

    def filled(self, v: ag.Version, n: int) -> Path:
        key = (v.label, n)
        if key not in self._fills:
            state = self.tmp / v.label / f"fill-{n}"
            self.fill_s[key] = inp.fill_backlog(v, self.python, state, n)
            self._fills[key] = state
        return self._fills[key]

    def backlog(self, v: ag.Version, n: int) -> Figures:
        """Idle with ``n`` positions buffered, broker down; then ``status``, the broker coming up,
        and a restart on a fresh copy of the same store (cold cache) with the broker up."""
        name = "backlog" if n > 1 else "empty"
        f = Figures(name, v.label)
        wd = self.workdir(v, name)
        port = free_port()

        def fresh(state: Path) -> Path:
            shutil.rmtree(state, ignore_errors=True)
            shutil.copytree(self.filled(v, n), state)
            kp.evict(state)
            return self.config(wd / f"{state.name}.toml", port=port, store=state / "buffer.db",
                               mqtt_extra={"reconnect_min_s": 0.5, "reconnect_max_s": 1.0},
                               store_extra={"max_mb": self.args.backlog_max_mb})

        config = fresh(wd / "state")
        run = ag.AgentRun(v, config, wd, self.python)
        broker = sub = None
        try:
            self.measure(run, f, self.args.seconds, wd / "state")
            t = time.monotonic()
            st = subprocess.run([self.python, "-m", "agent", "status", "--config", str(config)], cwd=v.tree,
                                env=v.env(), capture_output=True, text=True, timeout=300)
            f.status_s = time.monotonic() - t
            if st.returncode != 0:
                f.error = f"status exited with {st.returncode}: {st.stderr.strip()[-300:]}"
            broker = Mosquitto(wd / "broker", port=port, persistence=False).start()
            t_up = time.time()
            sub = ag.Subscriber(port)
            f.first_up_s = self._first_position(sub, t_up)
            run.stop()
            again_config = fresh(wd / "restart")
            t_restart = time.time()
            again = ag.AgentRun(v, again_config, wd, self.python)
            try:
                f.restart_first_s = self._first_position(sub, t_restart)
            finally:
                again.stop()
        finally:
            run.stop()
            if sub is not None:
                sub.close()
            if broker is not None:
                broker.stop()
        return f

    @staticmethod
    def _first_position(sub: ag.Subscriber, since: float, timeout: float = 120) -> float:
        deadline = time.time() + timeout
        while time.time() < deadline:
            t = sub.first("position", since)
            if t is not None:
                return t - since
            time.sleep(0.01)
        return math.nan

    def imports(self, v: ag.Version) -> kp.Imports:
        wd = self.workdir(v, "imports")
        assert self.broker is not None
        inputs = inp.typical_inputs(wd, 60, self.vcan)
        run = None
        try:
            config = self.config(wd / "agent.toml", port=self.broker.port, store=wd / "state" / "buffer.db",
                                 sources=inputs.sections)
            run = ag.AgentRun(v, config, wd, self.python, python_args=("-X", "importtime"),
                             keep_log=True)
            run.wait_ready()
            time.sleep(2)
        finally:
            if run is not None:
                run.stop()
            inputs.close()
        return kp.parse_importtime("\n".join(run.full_log or []))


# -- main --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=None, help="measured window (default 60; --quick 15)")
    ap.add_argument("--warmup", type=float, default=None,
                    help="seconds between READY and the window (default 110: past the first health reading "
                         "and the group that numbers it; --quick 5)")
    ap.add_argument("--parked-seconds", type=float, default=None,
                    help="the parked scenario's window (default 300, one health period; --quick 15)")
    ap.add_argument("--backlog", type=int, default=None, help="positions in the backlog store (default 1,000,000; "
                                                              "--quick 100,000)")
    ap.add_argument("--backlog-max-mb", type=float, default=4096,
                    help="[store] max_mb in the backlog scenario (default 4096: nothing is shed; 256 is the default)")
    ap.add_argument("--trust-system-clock", choices=("always", "auto", "never"), default="always",
                    help='[time] trust_system_clock (default "always": as "auto" on a Pi whose clock NTP has set; '
                         'this machine may have no systemd-timedated to ask)')
    ap.add_argument("--scenario", action="append", choices=SCENARIOS,
                    help="run only these (repeatable; default all)")
    ap.add_argument("--baseline", default=BASELINE_DEFAULT,
                    help=f"git revision to compare with (default {RESTRUCTURE_HEAD[:10]}: restructure's HEAD "
                         "before issue 14's work)")
    ap.add_argument("--can", choices=("auto", "vcan", "replay"), default="auto",
                    help="CAN source: a vcan interface if it can be made (auto), or a replayed capture")
    ap.add_argument("--quick", action="store_true", help="15 s windows, 5 s warm-up, 100k backlog (a smoke test)")
    ap.add_argument("--tmp", type=Path, default=None,
                    help="where the stores live (default the system temp folder; must be a disk, not tmpfs)")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder (stores, logs, strace output)")
    a = ap.parse_args(argv)
    q = a.quick
    a.seconds = a.seconds if a.seconds is not None else (15.0 if q else 60.0)
    a.warmup = a.warmup if a.warmup is not None else (5.0 if q else 110.0)
    a.parked_seconds = a.parked_seconds if a.parked_seconds is not None else (15.0 if q else 300.0)
    a.backlog = a.backlog if a.backlog is not None else (100_000 if q else 1_000_000)
    a.scenario = [s for s in SCENARIOS if s in (a.scenario or SCENARIOS)]
    if a.seconds <= 0 or a.parked_seconds <= 0 or a.warmup < 0 or a.backlog < 1:
        ap.error("windows must be > 0 s, the warm-up >= 0 s, the backlog >= 1")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def on_term(signum: int, _frame: object) -> None:
        raise SystemExit(f"bench_wear: signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    tmp = Path(tempfile.mkdtemp(prefix="bench-wear-", dir=args.tmp))
    bench: Bench | None = None
    worktree: Path | None = None
    try:
        bench = Bench(args, tmp)
        synced, unsynced, unsynced_w = kp.write_bytes_check(tmp / "check", bench.python)
        if synced == 0:
            raise SystemExit(f"bench_wear: {tmp} is on a filesystem that does not count write_bytes (tmpfs?); "
                             "give --tmp a folder on a disk")
        this = ag.Version("this", ag.snapshot_tree(tmp / "this-tree"), ag.describe_tree())
        worktree, rev = ag.add_worktree(args.baseline, tmp / "baseline-tree")
        base = ag.Version("baseline", worktree, rev[:10])
        for v in (this, base):
            v.compile(bench.python)
            v.check_imports(bench.python)
        bench.start()
        res: dict[tuple[str, str], Figures] = {}
        imports: dict[str, kp.Imports] = {}
        load0 = os.getloadavg()
        t_start = time.monotonic()
        order = [this, base]
        for s in args.scenario:
            jobs: list[tuple[str, Any]] = []
            if s in ("up", "down"):
                jobs.append((s, lambda v, s=s: bench.typical(v, s)))
            elif s == "parked":
                jobs.append((s, bench.parked))
            else:
                jobs.append(("backlog", lambda v: bench.backlog(v, args.backlog)))
                jobs.append(("empty", lambda v: bench.backlog(v, 1)))
            for name, job in jobs:
                for v in order:
                    print(f"bench_wear: {name}, {v.label} ({v.rev}) ...", file=sys.stderr, flush=True)
                    try:
                        res[(name, v.label)] = job(v)
                    except Exception as e:  # noqa: BLE001 - one failed run is reported, the rest still run
                        res[(name, v.label)] = Figures(name, v.label, error=f"{type(e).__name__}: {e}")
                    kp.kill_children()
                order.reverse()  # the versions take turns to go first
        if {"up", "down"} & set(args.scenario):
            for v in (this, base):
                print(f"bench_wear: imports, {v.label} ...", file=sys.stderr, flush=True)
                try:
                    imports[v.label] = bench.imports(v)
                except Exception as e:  # noqa: BLE001
                    print(f"bench_wear: imports of {v.label} failed: {e}", file=sys.stderr)
                kp.kill_children()
        report(args, bench, this, base, res, imports, (synced, unsynced, unsynced_w), load0,
               time.monotonic() - t_start)
        return 1 if any(f.error for f in res.values()) else 0
    finally:
        kp.kill_children()
        if bench is not None:
            bench.close()
        if worktree is not None:
            ag.remove_worktree(worktree)
        if args.keep:
            print(f"bench_wear: kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)



if __name__ == "__main__":
    sys.exit(main())
