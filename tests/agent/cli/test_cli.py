"""The command line and the daemon's life cycle: dry run, status, SIGTERM, systemd notify."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from agent.demo import trip
from agent.demo.broker import free_port
from support import REPO, AgentProcess, agent_config, store_depth, wait_until


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout)


def test_dry_run_prints_every_message_and_exits(tmp_path: Path) -> None:
    capture = tmp_path / "t.nmea"
    truth = trip.write(capture, interval_s=5, max_hours=0.1)
    cfg = agent_config(tmp_path, free_port(), gps={"replay": str(capture), "replay_speed": 0})
    r = run_cli("run", "--config", str(cfg), "--dry-run")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert lines and all(set(m) == {"topic", "payload"} for m in lines)
    assert {m["topic"] for m in lines} == {"lorry/CQ-HN-0042/position"}
    readings = [x for m in lines for x in (m["payload"] if isinstance(m["payload"], list) else [m["payload"]])]
    assert sorted(r["seq"] for r in readings) == list(range(1, len(truth) + 1))
    assert not (tmp_path / "state" / "buffer.db").exists(), "a dry run never touches the real store"


def test_status_reports_buffer_last_fix_and_counters(tmp_path: Path) -> None:
    capture = tmp_path / "t.nmea"
    text = "".join(trip.nmea_lines(iter(list(trip.drive(5, max_hours=0.05)))))
    good = text.splitlines(keepends=True)
    bad_checksum = good[0][:-4] + ("00" if good[0][-4:-2] != "00" else "11") + "\r\n"
    capture.write_text("garbage\x00\xff line\n" + bad_checksum + text)
    port = free_port()  # nothing listens: the lorry is out of coverage
    cfg = agent_config(tmp_path, port, gps={"replay": str(capture), "replay_speed": 0})
    n = text.count("RMC")
    with AgentProcess(cfg) as agent:
        wait_until(lambda: store_depth(tmp_path / "state" / "buffer.db") == n, 20, "buffered")
        assert agent.terminate() == 0
    r = run_cli("status", "--config", str(cfg), "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["agent_running"] is False
    assert s["buffer"]["position"]["depth"] == n
    assert s["buffer"]["position"]["last_seq"] == n
    assert s["buffer"]["position"]["oldest_unsent"] == "2026-11-20T22:00:00.000Z"
    assert s["last_fix"]["ts"] == f"2026-11-20T22:{(n - 1) * 5 // 60:02d}:{(n - 1) * 5 % 60:02d}.000Z"
    assert s["last_publish"] is None
    assert s["uplink"]["connected"] is False and "refused" in s["uplink"]["last_error"]
    gps = s["drivers"]["gps"]
    assert gps["fixes"] == n and gps["bad_checksum"] == 1 and gps["garbage"] >= 1
    human = run_cli("status", "--config", str(cfg))
    assert human.returncode == 0
    assert f"position {n:>12d} unsent" in human.stdout.replace("  ", " ") or f"{n} unsent" in human.stdout
    assert "last fix: 2026-11-20T22:" in human.stdout and "last publish: never" in human.stdout


def test_status_without_a_store_says_so(tmp_path: Path) -> None:
    cfg = agent_config(tmp_path, free_port())
    r = run_cli("status", "--config", str(cfg))
    assert r.returncode == 1 and "never run" in r.stdout


def test_sigterm_makes_a_final_commit(tmp_path: Path) -> None:
    capture = tmp_path / "t.nmea"
    truth = trip.write(capture, interval_s=5, max_hours=0.2)
    # Readings wait a minute for their group commit; SIGTERM must not wait for that.
    cfg = agent_config(tmp_path, free_port(), gps={"replay": str(capture), "replay_speed": 0},
                       store_extra={"sync_interval_s": 60})
    with AgentProcess(cfg) as agent:
        wait_until(lambda: "running as" in agent.log(), 20, "running")
        time.sleep(2)  # the replay (speed 0) is read long before
        assert store_depth(tmp_path / "state" / "buffer.db") == 0, "nothing on disk before the group commit"
        started = time.monotonic()
        assert agent.terminate() == 0
        assert time.monotonic() - started < 10
        assert "lorry-agent stopped" in agent.log()
    db = tmp_path / "state" / "buffer.db"
    import sqlite3

    conn = sqlite3.connect(db)
    # The stop folded the journal into SQLite (agent/store/fold.py): nothing waits in it.
    assert conn.execute("SELECT COUNT(*), MAX(seq) FROM readings").fetchone() == (len(truth), len(truth))
    assert (tmp_path / "state" / "buffer.db.journal").stat().st_size == 0


def test_systemd_notify_ready_watchdog_and_stopping(tmp_path: Path) -> None:
    sock_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(30)  # generous: CI machines can be busy
    cfg = agent_config(tmp_path, free_port())
    try:
        with AgentProcess(cfg, env={"NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "1000000"}) as agent:
            got: list[str] = []
            while "WATCHDOG=1" not in got:
                got.append(sock.recv(4096).decode())
            assert got[0] == "READY=1"
            agent.proc.terminate()
            while "STOPPING=1" not in got:
                got.append(sock.recv(4096).decode())
            assert agent.wait(20) == 0
    finally:
        sock.close()


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    r = run_cli("demo", "--speed", "20000", "--workdir", str(tmp_path / "demo"), timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "signal lost" in r.stdout and "signal back" in r.stdout
    assert "newest position first" in r.stdout
    assert "demo: OK - the backend has every reading" in r.stdout
    assert "missing seq: 0" in r.stdout


def test_bundled_trip_is_what_the_script_generates(tmp_path: Path) -> None:
    import gzip

    out = tmp_path / "trip.nmea.gz"
    trip.write(out)
    bundled = REPO / "agent" / "demo" / "data" / "trip.nmea.gz"
    assert gzip.decompress(out.read_bytes()) == gzip.decompress(bundled.read_bytes())
    assert os.path.getsize(bundled) < 1_000_000


def test_a_second_agent_on_a_store_exits_1_naming_the_holder_and_status_still_works(tmp_path: Path) -> None:
    from agent.store.lock import StoreLock

    cfg = agent_config(tmp_path, free_port())
    db = tmp_path / "state" / "buffer.db"
    with AgentProcess(cfg) as first:
        wait_until(lambda: db.exists() and store_depth(db) >= 0 and Path(f"{db}.lock").exists(), 20, "the first agent")
        second = run_cli("run", "--config", str(cfg))
        assert second.returncode == 1
        assert f"store {db} is in use by another lorry-agent (pid {first.proc.pid})" in second.stderr
        assert "Traceback" not in second.stderr
        # The running agent keeps the store; status reads it read-only, never taking the lock.
        s = run_cli("status", "--config", str(cfg), "--json")
        assert s.returncode == 0 and json.loads(s.stdout)["store"] == str(db), s.stderr
        assert first.proc.poll() is None, "the first agent runs on"
        assert first.terminate() == 0
    lock = StoreLock(db)
    lock.acquire()  # free again once the first one stopped
    lock.release()


def test_dry_run_ends_with_the_replay_even_beside_a_sensor_faster_than_its_ticks(tmp_path: Path) -> None:
    capture = tmp_path / "t.nmea"
    trip.write(capture, interval_s=60, max_hours=0.3)
    cfg = agent_config(tmp_path, free_port(), gps={"replay": str(capture), "replay_speed": 0},
                       time={"trust_system_clock": "always"},
                       temperature=[{"name": "reefer", "driver": "sim", "interval_s": 0.05,
                                     "profile": [{"at": "2026-11-20T22:00:00Z", "c": 4.0}]}])
    started = time.monotonic()
    r = run_cli("run", "--config", str(cfg), "--dry-run", timeout=60)
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - started < 30
    topics = {json.loads(line)["topic"] for line in r.stdout.splitlines()}
    assert {"lorry/CQ-HN-0042/position", "lorry/CQ-HN-0042/temperature"} <= topics
