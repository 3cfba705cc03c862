"""``lorry-agent status``: what a technician needs to see, read from the store file.

Works whether or not the agent is running: the daemon keeps its snapshot in a file in RAM
while it runs under systemd (agent/daemon/snapshot.py), and in the store's ``state`` table at
start and stop (or all the time without a runtime directory); the buffer itself is the truth
about what has not been sent.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from agent.daemon.snapshot import SNAPSHOT_KEY, read_live
from agent.model.reading import iso_ms
from agent.store import peek

# The daemon refreshes its status at least this often while it runs.
STALE_S = 90


def collect(store_path: Path) -> dict[str, Any]:
    if not store_path.exists():
        return {"store": str(store_path), "error": "no store yet (the agent has never run here)"}
    conn = sqlite3.connect(f"file:{store_path}?mode=ro", uri=True, timeout=10)
    try:
        buffers, state = peek.summary(conn, store_path)
    finally:
        conn.close()
    agent: dict[str, Any] = json.loads(state.get(SNAPSHOT_KEY, "null")) or {}
    live = read_live(state)
    if live is not None and _number(live.get("updated")) > _number(agent.get("updated")):
        agent = live
    updated: Any = agent.get("updated")  # the status's wall time (a float), if any
    return {
        "store": str(store_path),
        "agent_running": bool(updated) and not agent.get("stopped") and time.time() - updated < STALE_S,
        "status_updated": _iso(updated),
        "buffer": {
            stream: {
                "depth": b["count"],
                "last_seq": b["last_seq"],
                "oldest_unsent": iso_ms(b["oldest_ts_ms"]) if b["oldest_ts_ms"] is not None else None,
                "oldest_unsent_seq": b["oldest_seq"],
                "time_pending": b["held"],
            }
            for stream, b in buffers.items()
        },
        "last_fix": agent.get("last_fix"),
        "last_publish": _iso(agent.get("uplink", {}).get("last_publish")),
        "uplink": agent.get("uplink"),
        "drivers": agent.get("drivers"),
        "store_health": agent.get("store"),
        "rejected_readings": agent.get("rejected_readings"),
        "reporting": agent.get("reporting"),
        "fix_filter": agent.get("fix_filter"),
        "clock": agent.get("clock"),
        "commands": agent.get("commands"),
    }


def render(s: dict[str, Any]) -> str:
    if "error" in s:
        return f"store: {s['store']}\n{s['error']}"
    lines = [
        f"store: {s['store']}",
        f"agent: {'running' if s['agent_running'] else 'not running'} (status of {s['status_updated'] or 'never'})",
        "buffer:",
    ]
    if not s["buffer"]:
        lines.append("  (no readings yet)")
    for stream, b in s["buffer"].items():
        oldest = f", oldest unsent {b['oldest_unsent']} (seq {b['oldest_unsent_seq']})" if b["depth"] else ""
        pending = f", {b['time_pending']} waiting for a trusted time" if b["time_pending"] else ""
        lines.append(f"  {stream:12s} {b['depth']:8d} unsent, last seq {b['last_seq']}{oldest}{pending}")
    fix = s["last_fix"]
    lines.append(
        "last fix: "
        + (f"{fix['ts']} {fix['lat']:.7f},{fix['lon']:.7f} {fix.get('speed_kmh')} km/h fix={fix.get('fix')}"
           if fix else "none")
    )
    up = s["uplink"] or {}
    lines.append(f"last publish: {s['last_publish'] or 'never'}; connected: {up.get('connected', '?')}"
                 + (f"; last error: {up['last_error']}" if up.get("last_error") else ""))
    if up.get("link"):
        link = up["link"]
        wire = f"; {up['wire_bytes']:,} bytes on the wire" if up.get("wire_bytes") is not None else ""
        lines.append(f"link: {up.get('encoding', 'json')} encoding; round trip {link.get('rtt_ms')} ms, "
                     f"{link.get('rate_kbit_s')} kbit/s; messages up to {link.get('message_bytes')} B{wire}")
    if up.get("data"):
        data = up["data"]
        lines.append(f"profile: {data['profile']} ({data['month']})"
                     + (f"; held: {', '.join(data['held'])}" if data.get("held") else ""))
        for name, p in data["profiles"].items():
            budget = f" of {p['budget_bytes']:,}" if p.get("budget_bytes") else ""
            lines.append(f"  {name:16s} {p['bytes']:,}{budget} bytes this month"
                         + ("  OVER BUDGET" if p["over_budget"] else ""))
    for name, d in (s["drivers"] or {}).items():
        counters = ", ".join(f"{k}={v}" for k, v in d.items() if isinstance(v, int) and not isinstance(v, bool))
        lines.append(f"{name}: {'connected' if d.get('connected') else 'not connected'}; {counters}"
                     + (f"; last error: {d['last_error']}" if d.get("last_error") else ""))
        if d.get("satellites_in_view"):
            sky = ", ".join(f"{k} {v}" for k, v in d["satellites_in_view"].items())
            lines.append(f"  satellites in view: {sky}")
        for label, counts in _refusals(d).items():
            lines.append(f"  {label}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if s.get("reporting"):
        r = s["reporting"]
        lines.append(f"reporting: {r.get('state')}; {r.get('reported')} of {r.get('fixes')} good fixes reported"
                     + (f"; rejected by quality filter: {s['fix_filter']}" if s.get("fix_filter") else ""))
    if s.get("clock"):
        c = s["clock"]
        source = "GPS" if c.get("gps_time") else ("system clock (NTP)" if c.get("system_trusted") else "none yet")
        err = f"; system clock off by {c['system_error_s']:+.1f} s" if c.get("system_error_s") is not None else ""
        lines.append(f"time source: {source}{err}")
    if s.get("commands"):
        c = s["commands"]
        refused = sum((c.get("rejected") or {}).values())
        record = c.get("nonce_record_unusable_at_start")
        lines.append(f"commands: {c.get('accepted', 0)} accepted, {refused} refused"
                     + (f"; nonce record {record} at start: commands signed before it refused" if record else "")
                     + (f"; nonce record write errors {c['nonce_record_write_errors']}"
                        if c.get("nonce_record_write_errors") else ""))
    if s.get("rejected_readings"):
        lines.append(f"rejected readings: {s['rejected_readings']}")
    return "\n".join(lines)


def _refusals(driver: dict[str, Any]) -> dict[str, dict[str, int]]:
    """What a source sent that was not believed (drivers/gps/gnsstime.py, agent/model/ranges.py)."""
    out = {}
    refused = (driver.get("dates") or {}).get("refused") or {}
    if refused:
        out["dates not believed"] = refused
    if driver.get("out_of_range"):
        out["values out of range (published as null)"] = driver["out_of_range"]
    return out


def _iso(wall: float | None) -> str | None:
    return iso_ms(int(wall * 1000)) if wall else None


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else 0.0
