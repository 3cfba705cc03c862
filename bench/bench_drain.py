"""Backlog drain: position readings acknowledged per second at QoS 1, and the agent's peak RSS.

Setup (untimed): a store is filled with N realistic positions (Store.append + flush), closed
and copied twice; a private mosquitto runs on loopback (agent/demo/broker.py), no subscriber.

Project figures:

* drain rate: ``Store`` + ``MqttUplink`` (agent/uplink/mqtt.py) on a copy of the filled store, with
  a config from ``agent.config.parse`` (default ``max_batch``/``max_inflight``). The clock
  runs from ``uplink.start()`` until the broker has acknowledged every reading
  (``readings_acked == N``); the time until ``store.pending() == 0`` is printed too.
* peak RSS: the real agent process, ``python -m agent run --config F --until-drained`` on the
  other copy (no [gps] section, so it exits once the store is empty): the kernel's high-water
  mark of its resident set (VmHWM in /proc/PID/status), polled every 5 ms until it exits.

Baselines, same run, same broker:

* raw paho: one ``paho.mqtt.client.Client`` publishing the same N payloads (the exact bodies
  from the filled store), one message per reading at QoS 1, keeping paho's default in-flight
  window (20) full and driving ``client.loop()`` in one thread, as the uplink does; the clock
  stops at the last PUBACK. It is given the same bytes and spared everything else the agent
  does (reading SQLite, deleting acked rows). Of the plain clients tried, this was the
  fastest: ``loop_start()`` with the publisher in another thread ran 25-40% slower, and so
  did queueing 1,000 ahead of the window. (All 100k cannot simply be queued at once: paho's
  message ids wrap at 65,535 and ``publish`` then fails with MQTT_ERR_QUEUE_SIZE.)
* RSS floor: ``python -c "import agent.daemon.runner"`` (then a short sleep so it is sampled the
  same way): the same interpreter with the agent's modules loaded and nothing done, so the
  RSS ratio shows what the drain itself costs.

Goals (from the issue): drain rate >= 2x the raw one-message-per-reading rate; peak RSS of
the agent during the drain <= 60 MB.

    python bench/bench_drain.py [--count 100000]
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path

import paho.mqtt.client as mqtt
from _positions import DEVICE, REPO, positions
from paho.mqtt.enums import CallbackAPIVersion

from agent.config import parse
from agent.demo.broker import Mosquitto
from agent.store.buffer import Store
from agent.uplink.mqtt import MqttUplink

RATE_GOAL = 2.0
RSS_GOAL_MB = 60.0
TIMEOUT_S = 600.0
STALL_S = 30.0


def fill(path: Path, n: int) -> None:
    store = Store(path, device=DEVICE)
    store.start()
    for r in positions(n):
        store.append(r)
    if not store.flush(timeout=TIMEOUT_S):
        raise RuntimeError("flush timed out")
    store.close()


def copy_db(src: Path, dst: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        if Path(f"{src}{suffix}").exists():
            shutil.copyfile(f"{src}{suffix}", f"{dst}{suffix}")


def raw_paho(port: int, topic: str, payloads: list[str]) -> float:
    n, sent, acked = len(payloads), 0, 0

    def on_publish(c, u, mid, reason, props) -> None:
        nonlocal acked
        acked += 1

    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="bench-raw-paho")
    client.on_publish = on_publish
    window = client.max_inflight_messages  # paho's default, 20
    client.connect("127.0.0.1", port)
    try:
        deadline = time.monotonic() + 10
        while not client.is_connected():
            if client.loop(0.1) != mqtt.MQTT_ERR_SUCCESS or time.monotonic() > deadline:
                raise RuntimeError("raw client: no CONNACK")
        t0 = time.perf_counter()
        last, progress_at = 0, t0
        while acked < n:
            while sent < n and sent - acked < window:
                if (rc := client.publish(topic, payloads[sent], qos=1).rc) != mqtt.MQTT_ERR_SUCCESS:
                    raise RuntimeError(f"raw client: publish failed: {mqtt.error_string(rc)}")
                sent += 1
            if (rc := client.loop(0.05)) != mqtt.MQTT_ERR_SUCCESS:
                raise RuntimeError(f"raw client: {mqtt.error_string(rc)}")
            now = time.perf_counter()
            if acked != last:
                last, progress_at = acked, now
            elif now - progress_at > STALL_S:
                raise RuntimeError(f"raw client: stalled at {acked}/{n} PUBACKs")
        return time.perf_counter() - t0
    finally:
        client.disconnect()


def agent_drain(port: int, path: Path, n: int) -> tuple[float, float]:
    config = parse({"device": {"id": DEVICE}, "mqtt": {"port": port}, "store": {"path": str(path)}})
    store = Store(path, device=DEVICE, sync_interval_s=config.store.sync_interval_s)
    store.start()
    uplink = MqttUplink(config, store)
    try:
        t0 = time.perf_counter()
        uplink.start()
        deadline = t0 + TIMEOUT_S
        while uplink.readings_acked < n:
            if time.perf_counter() > deadline:
                raise RuntimeError(f"agent: only {uplink.readings_acked}/{n} acked ({uplink.last_error})")
            time.sleep(0.002)
        t_acked = time.perf_counter() - t0
        while store.pending() != 0:
            if time.perf_counter() > deadline:
                raise RuntimeError(f"agent: {store.pending()} readings still pending")
            time.sleep(0.01)
        return t_acked, time.perf_counter() - t0
    finally:
        uplink.stop()
        store.close()


def child_rss(cmd: list[str]) -> tuple[float, float]:
    """Run cmd; its wall time and its own peak RSS (VmHWM) in MB.

    Not ``wait4``'s ``ru_maxrss``: Linux carries the forking parent's high-water mark over
    ``exec``, so a child of this (big) process would report at least our size.
    """
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO)
    hwm_kb = 0
    status = Path(f"/proc/{proc.pid}/status")
    try:
        while proc.poll() is None:
            if time.perf_counter() - t0 > TIMEOUT_S:
                raise RuntimeError(f"{cmd} still running after {TIMEOUT_S:.0f} s")
            try:
                for line in status.read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        hwm_kb = max(hwm_kb, int(line.split()[1]))
            except OSError:
                pass
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} exited with {proc.returncode}")
    return time.perf_counter() - t0, hwm_kb / 1024


def agent_process(port: int, path: Path, workdir: Path) -> tuple[float, float]:
    conf = workdir / "agent.toml"
    conf.write_text(
        f'[device]\nid = "{DEVICE}"\n[mqtt]\nhost = "127.0.0.1"\nport = {port}\n'
        f'[store]\npath = "{path}"\n[log]\nlevel = "warning"\n'
    )
    wall, rss = child_rss([sys.executable, "-m", "agent", "run", "--config", str(conf), "--until-drained"])
    with closing(sqlite3.connect(path)) as db:
        left = db.execute("SELECT COUNT(*) FROM readings").fetchone()[0]
    if left:
        raise RuntimeError(f"agent process exited with {left} readings still in the store")
    return wall, rss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=100_000)
    n = ap.parse_args().count

    with tempfile.TemporaryDirectory(prefix="bench-drain-") as tmp:
        tmp = Path(tmp)
        broker = Mosquitto(tmp / "broker")
        broker.start()
        try:
            fill(tmp / "filled.db", n)
            copy_db(tmp / "filled.db", tmp / "inproc.db")
            copy_db(tmp / "filled.db", tmp / "process.db")
            with closing(sqlite3.connect(tmp / "filled.db")) as db:
                bodies = [b for (b,) in db.execute("SELECT body FROM readings ORDER BY id")]
            topic = f"lorry/{DEVICE}/position"

            t_raw = raw_paho(broker.port, topic, bodies)
            t_acked, t_empty = agent_drain(broker.port, tmp / "inproc.db", n)
            p_wall, p_rss = agent_process(broker.port, tmp / "process.db", tmp)
            _, floor_rss = child_rss([sys.executable, "-c", "import agent.daemon.runner, time; time.sleep(0.3)"])
        finally:
            broker.stop()

    agent_rate, raw_rate = n / t_acked, n / t_raw
    ratio = agent_rate / raw_rate
    avg = sum(map(len, bodies)) // n
    print(f"backlog drain, {n:,} positions (~{avg} B each), QoS 1, local mosquitto")
    print(f"  agent (Store+MqttUplink, defaults)  {agent_rate:>10,.0f} readings/s acked "
          f"({t_acked:.2f} s; pending()==0 after {t_empty:.2f} s)")
    print(f"  baseline raw paho, 1 msg/reading    {raw_rate:>10,.0f} readings/s acked ({t_raw:.2f} s)")
    print(f"  ratio agent/raw                     {ratio:>10.2f}x   goal >= {RATE_GOAL:.0f}x: "
          f"{'met' if ratio >= RATE_GOAL else 'NOT met'}")
    print(f"  peak RSS, `python -m agent run --until-drained` {p_rss:>6.1f} MB "
          f"(process wall {p_wall:.2f} s incl. start-up and 1 s drain check)")
    print(f"  baseline RSS, python -c 'import agent.daemon.runner'   {floor_rss:>6.1f} MB")
    print(f"  ratio drain/floor                                {p_rss / floor_rss:>6.2f}x   "
          f"goal <= {RSS_GOAL_MB:.0f} MB: {'met' if p_rss <= RSS_GOAL_MB else 'NOT met'}")


if __name__ == "__main__":
    main()
