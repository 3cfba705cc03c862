"""``lorry-agent demo``: the bundled trip against a private mosquitto, with a dead zone.

The agent replays the Chongqing → Hanoi trip (agent/demo/data/demo.toml) faster than real time. While
the lorry crosses the Guizhou mountains the broker is stopped (signal lost): the buffer fills.
When it is back the backlog drains (the newest position first), and a subscriber in the role of
the backend prints what it receives and checks that no seq is missing.
"""

from __future__ import annotations

import datetime as dt
import json
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent import config as config_mod
from agent.daemon.runner import Agent
from agent.demo import trip
from agent.demo.broker import Mosquitto
from agent.model.geo import haversine_m
from agent.tools.verify import render, verify
from agent.tools.watch import decode

DEMO_CONFIG = Path(__file__).resolve().parent / "data" / "demo.toml"
# The dead zone: from the mountains south of Duyun until Hechi.
OUTAGE_FROM, OUTAGE_TO = "Dushan", "Hechi"


def place_near(lat: float, lon: float) -> str:
    name, *_ = min(trip.ROUTE, key=lambda w: haversine_m(lat, lon, w[1], w[2]))
    return name


def describe_event(r: dict[str, Any]) -> str | None:
    """One line for what customs, the shipper or dispatch would look at."""
    when = f"{r['ts'][5:10]} {r['ts'][11:16]}Z"
    if r["stream"] == "seal":
        where = ", ".join(r.get("zones") or []) or "no authorised zone"
        pos = r.get("position") or {}
        return (f"backend <- SEAL {r['seal']} {r['event'].upper()} at {when} "
                f"({pos.get('lat', '?')}, {pos.get('lon', '?')}; {where})")
    if r["stream"] != "alarm":
        return None
    kind = r.get("kind")
    if kind in ("seal_opened", "seal_cut"):
        verdict = "authorised" if r.get("authorised") else "NOT AUTHORISED"
        return f"backend <- ALARM [{r.get('severity')}] {kind} {r.get('seal')} at {when}: {verdict}"
    if kind == "temperature":
        extra = f", {r['duration_s'] // 60} min, peak {r.get('extreme_c')} C" if r["state"] == "cleared" else \
            f" ({r['c']} C above {r['limit_c']} C for {r['duration_s'] // 60} min)"
        return f"backend <- ALARM cold chain {r['sensor']} excursion {r['state']} at {when}{extra}"
    if kind == "geofence":
        return f"backend <- {r['state']} zone '{r['zone']}' ({r['zone_kind']}) at {when}"
    return f"backend <- ALARM {kind} {r.get('state')} at {when}"


@dataclass
class DemoBackend:
    """Subscribes like the tracking backend and keeps what it needs to report and check."""

    port: int
    prefix: str
    out: TextIO
    seqs: dict[str, set[int]] = field(default_factory=dict)
    duplicates: int = 0
    messages: int = 0
    bytes: int = 0
    json_bytes: int = 0
    """What the same messages would have taken as JSON."""
    last: dict[str, Any] | None = None
    chained: list[dict[str, Any]] = field(default_factory=list)
    _pending: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                  client_id="demo-backend", clean_session=False)
        self.client.reconnect_delay_set(0.1, 1.0)  # type: ignore[arg-type]  # paho says int; it sleeps seconds
        self.client.on_connect = lambda c, *_: c.subscribe(f"{self.prefix}/#", qos=1)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", self.port, keepalive=10)
        self.client.loop_start()

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        stream = msg.topic.rsplit("/", 1)[-1]
        if stream == "status":
            self._note(f"backend <- {msg.topic} = {msg.payload.decode()}")
            return
        readings = decode(msg.payload)  # JSON or compact, as a backend decodes them
        as_json = json.dumps(readings if len(readings) > 1 else readings[0], separators=(",", ":"), ensure_ascii=False)
        with self._lock:
            self.messages += 1
            self.bytes += len(msg.payload)
            self.json_bytes += len(as_json.encode())
            seen = self.seqs.setdefault(stream, set())
            jump = len(readings) == 1 and seen and readings[0]["seq"] > max(seen) + 1
            for r in readings:
                if r["seq"] in seen:
                    self.duplicates += 1
                seen.add(r["seq"])
            self.chained += [r for r in readings if "chain_seq" in r]
            if stream == "position":
                newest = max(readings, key=lambda r: r["seq"])
                if self.last is None or newest["seq"] >= self.last["seq"]:
                    self.last = newest
        for r in readings:
            if (line := describe_event(r)) is not None:
                self._note(line)
        if stream != "position":
            return
        if jump:
            r = readings[0]
            self._note(f"backend <- newest {stream} first: seq {r['seq']} ({r['ts'][5:16]}) near "
                       f"{place_near(r['lat'], r['lon']) if 'lat' in r else '?'}")
        elif len(readings) >= 50:  # the backlog; live traffic is summarised by the progress lines
            a, b = readings[0], readings[-1]
            self._note(f"backend <- batch of {len(readings)} {stream} readings, seq {a['seq']}-{b['seq']} "
                       f"({a['ts'][5:16]} .. {b['ts'][5:16]})")

    def _note(self, line: str) -> None:
        with self._lock:
            self._pending.append(line)

    def drain_notes(self) -> list[str]:
        with self._lock:
            notes, self._pending = self._pending, []
        return notes

    def gaps(self) -> dict[str, int]:
        with self._lock:
            return {s: (max(v) - len(v)) if v else 0 for s, v in self.seqs.items()}


