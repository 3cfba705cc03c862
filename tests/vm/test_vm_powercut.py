"""Real power cuts (issue 12, item 2): the agent from the .deb, in a Debian 12 guest with Debian's
kernel (tests/vm/vmimage.py), writing its store to an ext4 filesystem on a virtio-blk disk, and
QEMU killed with SIGKILL at random moments, again and again on the same disk. Unlike SIGKILL of
the agent alone (tests/e2e/test_faults.py), this loses whatever the guest had not written back: the
page cache goes with the machine, so a missing fsync loses data here.

Each cycle boots the minimal init (tests/vm/vmimage.py: no systemd, much quicker under software
emulation), which mounts the store's disk at /var/lib/lorry-agent and runs the agent as its
user, as the unit would: a GPS trip replayed at 40x, a seal with urgent events every half
second, a reefer, a depot geofence, health every 0.5 s, the chain. The host's broker (reached as
10.0.2.2) is up in even cycles and down in odd ones, and flips in the middle of some. QEMU is
killed either during the agent's start-up (store opening, recovery) or while it runs: seeded,
``LORRY_VM_SEED`` replays the choices (not the timing of a software CPU).

After every cut, on the host, before the next boot: the disk's journal replayed on a copy
(``e2fsck``, which must then find it clean) and the store read out with debugfs: SQLite's
``integrity_check`` is ok, and against what the backend has received so far, no (stream, seq)
comes back with other content and no stream's ``last_seq`` is below a seq the backend has, so
none can be numbered again. At the end one clean boot delivers the rest (``--until-drained``);
then every seq 1..last_seq of every stream has arrived (or is announced by a ``data_dropped``
alarm), nothing re-sent differs, ``lorry-agent verify-chain`` accepts the seal and alarm events
the backend received, with the key, and the store is sound.

What this cannot show: QEMU writes whatever the guest wrote to the host file at once
(``cache=writeback``; guest flushes become fdatasync), so a sector the guest wrote but never
flushed survives the cut. An SD card's volatile cache could lose it, or reorder it; that is
not modelled (nor by any QEMU disk cache mode).

``LORRY_VM_POWER_CUTS`` sets the number of cycles (default 20). Run with ``-s`` for the record.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean
from typing import Any

import pytest
import sqlite_utils

sys.path.insert(0, str(Path(__file__).parent))

import vmimage  # noqa: E402
from agent.demo import trip  # noqa: E402
from agent.demo.broker import Mosquitto  # noqa: E402
from agent.store import fold, journal  # noqa: E402
from agent.store.announce import Unannounced  # noqa: E402
from agent.store.schema import create_schema  # noqa: E402
from agent.store.seqledger import Ledger  # noqa: E402
from agent.tools.verify import verify  # noqa: E402
from support import REPO, Backend, wait_until, write_config  # noqa: E402

pytestmark = pytest.mark.vm

SEED = int(os.environ.get("LORRY_VM_SEED", "20261205"))
CUTS = int(os.environ.get("LORRY_VM_POWER_CUTS", "20"))
DEVICE = "CQ-HN-0042"
CHAIN_KEY = "vm-power-cut-chain-key-CQ-HN-0042\n"
STARTUP_SHARE = 0.25
"""Of the cuts, this share is aimed at the agent's start-up (opening and recovering the store:
it takes ~4 s under software emulation), this long after it was launched..."""
STARTUP_CUT_S = (0.3, 5.0)
RUNNING_CUT_S = (0.2, 10.0)
"""...and the others this long after it said it runs."""
BOOT_TIMEOUT_S = 180
DRAIN_TIMEOUT_S = 900


def log(line: str) -> None:
    print(f"[vm-powercut] {line}", flush=True)


# -- the guest ------------------------------------------------------------------------------------------

AGENT = """#!/bin/sh
# A power-cut cycle (vm.mode={mode}): the store's disk where the unit keeps it, the agent run as
# its user with the unit's umask and working folder. QEMU is killed at some moment.
mount -t ext4 /dev/vdb /var/lib/lorry-agent || exit 90
cd /var/lib/lorry-agent || exit 91
umask 0077
echo "@@agent $(cut -d' ' -f1 /proc/uptime)"
setpriv --reuid=lorry-agent --regid=lorry-agent --init-groups \\
  env -i PATH=/usr/bin:/bin HOME=/var/lib/lorry-agent LANG=C.UTF-8 \\
  /opt/lorry-agent/venv/bin/lorry-agent run --config /etc/lorry-agent/{config} {args}
