"""A day's backlog over a slow roaming link: how soon the backend knows where the lorry is,
what happened to its seals, and everything else.

Setup (untimed): a store is filled, in time order, with a 24 h backlog at 1 Hz: 86,400
realistic positions (bench/_positions.py) and the events of a day at the borders: 20 seal
events (10 customs stops, each `opened` then `sealed`, e-seal fields and the last fix) and 40
alarms (10 `seal_opened`, 10 geofence enter/exit pairs, 5 temperature active/cleared pairs),
urgent and chained (agent/model/chain.py) as the agent stores them. A private mosquitto runs on
loopback; a backend subscriber (paho, MQTT 5, QoS 1 on ``lorry/#``) connects to it directly
before the agent starts and decodes every message with ``agent.watch.decode`` (JSON or
compact). Between the agent and the broker: ``agent.linksim.LinkSim`` with 300 ms round trip
and 256 kbit/s each way (a poor roaming 3G/EDGE link).

Project figures: the real agent, ``python -m agent run --config F --until-drained`` (encoding
from ``--encoding``, everything else default), timed from the relay's first accepted
connection (the agent's TCP connect):

* newest position: until the backend holds the position with the highest seq;
* seals and alarms: until it holds every seal event and every alarm;
* everything: until it holds every seq of every stream (duplicates, if any, are counted);
* bytes on the wire: TCP payload both ways through the relay (MQTT framing included);
* peak RSS of the agent process: the kernel's high-water mark (VmHWM), with psutil's RSS
  samples every 10 ms as a floor where /proc is not there.

Baseline, same run: the link's own time to carry the bytes the agent sent, ``bytes * 8 /
rate + rtt``: what a perfect sender (no framing of its own to spare, no idle gap, no waiting
for acknowledgements) would need for these bytes; the ratio is the agent's own overhead.

Goals: everything within 90 s, the newest position within 5 s.

    python bench/bench_catchup.py [--encoding compact|json] [--hours 24] [--rtt 0.3] [--rate 256000]
"""

from __future__ import annotations

import argparse
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psutil
from _positions import DEVICE, REPO, positions
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from agent.demo.broker import Mosquitto
from agent.model.chain import Chain
from agent.model.reading import Reading
from agent.store.buffer import Store
from agent.tools.watch import DecodeError, decode
from linksim import LinkSim

EVERYTHING_GOAL_S = 90.0
NEWEST_GOAL_S = 5.0
URGENT = ("seal", "alarm")


# -- the backlog ------------------------------------------------------------------------------


def day(n: int) -> Iterator[Reading]:
    """n positions one second apart, and the seal events and alarms of a day at the borders,
    spread evenly over it, each where and when the lorry was."""
    stops = 10  # customs stops: seal opened, alarm raised, sealed again; a geofence around each
    temps = 5  # reefer excursions: active, then cleared 10 minutes later
    events: dict[int, list[tuple[str, dict[str, Any]]]] = {}

    def at(i: int, stream: str, data: dict[str, Any]) -> None:
        events.setdefault(min(max(i, 0), n - 1), []).append((stream, data))

    for k in range(stops):
        i = int((k + 0.5) * n / stops)
        zone = f"customs-{k + 1}"
        seal = {"seal": "container_door", "seal_id": f"CN-44{k:05d}", "source": "eseal"}
        at(i - 300, "alarm", {"kind": "geofence", "state": "enter", "zone": zone, "zone_kind": "customs",
                              "seal_opening": True})
        at(i, "seal", {**seal, "event": "opened", "battery_pct": 90 - k, "zones": [zone], "authorised": True})
        at(i, "alarm", {"kind": "seal_opened", "state": "raised", "severity": "info", **seal, "authorised": True,
                        "zones": [zone]})
        at(i + 600, "seal", {**seal, "event": "sealed", "battery_pct": 90 - k, "zones": [zone], "authorised": True})
        at(i + 900, "alarm", {"kind": "geofence", "state": "exit", "zone": zone, "zone_kind": "customs",
                              "seal_opening": True})
    for k in range(temps):
        i = int((k + 0.3) * n / temps)
        common = {"kind": "temperature", "sensor": "reefer_supply", "side": "high", "limit_c": 8.0}
        at(i, "alarm", {**common, "state": "active", "c": 8.6, "duration_s": 120})
        at(i + 600, "alarm", {**common, "state": "cleared", "c": 7.4, "duration_s": 720, "extreme_c": 9.3})

    for i, pos in enumerate(positions(n)):
        yield pos
        for stream, data in events.get(i, ()):
            fix = {"lat": pos.data["lat"], "lon": pos.data["lon"]}
            if stream == "seal" or data.get("kind") == "seal_opened":
                data = {**data, "position": {**fix, "age_s": 0}}
            elif data.get("kind") == "geofence":
                data = {**data, **fix}
            yield Reading(stream, pos.ts_ms, data, urgent=True)


