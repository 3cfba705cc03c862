"""A big backlog must cost nothing while it waits: idle reads and CPU, start-up, `status`,
and the first position after a restart, with N buffered positions beside a near-empty store.

Setup (untimed): a store is filled through the project's own ``Store`` with N realistic
positions (bench/_positions.py) and a seal event and an alarm every 10,000 of them (urgent,
chained), then closed cleanly, as a stopped agent leaves it.

For each store, the real agent (``python -m agent run --config F``, no sources, ``[store]
max_mb`` 2048 so nothing is shed, the system clock trusted so the age limit is checked):

* start-up: broker port closed, the store's files dropped from the page cache; the agent's
  ``/proc/<pid>/io`` (``read_bytes``: from the disk; ``rchar``: every read() call, the page
  cache's included, Python's own imports too) and CPU from spawn to "running" + 6 s (the
  first maintenance pass included);
* idle: the same process over the next ``--idle-s`` seconds, per minute;
* ``status``: ``python -m agent status`` wall time, median of 3, store files cold each time;
* first position: a broker up and a subscriber on it; the store's files cold; from spawning
  the agent until the subscriber holds the newest position (the first message), then the
  first batch of the backlog; at each, the agent's reads so far and the payload sent; median
  of 3 restarts (each sends a little of the backlog; a small store is built anew).

``read_bytes`` includes the kernel's readahead, which on this kind of VM is 8 MB
(``/sys/block/*/queue/read_ahead_kb``; an SD card's is usually 128 KB): ``rchar`` is what
the process asked for.

Baseline, same run: the same measurements on a store of ``--small`` positions (100): what
the agent costs with (almost) nothing buffered; the ratio is what the backlog adds. Goals
(issue 14): idle reads <= 1 MB/min and CPU <= 0.1 s/min at 1M; status and first position
within 1.5x of the small store.

    python bench/bench_backlog.py [--count 1000000] [--small 100] [--idle-s 60] [--repo DIR]

``--repo`` runs the agent (and builds the stores) from another source tree, e.g. an older
version exported with ``git archive``, for a before/after comparison.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
from _positions import DEVICE, REPO
from _wear_proc import evict_file
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from agent.demo.broker import Mosquitto, free_port

TICK = os.sysconf("SC_CLK_TCK")
BUILD = """
import sys
sys.path[:0] = [{bench!r}]
from _positions import DEVICE, positions
from agent.model.chain import Chain
from agent.model.reading import Reading
from agent.store.buffer import Store
s = Store({db!r}, device=DEVICE, chain=Chain(DEVICE), sync_interval_s=30)
s.start()
for i, p in enumerate(positions({n})):
    s.append(p)
    if i % 10_000 == 5_000:
        s.append(Reading("seal", p.ts_ms, {{"seal": "container_door", "event": "opened"}}, urgent=True))
        s.append(Reading("alarm", p.ts_ms, {{"kind": "seal_opened", "state": "raised"}}, urgent=True))
assert s.flush(600)
s.close()
"""


def io(pid: int) -> dict[str, float]:
    """Bytes read (disk, all read calls) and CPU seconds of a process so far."""
    out = {k: float(v) for k, v in (line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())}
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    out["cpu_s"] = (int(stat[11]) + int(stat[12])) / TICK
    return out


def cold(db: Path) -> None:
    """Drop the store's files from the page cache (written back first)."""
    for suffix in ("", "-wal", "-shm"):
        p = Path(f"{db}{suffix}")
        if p.exists():
            evict_file(p)


def config(tmp: Path, db: Path, port: int) -> Path:
    cfg = tmp / f"agent-{port}.toml"
    cfg.write_text(f'[device]\nid = "{DEVICE}"\n[mqtt]\nhost = "127.0.0.1"\nport = {port}\nreconnect_min_s = 1\n'
                   f'reconnect_max_s = 10\n[store]\npath = "{db}"\nmax_mb = 2048\n[time]\n'
                   f'trust_system_clock = "always"\n[log]\nlevel = "info"\n')
    return cfg


def spawn(repo: Path, cfg: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as f:
        return subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(cfg)], cwd=repo,
                                stdout=f, stderr=f)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def idle(repo: Path, tmp: Path, db: Path, idle_s: float) -> dict[str, float]:
    """Start-up and idle figures with the broker down."""
    log = tmp / f"idle-{uuid.uuid4().hex[:6]}.log"
    cold(db)
    t0 = time.monotonic()
    proc = spawn(repo, config(tmp, db, free_port()), log)
    try:
        while "running as" not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() - t0 > 600:
                raise RuntimeError(f"agent did not start: {log.read_text()[-2000:]}")
            time.sleep(0.02)
        ready = time.monotonic() - t0
        time.sleep(6)
        a = io(proc.pid)
        time.sleep(idle_s)
        b = io(proc.pid)
    finally:
        stop(proc)
    per_min = 60 / idle_s
    return {"ready_s": ready, "start_read_bytes": a["read_bytes"], "start_rchar": a["rchar"],
            "start_cpu_s": a["cpu_s"], "idle_read_bytes": (b["read_bytes"] - a["read_bytes"]) * per_min,
            "idle_rchar": (b["rchar"] - a["rchar"]) * per_min, "idle_cpu_s": (b["cpu_s"] - a["cpu_s"]) * per_min}


def status_time(repo: Path, tmp: Path, db: Path) -> float:
    cfg = config(tmp, db, free_port())
    times = []
    for _ in range(3):
        cold(db)
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-m", "agent", "status", "--config", str(cfg)], cwd=repo, check=True,
                       stdout=subprocess.DEVNULL)
        times.append(time.monotonic() - t0)
    return statistics.median(times)