rc=$?
cd /
umount /var/lib/lorry-agent
exit $rc
"""


def at(seconds: float) -> dt.datetime:
    return trip.START + dt.timedelta(seconds=seconds)


def configs(tmp: Path, port: int) -> tuple[str, str]:
    """The workload (as tests/e2e/test_faults.py's power cuts) and the final drain's config."""
    mqtt = {"host": "10.0.2.2", "port": port, "topic_prefix": "lorry", "keepalive_s": 5,
            "reconnect_min_s": 0.2, "reconnect_max_s": 1.0, "max_batch": 20}
    common = {"device": {"id": DEVICE}, "mqtt": mqtt, "store": {"path": "/var/lib/lorry-agent/buffer.db"},
              "chain": {"hmac_key_file": "/etc/lorry-agent/chain.key"}}
    kinds = ["opened", "sealed", "tampered", "sealed", "battery_low"]
    work = {
        **common,
        "gps": {"replay": "/etc/lorry-agent/trip.nmea", "replay_speed": 40},
        "reporting": {"min_period_s": 0, "min_distance_m": 0, "min_heading_deg": 0},
        "health": {"interval_s": 0.5},
        "seals": [{"name": "container_door", "driver": "sim", "seal_id": "ES-0042-01",
                   "events": [{"at": at(2 + 20 * k), "event": kinds[k % len(kinds)]} for k in range(130)]}],
        "temperature": [{"name": "reefer_front", "driver": "sim", "interval_s": 5, "high_c": 8, "min_duration_s": 0,
                         "hysteresis_c": 0.5,
                         "profile": [{"at": at(60 * k), "c": 4.0 if k % 2 == 0 else 12.0} for k in range(45)]}],
        "geofences": [{"name": "Chongqing depot", "kind": "depot", "seal_opening": "authorised",
                       "circle": {"lat": 29.4838, "lon": 106.4460, "radius_m": 300}}],
    }
    return (write_config(tmp / "agent.toml", work).read_text(),
            write_config(tmp / "drain.toml", common).read_text())


# -- what the host can read and prove -----------------------------------------------------------------------


@dataclass
class Snapshot:
    """The store as the next boot will find it, read from the disk with the machine off."""

    fs: vmimage.FsCheck
    files: list[str]
    integrity: str = "no store"
    last_seq: dict[str, int] = field(default_factory=dict)
    rows: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    """(stream, seq) → body of every sendable row (not held for its time)."""
    held: int = 0
    chain_seq: int = 0


def snapshot(disk: Path, dest: Path) -> Snapshot:
    fs = vmimage.read_files(disk, ["/"], dest)
    snap = Snapshot(fs, sorted(p.name for p in dest.iterdir()))
    db = dest / "buffer.db"
    if not db.exists():
        return snap
    # A copy: SQLite may apply the WAL to it, and the journal is folded into it.
    conn = sqlite3.connect(db, timeout=10, isolation_level=None)
    try:
        snap.integrity = "; ".join(r[0] for r in conn.execute("PRAGMA integrity_check"))
        # A cut before the first durable commit may leave a store without its tables: as the
        # next start will, read that as an empty store (what the backend holds must then be
        # nothing, which after_cut_problems checks)
        jpath = dest / "buffer.db.journal"
        if snap.integrity == "ok":
            # What the next start does first (agent/store/buffer.py): the schema (its creation
            # is made durable with the first fold only, so a cut may have taken it), then the
            # journal's readings (what the disk kept) into SQLite, numbered as they were.
            create_schema(sqlite_utils.Database(conn))
            fold.replay(conn, jpath, None, Ledger(dest / "buffer.db.ledger"), Unannounced(conn))
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        links = [r[8][0] for r in journal.read(jpath).records if r[0] == "r" and len(r) > 8 and r[8]]
        if "streams" in tables:
            snap.last_seq = dict(conn.execute("SELECT stream, last_seq FROM streams"))
        if "readings" in tables:
            for stream, seq, body, held in conn.execute("SELECT stream, seq, body, held FROM readings"):
                if held:
                    snap.held += 1
                else:
                    snap.rows[(stream, seq)] = json.loads(body)
        if "state" in tables:
            row = conn.execute("SELECT value FROM state WHERE key = 'chain_seq'").fetchone()
            snap.chain_seq = max([int(row[0]) if row else 0, *links])
    except sqlite3.DatabaseError as e:
        snap.integrity = f"unreadable: {type(e).__name__}: {e}"
    finally:
        conn.close()
    return snap


def received(backend: Backend) -> tuple[dict[str, dict[int, dict]], list[tuple[str, int]]]:
    """Readings by stream and seq (first copy wins, as a de-duplicating backend keeps them),
    and every (stream, seq) received again with other content."""
    by: dict[str, dict[int, dict]] = {}
    conflicts = []
    for r in backend.readings():
        assert r["device"] == DEVICE, r
        first = by.setdefault(r["stream"], {}).setdefault(r["seq"], r)
        if first != r:
            conflicts.append((r["stream"], r["seq"]))
    return by, conflicts


def after_cut_problems(snap: Snapshot, backend: Backend) -> list[str]:
    """What would let the backend see a seq twice with different content, or a store the
    next boot cannot trust."""
    problems = []
    if not snap.fs.ok:
        problems.append(f"filesystem: e2fsck -fy exit {snap.fs.fsck_rc}, then clean: {snap.fs.clean_after}\n"
                        + snap.fs.fsck_output[-1500:] + snap.fs.clean_after_output[-1500:])
    if snap.integrity not in ("ok", "no store"):
        problems.append(f"store: integrity_check: {snap.integrity[:500]}")
    problems += [f"store damaged: {name} (moved aside at start)" for name in snap.files if ".corrupt-" in name]
    by, conflicts = received(backend)
    if conflicts:
        problems.append(f"the backend got a seq again with other content: {conflicts[:5]}")
    for stream, seqs in by.items():
        if max(seqs) > snap.last_seq.get(stream, 0):
            problems.append(f"{stream}: the backend has seq {max(seqs)}, the store's last_seq is "
                            f"{snap.last_seq.get(stream, 0)}: that seq would be used again")
    for (stream, seq), body in snap.rows.items():
        seen = by.get(stream, {}).get(seq)
        if seen is not None and seen != body:
            problems.append(f"{stream} seq {seq}: the store holds other content than the backend received:\n"
                            f"  store:   {json.dumps(body)[:300]}\n  backend: {json.dumps(seen)[:300]}")
    chained = [r.get("chain_seq", 0) for s in ("seal", "alarm") for r in by.get(s, {}).values()]
    if chained and max(chained) > snap.chain_seq:
        problems.append(f"chain: the backend has chain_seq {max(chained)}, the store's is {snap.chain_seq}")
    return problems


# -- the run -------------------------------------------------------------------------------------------------


@dataclass
class Cycle:
    n: int
    broker: str
    cut: str
    """'start-up' or 'running': whether the agent had said it runs when the power went."""
    cut_after_s: float
    """After the agent was launched (start-up) or said it runs."""
    boot_s: float
    agent_start_s: float | None
    total_s: float
    check_s: float
    rows: int
    last_seq: dict[str, int]
    problems: list[str]


@pytest.fixture(scope="module")
def powercut_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    vmimage.require_qemu()
    rng = random.Random(SEED)
    tmp = tmp_path_factory.mktemp("vm-powercut")
    started = time.monotonic()
    base = vmimage.base_image()
    deb = vmimage.package(tmp_path_factory.mktemp("deb"))
    broker = Mosquitto(tmp / "broker")
    broker.start()
    backend = Backend(broker.port, client_id="backend-vm-powercut")
    trip_file = tmp / "trip.nmea"
    trip.write(trip_file, interval_s=1, max_hours=0.75)
    work, drain = configs(tmp, broker.port)
    owner = "root:lorry-agent"
    image = vmimage.build_image(base, deb, tmp / "root.img", files={
        "/etc/lorry-agent/agent.toml": vmimage.File(work, 0o640, owner),
        "/etc/lorry-agent/drain.toml": vmimage.File(drain, 0o640, owner),
        "/etc/lorry-agent/chain.key": vmimage.File(CHAIN_KEY, 0o640, owner),
        "/etc/lorry-agent/trip.nmea": vmimage.File(trip_file.read_bytes(), 0o640, owner),
        "/usr/local/lib/lorry-vm/cycle": vmimage.File(AGENT.format(mode="cycle", config="agent.toml", args=""), 0o755),
        "/usr/local/lib/lorry-vm/drain": vmimage.File(
            AGENT.format(mode="drain", config="drain.toml", args="--until-drained"), 0o755),
    })
    disk = vmimage.data_disk(tmp / "store.img", size="256M", owner=image.users["lorry-agent"])
    disks = [vmimage.Disk(image.path, readonly=True), vmimage.Disk(disk)]
    log(f"seed {SEED}, {CUTS} power cuts; image and disk ready after {time.monotonic() - started:.0f} s")
    cycles: list[Cycle] = []
    out: dict[str, Any] = {"cycles": cycles, "backend": backend, "tmp": tmp}
    try:
        t_cycles = time.monotonic()
        for n in range(1, CUTS + 1):
            up = n % 2 == 1
            if up and not broker.running:
                broker.start()
            elif not up and broker.running:
                broker.stop()
            flip = rng.random() < 0.3
            in_startup = rng.random() < STARTUP_SHARE
            delay = rng.uniform(*STARTUP_CUT_S) if in_startup else rng.uniform(*RUNNING_CUT_S)
            flip_at = rng.uniform(0, delay)
            vm = vmimage.Vm(base, disks, name=f"cut{n:02d}", log_dir=tmp / "consoles", init=vmimage.MINIMAL_INIT_PATH,
                            append="quiet vm.mode=cycle", log=lambda _line: None)
            try:
                vm.start()
                launched = vm.wait_for("@@agent", BOOT_TIMEOUT_S).t
                if in_startup:
                    t0 = launched
                else:
                    t0 = vm.wait_for("lorry-agent running as", BOOT_TIMEOUT_S).t
                flipped = False
                while time.monotonic() < t0 + delay:
                    if vm.find("@@vm-rc"):
                        raise AssertionError(f"cycle {n}: the agent ended on its own (seed {SEED}):\n{vm.tail(80)}")
                    if flip and not flipped and time.monotonic() >= t0 + flip_at:
                        broker.stop() if broker.running else broker.start()
                        flipped = True
                    time.sleep(0.02)
                t_cut = vm.power_cut()
            finally:
                vm.close()
            running = vm.find("lorry-agent running as")
            state = ("up" if up else "down") + ((" -> " + ("up" if broker.running else "down")) if flipped else "")
            if broker.running:
                time.sleep(1.0)  # what the broker acknowledged reaches the backend
            t_check = time.monotonic()
            snap = snapshot(disk, tmp / "snapshots" / f"{n:02d}")
            problems = after_cut_problems(snap, backend)
            cycle = Cycle(n=n, broker=state, cut="running" if running and running.t < t_cut else "start-up",
                          cut_after_s=round(t_cut - t0, 2), boot_s=vm.boot_s or 0,
                          agent_start_s=None if running is None else running.t - launched,
                          total_s=time.monotonic() - vm.started, check_s=time.monotonic() - t_check,
                          rows=len(snap.rows) + snap.held, last_seq=snap.last_seq, problems=problems)
            cycles.append(cycle)
            log(f"cycle {n}/{CUTS}: broker {state}, cut {cycle.cut_after_s:.1f} s into the agent's "
                f"{'run' if cycle.cut == 'running' else 'start-up'}; boot {cycle.boot_s:.1f} s, agent start "
                + ("-" if cycle.agent_start_s is None else f"{cycle.agent_start_s:.1f} s")
                + f", cycle {cycle.total_s:.1f} s (check {cycle.check_s:.2f} s); store {cycle.rows} rows, "
                f"last_seq {snap.last_seq}; backend {len(backend.readings())} readings"
                + (f"; PROBLEMS: {problems}" if problems else ""))
        out["cycles_s"] = time.monotonic() - t_cycles

        # -- one clean boot delivers the rest -------------------------------------------------------------
        if not broker.running:
            broker.start()
        vm = vmimage.Vm(base, disks, name="drain", log_dir=tmp / "consoles", init=vmimage.MINIMAL_INIT_PATH,
                        append="quiet vm.mode=drain")
        try:
            vm.start()
            rc_line = vm.wait_for("@@vm-rc", DRAIN_TIMEOUT_S)
            vm.wait_exit(60)
        finally:
            vm.close()
        out["drain_rc"] = int(rc_line.after("@@vm-rc").split()[0])
        out["drain_s"] = vm.total_s
        out["drain_console"] = vm.tail(80)
        out["final"] = snapshot(disk, tmp / "snapshots" / "final")
        out["total_s"] = time.monotonic() - started
    finally:
        backend.close()
        broker.stop()
        image.path.unlink(missing_ok=True)  # 1 GB; the store's disk (small) stays for a post-mortem
    return out


def missing(by: dict[str, dict[int, dict]], last_seq: dict[str, int]) -> tuple[dict[str, list[int]], int]:
    """Per stream, the seqs up to last_seq that neither arrived nor were announced as given
    up; and how many were announced."""
    ranges: dict[str, list[tuple[int, int]]] = {}
    for a in by.get("alarm", {}).values():
        if a.get("kind") == "data_dropped" and a.get("first_seq"):
            ranges.setdefault(a["dropped_stream"], []).append((a["first_seq"], a["last_seq"]))
    lost, announced = {}, 0
    for stream, last in last_seq.items():
        got = by.get(stream, {})
        gaps = [s for s in range(1, last + 1) if s not in got]
        covered = [s for s in gaps if any(lo <= s <= hi for lo, hi in ranges.get(stream, []))]
        announced += len(covered)
        if len(gaps) > len(covered):
            lost[stream] = sorted(set(gaps) - set(covered))
    return lost, announced


def test_every_power_cut_leaves_a_sound_store_that_reuses_no_seq(powercut_run: dict[str, Any]) -> None:
    cycles: list[Cycle] = powercut_run["cycles"]
    assert len(cycles) == CUTS
    bad = [(c.n, p) for c in cycles for p in c.problems]
    assert not bad, f"seed {SEED}:\n" + "\n".join(f"cycle {n}: {p}" for n, p in bad)
    cuts = {kind: sum(c.cut == kind for c in cycles) for kind in ("start-up", "running")}
    brokers = {c.broker for c in cycles}
    assert cuts["running"] >= CUTS // 2 and any(b.startswith("up") for b in brokers) and \
        any(b.startswith("down") for b in brokers), (cuts, brokers)


def test_after_the_power_cuts_nothing_is_lost_or_altered(powercut_run: dict[str, Any]) -> None:
    run = powercut_run
    backend: Backend = run["backend"]
    assert run["drain_rc"] == 0, f"the final drain failed:\n{run['drain_console']}"
    final: Snapshot = run["final"]
    assert final.fs.ok, final.fs.fsck_output + final.fs.clean_after_output
    assert final.integrity == "ok", final.integrity
    assert not [f for f in final.files if ".corrupt-" in f], final.files

    def complete() -> bool:
        return not missing(received(backend)[0], final.last_seq)[0]

    try:
        wait_until(complete, 60, "every seq at the backend")
    except AssertionError:
        pass
    by, conflicts = received(backend)
    lost, announced = missing(by, final.last_seq)
    assert not conflicts, f"re-sent readings with other content (seed {SEED}): {conflicts[:10]}"
    assert not lost, f"readings lost (seed {SEED}): " + "; ".join(
        f"{s}: {len(v)}, e.g. {v[:10]}" for s, v in lost.items())
    assert announced == 0, f"{announced} readings announced as given up: a power cut must not damage the store"
    for stream, seqs in by.items():
        assert max(seqs) <= final.last_seq.get(stream, 0), stream
    # The chain, as a backend checks it: every seal and alarm event received, with the key
    events = run["tmp"] / "received-events.jsonl"
    with open(events, "w") as f:
        for r in backend.readings():
            if r["stream"] in ("seal", "alarm"):
                f.write(json.dumps(r) + "\n")
    key = run["tmp"] / "chain.key"
    key.write_text(CHAIN_KEY)
    key.chmod(0o600)
    r = subprocess.run([sys.executable, "-m", "agent", "verify-chain", str(events), "--key-file", str(key)],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    (report,) = verify([e for s in ("seal", "alarm") for e in by.get(s, {}).values()], CHAIN_KEY.strip().encode())
    assert report.ok and report.last == final.chain_seq, (report.problems[:5], report.last, final.chain_seq)

    cycles: list[Cycle] = run["cycles"]
    delivered = sum(len(v) for v in by.values())
    log(f"RESULT (seed {SEED}): {len(cycles)} power cuts survived "
        f"({sum(c.cut == 'running' for c in cycles)} while running, {sum(c.cut == 'start-up' for c in cycles)} "
        f"during start-up); readings lost: {sum(len(v) for v in lost.values())}; announced as dropped: {announced}; "
        f"{delivered} readings delivered ({', '.join(f'{s} {len(v)}' for s, v in sorted(by.items()))}), "
        f"{len(backend.readings()) - delivered} duplicates; chain verified: {report.events} events; "
        f"{r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ''}")
    started = [c.agent_start_s for c in cycles if c.agent_start_s is not None]
    log(f"TIMINGS: per cycle mean {mean(c.total_s for c in cycles):.1f} s "
        f"(max {max(c.total_s for c in cycles):.1f} s); "
        f"VM boot (QEMU start to init) mean {mean(c.boot_s for c in cycles):.1f} s; "
        f"agent start-up mean {mean(started):.1f} s; "
        f"check after each cut mean {mean(c.check_s for c in cycles):.2f} s; "
        f"all cycles {run['cycles_s']:.0f} s; final drain boot {run['drain_s']:.0f} s; total {run['total_s']:.0f} s")