def fill(path: Path, n: int) -> dict[str, set[int]]:
    store = Store(path, device=DEVICE, chain=Chain(DEVICE))
    store.start()
    for r in day(n):
        store.append(r)
    if not store.flush(timeout=600):
        raise RuntimeError("flush timed out")
    store.close()
    expected: dict[str, set[int]] = {}
    with closing(sqlite3.connect(path)) as db:
        for stream, seq in db.execute("SELECT stream, seq FROM readings"):
            expected.setdefault(stream, set()).add(seq)
    return expected


# -- the backend ------------------------------------------------------------------------------


class Backend:
    """Subscribed before the agent connects; notes when each goal's readings are all in."""

    def __init__(self, port: int, expected: dict[str, set[int]]):
        self.missing = {s: set(seqs) for s, seqs in expected.items()}
        self.newest = ("position", max(expected["position"]))
        self.got_newest: float | None = None
        self.got_urgent: float | None = None
        self.got_all: float | None = None
        self.first_message: float | None = None
        self.readings = self.duplicates = self.messages = self.payload_bytes = 0
        self.errors: list[str] = []
        self._seen: dict[str, set[int]] = {}
        self._lock = threading.Lock()
        subscribed = threading.Event()
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5,
                                  client_id=f"bench-backend-{uuid.uuid4().hex[:6]}")
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe("lorry/#", qos=1)
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        if not subscribed.wait(10):
            raise RuntimeError("backend could not subscribe")

    def _on_message(self, c: mqtt.Client, u: object, msg: mqtt.MQTTMessage) -> None:
        now = time.monotonic()
        topic = msg.topic
        if topic.endswith("/status") or "/cmd" in topic:
            return
        content_type = getattr(msg.properties, "ContentType", None) if msg.properties else None
        try:
            readings = decode(msg.payload, content_type)
        except DecodeError as e:
            self.errors.append(f"{topic}: {e}")
            return
        with self._lock:
            self.messages += 1
            self.payload_bytes += len(msg.payload)
            if self.first_message is None:
                self.first_message = now
            for r in readings:
                stream, seq = r.get("stream"), r.get("seq")
                self.readings += 1
                seen = self._seen.setdefault(stream, set())
                if seq in seen:
                    self.duplicates += 1
                    continue
                seen.add(seq)
                self.missing.get(stream, set()).discard(seq)
                if self.got_newest is None and (stream, seq) == self.newest:
                    self.got_newest = now
            if self.got_urgent is None and not any(self.missing.get(s) for s in URGENT):
                self.got_urgent = now
            if self.got_all is None and not any(self.missing.values()):
                self.got_all = now

    def missing_count(self) -> int:
        with self._lock:
            return sum(map(len, self.missing.values()))

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


# -- the agent --------------------------------------------------------------------------------


class Agent:
    """The agent process, its peak RSS sampled in a thread."""

    def __init__(self, config: Path, log: Path):
        self._log = open(log, "wb")
        self.log_path = log
        self.proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(config), "--until-drained"],
                                     cwd=REPO, stdout=self._log, stderr=self._log)
        self.started = time.monotonic()
        self.ended: float | None = None
        self.peak_rss = 0
        self._ps = psutil.Process(self.proc.pid)
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        status = Path(f"/proc/{self.proc.pid}/status")
        while self.proc.poll() is None:
            try:
                self.peak_rss = max(self.peak_rss, self._ps.memory_info().rss)
                if status.exists():
                    for line in status.read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            self.peak_rss = max(self.peak_rss, int(line.split()[1]) * 1024)
            except (psutil.Error, OSError, ValueError):
                pass
            time.sleep(0.01)
        self.ended = time.monotonic()

    def wait(self, timeout: float) -> int | None:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        self._thread.join(1)
        return rc

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._thread.join(1)
        self._log.close()

    def tail(self, lines: int = 5) -> str:
        return " / ".join(self.log_path.read_text(errors="replace").strip().splitlines()[-lines:])