def first_position(repo: Path, tmp: Path, db: Path) -> dict[str, float]:
    """From spawning the agent (broker up) until a subscriber holds the newest position (the
    first message), then the first batch of the backlog (the second); at each, the agent's
    reads so far and the payload bytes the subscriber holds."""
    marks: list[dict[str, float]] = []
    done = threading.Event()
    proc: subprocess.Popen[bytes] | None = None
    t0 = 0.0
    sent = [0]

    def on_message(c: mqtt.Client, u: object, m: mqtt.MQTTMessage) -> None:
        sent[0] += len(m.payload)
        if proc is not None and len(marks) < 2:
            marks.append({"s": time.monotonic() - t0, "sent": sent[0], **io(proc.pid)})
            if len(marks) == 2:
                done.set()

    with Mosquitto(tmp / f"broker-{uuid.uuid4().hex[:6]}") as broker:
        sub = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
        subscribed = threading.Event()
        sub.on_connect = lambda c, u, f, rc, p: c.subscribe("lorry/+/position", qos=1)
        sub.on_subscribe = lambda *a: subscribed.set()
        sub.on_message = on_message
        sub.connect("127.0.0.1", broker.port)
        sub.loop_start()
        try:
            if not subscribed.wait(10):
                raise RuntimeError("subscriber did not subscribe")
            cold(db)
            t0 = time.monotonic()
            proc = spawn(repo, config(tmp, db, broker.port), tmp / "first.log")
            try:
                done.wait(120)
            finally:
                stop(proc)
        finally:
            sub.loop_stop()
            sub.disconnect()
    nan = {"s": float("nan"), "sent": 0.0, "read_bytes": 0.0, "rchar": 0.0}
    first, batch = (marks + [nan, nan])[:2]
    return {"first_s": first["s"], "first_read_bytes": first["read_bytes"], "first_rchar": first["rchar"],
            "batch_s": batch["s"], "batch_read_bytes": batch["read_bytes"], "batch_rchar": batch["rchar"],
            "batch_sent": batch["sent"]}


def build(repo: Path, tmp: Path, n: int) -> Path:
    db = tmp / f"store-{n}-{uuid.uuid4().hex[:6]}" / "buffer.db"
    db.parent.mkdir()
    subprocess.run([sys.executable, "-c", BUILD.format(bench=str(REPO / "bench"), db=str(db), n=n)], cwd=repo,
                   check=True)
    return db


def measure(repo: Path, tmp: Path, n: int, idle_s: float) -> dict[str, float]:
    t0 = time.monotonic()
    db = build(repo, tmp, n)
    out = {"build_s": time.monotonic() - t0, "store_mb": db.stat().st_size / 1e6}
    out |= idle(repo, tmp, db, idle_s)
    out["status_s"] = status_time(repo, tmp, db)
    runs = []
    for _ in range(3):  # each run sends some of the backlog: a small one is built anew
        runs.append(first_position(repo, tmp, db if n > 10_000 else build(repo, tmp, n)))
    runs.sort(key=lambda r: r["first_s"])
    return out | runs[1]  # the median run (timings are noisy on a shared machine)


ROWS = [  # key, label, unit scale, format
    ("store_mb", "store file size", 1, "{:10.1f} MB"),
    ("ready_s", "start -> running", 1, "{:10.2f} s"),
    ("start_read_bytes", "start-up read_bytes (disk)", 1e6, "{:10.2f} MB"),
    ("start_rchar", "start-up rchar (all reads)", 1e6, "{:10.2f} MB"),
    ("start_cpu_s", "start-up CPU", 1, "{:10.2f} s"),
    ("idle_read_bytes", "idle read_bytes per minute", 1e6, "{:10.3f} MB"),
    ("idle_rchar", "idle rchar per minute", 1e6, "{:10.3f} MB"),
    ("idle_cpu_s", "idle CPU per minute", 1, "{:10.3f} s"),
    ("status_s", "status (median of 3, cold)", 1, "{:10.3f} s"),
    ("first_s", "spawn -> newest position", 1, "{:10.3f} s"),
    ("first_read_bytes", "  read_bytes until then", 1e6, "{:10.2f} MB"),
    ("first_rchar", "  rchar until then", 1e6, "{:10.2f} MB"),
    ("batch_s", "spawn -> first backlog batch", 1, "{:10.3f} s"),
    ("batch_read_bytes", "  read_bytes until then", 1e6, "{:10.2f} MB"),
    ("batch_rchar", "  rchar until then", 1e6, "{:10.2f} MB"),
    ("batch_sent", "  payload sent by then", 1e6, "{:10.3f} MB"),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=1_000_000, help="positions in the backlog (default 1,000,000)")
    ap.add_argument("--small", type=int, default=100, help="positions in the baseline store (default 100)")
    ap.add_argument("--idle-s", type=float, default=60.0, help="idle window, s (default 60)")
    ap.add_argument("--repo", type=Path, default=REPO, help="source tree to run the agent from (default this one)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-backlog-") as t:
        tmp = Path(t)
        small = measure(args.repo, tmp, args.small, args.idle_s)
        big = measure(args.repo, tmp, args.count, args.idle_s)
    print(f"backlog at rest: {args.count:,} positions vs {args.small:,} (baseline); agent from {args.repo}")
    print(f"  {'':34}{f'{args.count:,}':>13}{f'{args.small:,}':>13}   ratio")
    for key, label, scale, fmt in ROWS:
        b, s = big[key] / scale, small[key] / scale
        ratio = f"{b / s:7.2f}x" if s else "      -"
        print(f"  {label:34}{fmt.format(b)}{fmt.format(s)}   {ratio}")
    print(f"  (store built in {big['build_s']:.0f} s; goals at 1M: idle reads <= 1 MB/min, CPU <= 0.1 s/min; "
          "status and first position <= 1.5x the baseline)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
