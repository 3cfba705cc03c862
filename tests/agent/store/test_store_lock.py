"""One agent per store; a store path that is not a database file is refused, never renamed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.demo.broker import Mosquitto
from agent.model.reading import Reading
from agent.store.buffer import Store, StoreUnusable
from agent.store.lock import StoreLocked
from support import REPO, AgentProcess, Backend, agent_config, wait_until


def test_a_second_store_on_the_same_file_is_refused_naming_the_holder(tmp_path: Path) -> None:
    first = Store(tmp_path / "b.db", device="D")
    try:
        with pytest.raises(StoreLocked) as e:
            Store(tmp_path / "b.db", device="D")
        assert str(tmp_path / "b.db") in str(e.value) and f"pid {os.getpid()}" in str(e.value)
    finally:
        first.close()
    Store(tmp_path / "b.db", device="D").close()  # released on close


def test_the_lock_dies_with_its_holder(tmp_path: Path) -> None:
    """A power cut or SIGKILL leaves nothing stale: the kernel drops a dead process's flock."""
    code = (f"from agent.store.buffer import Store; s = Store({str(tmp_path / 'b.db')!r}, device='D'); "
            "print('locked', flush=True); import time; time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, cwd=REPO, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(StoreLocked, match=f"pid {holder.pid}"):
            Store(tmp_path / "b.db", device="D")
    finally:
        holder.kill()
        holder.wait()
    Store(tmp_path / "b.db", device="D").close()


def test_a_folder_as_store_path_is_refused_and_left_alone(tmp_path: Path) -> None:
    folder = tmp_path / "var-lib"
    folder.mkdir()
    (folder / "precious.txt").write_text("keep me")
    with pytest.raises(StoreUnusable, match="is a folder"):
        Store(folder, device="D")
    assert (folder / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["var-lib"], "nothing renamed, nothing created"


def test_an_unreadable_store_is_refused_not_moved_aside(tmp_path: Path) -> None:
    """Only a file SQLite proves damaged is moved aside; a permission problem proves nothing."""
    if os.geteuid() == 0:
        pytest.skip("root reads files whatever their mode")
    db = tmp_path / "b.db"
    s = Store(db, device="D")
    s.append(Reading("seal", 1_790_000_000_000, {"seal": "rear", "event": "opened"}, urgent=True))
    s.close()
    db.chmod(0)
    try:
        with pytest.raises(StoreUnusable):
            Store(db, device="D")
        assert not list(tmp_path.glob("*.corrupt-*"))
    finally:
        db.chmod(0o600)


def test_two_agents_on_one_store_one_runs_the_other_exits_naming_it(tmp_path: Path, broker: Mosquitto) -> None:
    """Before the lock both ran and published the same seq with different content."""
    backend = Backend(broker.port)
    db = tmp_path / "state" / "buffer.db"
    cfg = agent_config(tmp_path, broker.port, health={"interval_s": 0.5}, time={"trust_system_clock": "always"})
    try:
        with AgentProcess(cfg) as first:
            wait_until(lambda: backend.readings("health"), 30, "the first agent publishing")
            second = AgentProcess(cfg)
            code = second.wait(30)
            log = second.log()
            assert code != 0, log
            assert str(db) in log and f"pid {first.proc.pid}" in log, log
            assert "Traceback" not in log, log
            assert first.proc.poll() is None, "the first agent is undisturbed"
            out = subprocess.run([sys.executable, "-m", "agent", "status", "--config", str(cfg), "--json"],
                                 capture_output=True, text=True, cwd=REPO, timeout=30)
            assert out.returncode == 0, out.stderr
            assert json.loads(out.stdout)["agent_running"] is True, "status works while the agent runs"
            wait_until(lambda: len(backend.readings("health")) >= 3, 30, "more health readings")
            assert first.terminate() == 0
        seqs = [r["seq"] for r in backend.readings("health")]
        assert len(seqs) == len(set(seqs)), f"a seq published twice: {seqs}"
    finally:
        backend.close()