def fmt_s(t: float | None, t0: float | None, goal: float | None = None) -> str:
    if t is None or t0 is None:
        return "never" + ("   NOT met" if goal is not None else "")
    s = f"{t - t0:8.1f} s"
    if goal is not None:
        s += f"   goal <= {goal:.0f} s: {'met' if t - t0 <= goal else 'NOT met'}"
    return s


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--encoding", choices=("compact", "json"), default="compact")
    ap.add_argument("--hours", type=float, default=24.0, help="backlog length at 1 Hz (default 24)")
    ap.add_argument("--rtt", type=float, default=0.3, help="link round trip, s (default 0.3)")
    ap.add_argument("--rate", type=float, default=256_000, help="link rate each way, bit/s (default 256000)")
    ap.add_argument("--timeout", type=float, default=1200.0, help="give up after this long, s (default 1200)")
    args = ap.parse_args()
    n = int(args.hours * 3600)

    key = f'encoding = "{args.encoding}"\n'

    with tempfile.TemporaryDirectory(prefix="bench-catchup-") as tmp:
        tmp = Path(tmp)
        db = tmp / "state" / "buffer.db"
        expected = fill(db, n)
        total = sum(map(len, expected.values()))
        with Mosquitto(tmp / "broker") as broker, LinkSim(broker.port, rtt_s=args.rtt, rate_bps=args.rate) as link:
            backend = Backend(broker.port, expected)
            conf = tmp / "agent.toml"
            conf.write_text(
                f'[device]\nid = "{DEVICE}"\n[mqtt]\nhost = "127.0.0.1"\nport = {link.port}\n{key}'
                f'[store]\npath = "{db}"\n[log]\nlevel = "warning"\n'
            )
            agent = Agent(conf, tmp / "agent.log")
            try:
                rc = agent.wait(args.timeout)
                # The broker forwards the last messages after acknowledging them.
                deadline = time.monotonic() + 10
                while backend.got_all is None and time.monotonic() < deadline:
                    time.sleep(0.05)
            finally:
                agent.stop()
                backend.close()
            t0 = link.accept_times[0] if link.accept_times else None
            up, down, conns = link.bytes_up, link.bytes_down, link.connections
            with closing(sqlite3.connect(db)) as conn:
                left = conn.execute("SELECT COUNT(*) FROM readings").fetchone()[0]

    counts = ", ".join(f"{len(v):,} {k}" for k, v in sorted(expected.items(), key=lambda kv: -len(kv[1])))
    wire = up + down
    link_s = wire * 8 / args.rate + args.rtt
    print(f"catch-up of a {args.hours:g} h backlog ({counts}) over LinkSim rtt {args.rtt * 1000:.0f} ms, "
          f"{args.rate / 1000:g} kbit/s each way; encoding {args.encoding}; from the agent's first connection")
    if rc is None:
        print(f"  agent still running after {args.timeout:.0f} s: stopped; figures below are what arrived by then")
    elif rc != 0:
        print(f"  agent exited with {rc}: {agent.tail()}")
    if t0 is None:
        print("  the agent never connected")
        return 1
    print(f"  agent start -> connection        {t0 - agent.started:8.1f} s   (interpreter, store open; not counted)")
    print(f"  newest position at the backend   {fmt_s(backend.got_newest, t0, NEWEST_GOAL_S)}")
    print(f"  every seal event and alarm       {fmt_s(backend.got_urgent, t0)}")
    print(f"  {f'everything ({total:,} readings)':33}{fmt_s(backend.got_all, t0, EVERYTHING_GOAL_S)}")
    if agent.ended is not None:
        print(f"  agent process exited             {fmt_s(agent.ended, t0)}")
    print(f"  bytes on the wire                {wire:>10,} B   (up {up:,}, down {down:,}; {conns} connection(s); "
          f"{wire / total:.2f} B/reading; {backend.messages:,} messages, {backend.payload_bytes:,} B payload)")
    print(f"  baseline: the link alone         {link_s:8.1f} s   (bytes on the wire * 8 / rate + rtt)")
    if backend.got_all is not None:
        took = backend.got_all - t0
        print(f"  ratio everything / link alone    {took / link_s:8.2f}x   (the agent's own overhead on this link)")
    print(f"  peak RSS of the agent process    {agent.peak_rss / 2**20:8.1f} MB")
    missing = backend.missing_count()
    if missing or left or backend.duplicates or backend.errors:
        print(f"  missing at the backend {missing:,}; left in the store {left:,}; duplicates {backend.duplicates:,}; "
              f"undecodable messages {len(backend.errors)}" + (f" ({backend.errors[0]})" if backend.errors else ""))
    return 0 if backend.got_all is not None else 1


if __name__ == "__main__":
    sys.exit(main())
