"""Bytes on the wire per position: what a backlog of 1 Hz positions costs on a metered link.

Setup (untimed): a store is filled with N realistic positions (bench/_positions.py: a lorry
moving at ~68 km/h, one fix a second; ``fill`` of bench_drain.py) and copied once per
encoding; a private mosquitto runs on loopback.

Project figure: the real agent, ``python -m agent run --config F --until-drained`` (no [gps]
section, so it exits once the store is empty), connects to the broker through
``linksim.LinkSim`` (no delay, no rate limit: only a counter). Every byte the relay
carries both ways is counted: TCP payload, so MQTT framing, CONNECT, the retained status
messages, topics, PUBACKs and keepalives are all in; TCP/IP headers are not (they depend on
segmenting, which loopback does not model). Divided by the positions delivered (the store is
checked empty afterwards). Once for ``[mqtt] encoding = "json"``, once for ``"compact"``; if
the config does not accept ``compact`` yet, that line says so. A subscriber on the broker
itself (not through the relay, so it adds nothing to the count) checks what the compact run
really sent: a compact payload starts with CBOR's self-describe tag ``d9 d9 f7``.

Baseline, computed: Teltonika Codec 8 over TCP, the de-facto standard of vehicle trackers,
for GPS-only records: an AVL record is 8 timestamp + 1 priority + 15 GPS element (lon, lat
4 each at 1e-7 degrees, altitude 2, angle 2, satellites 1, speed 2) + 6 IO element header with
no IO = 30 bytes; a packet adds 4 preamble + 4 data length + 1 codec id + 1 + 1 record counts
+ 4 CRC = 15 bytes, and the server acknowledges each packet with 4 bytes; 50 records a
packet. (The IMEI login once per connection is left out; it is ~1 B per 1,000 positions.)
Codec 8 carries less than a position reading: no HDOP, no fix kind, speed in whole km/h,
course in whole degrees; it is the bar a compact encoding is read against, not a twin.

Goal: compact <= 15 B/position on the wire.

    python bench/bench_wire.py [--count 20000]
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
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from _positions import DEVICE, REPO
from bench_drain import copy_db, fill
from paho.mqtt.enums import CallbackAPIVersion

from agent.demo.broker import Mosquitto
from linksim import LinkSim

GOAL_B = 15.0
TIMEOUT_S = 600.0
CBOR_MAGIC = b"\xd9\xd9\xf7"

# Teltonika Codec 8, GPS-only AVL records
T8_RECORD = 8 + 1 + 15 + 6
T8_PACKET = 4 + 4 + 1 + 1 + 1 + 4
T8_ACK = 4
T8_PER_PACKET = 50


def codec8_bytes_per_position(per_packet: int = T8_PER_PACKET) -> float:
    return (per_packet * T8_RECORD + T8_PACKET + T8_ACK) / per_packet


class Sniffer:
    """Subscribed to the broker directly: counts data messages and compact-looking payloads."""

    def __init__(self, port: int):
        self.messages = self.compact = 0
        ready = threading.Event()
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                  client_id=f"bench-wire-{uuid.uuid4().hex[:6]}")
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe("lorry/+/+", qos=0)
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not ready.wait(10):
            raise RuntimeError("sniffer could not subscribe")

    def _on_message(self, c: mqtt.Client, u: object, msg: mqtt.MQTTMessage) -> None:
        if msg.topic.endswith("/status"):
            return
        self.messages += 1
        self.compact += msg.payload.startswith(CBOR_MAGIC)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@dataclass
class Run:
    encoding: str
    up: int = 0
    down: int = 0
    wall_s: float = 0.0
    connections: int = 0
    messages: int = 0
    compact_messages: int = 0
    error: str | None = None

    @property
    def total(self) -> int:
        return self.up + self.down


def run_agent(encoding: str, broker: Mosquitto, db: Path, workdir: Path, n: int) -> Run:
    run = Run(encoding)
    key = f'encoding = "{encoding}"\n'
    sniffer = Sniffer(broker.port)
    with LinkSim(broker.port) as link:
        conf = workdir / f"agent-{encoding}.toml"
        conf.write_text(
            f'[device]\nid = "{DEVICE}"\n[mqtt]\nhost = "127.0.0.1"\nport = {link.port}\n{key}'
            f'[store]\npath = "{db}"\n[log]\nlevel = "warning"\n'
        )
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "agent", "run", "--config", str(conf), "--until-drained"],
                              cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S)
        run.wall_s = time.perf_counter() - t0
        time.sleep(0.2)  # the last bytes (DISCONNECT, FIN) through the relay
        run.up, run.down, run.connections = link.bytes_up, link.bytes_down, link.connections
    time.sleep(0.3)
    sniffer.close()
    run.messages, run.compact_messages = sniffer.messages, sniffer.compact
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        run.error = f"agent exited with {proc.returncode}: " + " / ".join(tail)
        return run
    with closing(sqlite3.connect(db)) as conn:
        left = conn.execute("SELECT COUNT(*) FROM readings").fetchone()[0]
    if left:
        run.error = f"agent exited with {left} of {n} readings still in the store"
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=20_000)
    n = ap.parse_args().count

    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="bench-wire-") as tmp:
        tmp = Path(tmp)
        fill(tmp / "filled.db", n)
        with closing(sqlite3.connect(tmp / "filled.db")) as db:
            body_bytes = db.execute("SELECT SUM(LENGTH(CAST(body AS BLOB))) FROM readings").fetchone()[0]
        with Mosquitto(tmp / "broker") as broker:
            for encoding in ("json", "compact"):
                copy_db(tmp / "filled.db", tmp / f"{encoding}.db")
                runs.append(run_agent(encoding, broker, tmp / f"{encoding}.db", tmp, n))

    t8 = codec8_bytes_per_position()
    print(f"bytes on the wire per position: {n:,} positions at 1 Hz (JSON body ~{body_bytes / n:.0f} B each), "
          "QoS 1, `python -m agent run --until-drained` through LinkSim to a local mosquitto")
    print("  (TCP payload both ways: MQTT framing, CONNECT, status, PUBACKs included; TCP/IP headers not)")
    print(f"  {'':34}{'up B':>11}{'down B':>9}{'msgs':>7}{'B/position':>12}{'vs Codec 8':>12}")
    per: dict[str, float] = {}
    for r in runs:
        label = f'agent, encoding = "{r.encoding}"'
        if r.error:
            print(f"  {label:34}{r.error}")
            continue
        per[r.encoding] = r.total / n
        print(f"  {label:34}{r.up:>11,}{r.down:>9,}{r.messages:>7,}{per[r.encoding]:>12.2f}"
              f"{per[r.encoding] / t8:>11.2f}x   ({r.wall_s:.1f} s, {r.connections} connection(s))")
        if r.encoding == "compact" and r.messages and r.compact_messages < r.messages:
            print(f"  {'':34}only {r.compact_messages:,} of {r.messages:,} messages were compact "
                  "(the uplink did not encode them all compact)")
    print(f"  {'baseline Teltonika Codec 8':34}{'':27}{t8:>12.2f}{1:>11.2f}x   "
          f"(GPS-only records {T8_RECORD} B, {T8_PER_PACKET}/packet + {T8_PACKET} B packet + {T8_ACK} B ack)")
    if "json" in per and "compact" in per:
        print(f"  {'compact / json':34}{'':27}{per['compact'] / per['json']:>12.3f}")
    if "compact" in per:
        verdict = "met" if per["compact"] <= GOAL_B else "NOT met"
        print(f"  goal compact <= {GOAL_B:.0f} B/position: {verdict} ({per['compact']:.2f})")
    else:
        print(f"  goal compact <= {GOAL_B:.0f} B/position: not measured (the compact run failed)")


if __name__ == "__main__":
    main()