def run_demo(*, speed: float = 1000.0, workdir: Path | None = None, out: TextIO) -> int:
    workdir = workdir or Path(tempfile.mkdtemp(prefix="lorry-demo-"))
    fixes = list(trip.drive())
    outage_from = next(f.ts for f in fixes if f.place == OUTAGE_FROM)
    outage_to = next(f.ts for f in fixes if f.place == OUTAGE_TO)

    def say(line: str) -> None:
        out.write(line + "\n")
        out.flush()

    broker = Mosquitto(workdir / "broker").start()
    base = config_mod.load(DEMO_CONFIG)
    cfg = base.model_copy(update={
        "mqtt": base.mqtt.model_copy(update={"port": broker.port, "reconnect_min_s": 0.5, "reconnect_max_s": 2.0}),
        "store": base.store.model_copy(update={"path": workdir / "buffer.db", "sync_interval_s": 0.2,
                                                       "lazy_sync_s": 0.2}),
        "gps": base.gps.model_copy(update={"replay_speed": speed}) if base.gps else None,
    })
    backend = DemoBackend(broker.port, cfg.mqtt.topic_prefix, out)
    backend.start()
    agent = Agent(cfg, until_drained=True)
    say(f"demo: lorry {cfg.device.id}, Chongqing -> Hanoi, {len(fixes)} GPS fixes replayed at {speed:g}x; "
        f"broker 127.0.0.1:{broker.port}; work folder {workdir}")
    r = cfg.reporting
    say(f"demo: reporting policy: a fix every {r.min_period_s:g} s, {r.min_distance_m:g} m "
        f"or {r.min_heading_deg:g} deg of turn, the track kept within {r.max_deviation_m:g} m, stops and starts always")
    runner = threading.Thread(target=agent.run, name="agent", daemon=True)
    started = time.monotonic()
    runner.start()
    phase = "before"
    last_print = 0.0
    try:
        while runner.is_alive():
            runner.join(0.1)
            fix = agent.last_fix
            sim = dt.datetime.fromtimestamp(fix.ts_ms / 1000, dt.UTC) if fix else None
            if phase == "before" and sim and sim >= outage_from:
                broker.stop()
                phase = "outage"
                say(f"\n=== {sim:%d %b %H:%M}Z near {place_near(fix.data['lat'], fix.data['lon'])}: "
                    "signal lost in the Guizhou mountains (broker unreachable) ===")
            elif phase == "outage" and sim and sim >= outage_to:
                broker.start()
                phase = "after"
                say(f"\n=== {sim:%d %b %H:%M}Z near {place_near(fix.data['lat'], fix.data['lon'])}: "
                    f"signal back; {agent.store.pending()} readings waiting ===")
            for note in backend.drain_notes():
                say("  " + note)
            now = time.monotonic()
            if now - last_print >= 2 and fix:
                last_print = now
                lat, lon = fix.data["lat"], fix.data["lon"]
                got = backend.last
                say(f"{sim:%d %b %H:%M}Z near {place_near(lat, lon):38s} buffer {agent.store.pending():5d}  "
                    f"backend has seq {got['seq'] if got else 0} ({got['ts'][5:16] if got else '-'})")
        time.sleep(0.5)
        for note in backend.drain_notes():
            say("  " + note)
    finally:
        agent.stop()
        runner.join(30)
        backend.stop()
        broker.stop()
    sent = agent.policy.reported
    positions = len(backend.seqs.get("position", ()))
    per_stream = ", ".join(f"{len(v)} {k}" for k, v in sorted(backend.seqs.items()))
    gaps = backend.gaps()
    say(f"\ndemo: {agent.policy.considered} fixes, {sent} reported by the policy; the backend has "
        f"{per_stream} in {backend.messages} messages ({backend.bytes / 1024:.0f} KiB, "
        f"{backend.json_bytes / 1024:.0f} KiB as JSON), "
        f"{backend.duplicates} duplicates, missing seq: {sum(gaps.values())}; "
        f"took {time.monotonic() - started:.0f} s")
    chain = verify(backend.chained)
    say("demo: " + render(chain).replace("\n", "\n      "))
    ok = positions == sent and not any(gaps.values()) and bool(chain) and all(r.ok for r in chain)
    say("demo: OK - the backend has every reading, and the seal/alarm record is intact" if ok
        else "demo: FAILED - readings are missing or the record is broken")
    return 0 if ok else 1
