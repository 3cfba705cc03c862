"""Smoke tests of bench/bench_wear.py (issue 14's harness). Not performance assertions: the
figures are read by people, against the goals the bench prints. What is checked is that the
harness measures: the /proc figures and strace's sync calls of a real child process whose
writes and fsyncs are known, the import list of a real ``-X importtime``, and one tiny
end-to-end run (parked, both versions) that prints the table with a number in every cell."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.demo.broker import mosquitto_binary
from support import REPO

sys.path.insert(0, str(REPO / "bench"))

import _wear_proc as kp  # noqa: E402

ROWS = [
    "bytes written to disk per day",
    "the readings' own size (JSON) per day",
    "write amplification",
    "fsyncs per hour",
    "CPU, whole process (% of a core)",
    "context switches per second",
    "store folder growth per day",
    "RSS at the end (peak) MB",
    "start-up to READY=1 (s)",
]
NUMBER = re.compile(r"^(-?[\d,]+(?:\.\d+)?)\s*(?:GB|MB|kB|B|%|×)?(?:\s*\([\d.]+\))?$")

# A child that waits for "go", then makes 32 pages dirty with an fsync after each, burns some
# CPU, and waits for "end": its figures are known in advance.
CHILD = """
import os, sys, time
sys.stdin.readline()
fd = os.open(sys.argv[1], os.O_CREAT | os.O_WRONLY | os.O_APPEND)
for _ in range(32):
    os.write(fd, b"x" * 100)
    os.fsync(fd)
os.close(fd)
t = time.process_time()
while time.process_time() - t < 0.3:
    pass
print("done", flush=True)
sys.stdin.readline()
"""


def number(cell: str) -> float:
    m = NUMBER.match(cell.strip())
    assert m, f"not a number: {cell!r}"
    return float(m.group(1).replace(",", ""))


def need_tools() -> None:
    if shutil.which("strace") is None:
        pytest.fail("strace is not installed: run .ci/setup --tests")
    if mosquitto_binary() is None:
        pytest.fail("mosquitto is not installed: run .ci/setup")


def test_proc_figures_and_sync_calls_of_a_real_child(tmp_path: Path) -> None:
    need_tools()
    synced, _unsynced, _written = kp.write_bytes_check(tmp_path / "check", sys.executable)
    if synced == 0:
        pytest.skip(f"{tmp_path} is on a filesystem that counts no write_bytes (tmpfs)")
    assert synced >= 64 * 4096, f"64 fsynced appends counted {synced} B, not a page each"
    target = tmp_path / "child.dat"
    child = kp.spawn([sys.executable, "-c", CHILD, str(target)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                     text=True)
    assert child.stdin is not None and child.stdout is not None
    try:
        time.sleep(0.3)  # the interpreter has started
        tracer = kp.StraceAttach(kp.need_strace(), child.pid, tmp_path / "strace.txt")
        a = kp.sample(child.pid)
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline() == "done\n"
        b = kp.sample(child.pid)
        calls = tracer.detach()
    finally:
        kp.kill_children()
    assert b.io["write_bytes"] - a.io["write_bytes"] >= 32 * 4096
    assert b.io["wchar"] - a.io["wchar"] >= 3200
    assert 0.25 <= b.cpu_s - a.cpu_s < 5
    switches, ended = kp.ctx_between(a, b)
    assert switches >= 32 and ended == 0  # each fsync waits for the disk
    assert a.rss_kb > 0 and b.hwm_kb >= b.rss_kb and b.threads == 1
    mine = [c for c in calls if c.path == str(target)]
    assert [c.call for c in mine] == ["fsync"] * 32, calls


def test_importtime_finds_the_backend_tools() -> None:
    run = subprocess.run([sys.executable, "-X", "importtime", "-c", "import agent.tools.verify, agent.store.buffer"],
                         cwd=REPO, capture_output=True, text=True, check=True)
    imp = kp.parse_importtime(run.stderr)
    assert "agent.tools.verify" in imp.backend_tools
    assert not any(t.startswith("agent.store") for t in imp.backend_tools)
    assert imp.modules > 20 and imp.total_s > 0


@pytest.mark.slow
def test_tiny_parked_run_prints_the_table_with_numbers(tmp_path: Path) -> None:
    need_tools()
    if subprocess.run(["git", "rev-parse", "--is-inside-work-tree"], cwd=REPO, capture_output=True).returncode:
        pytest.skip("not a git checkout: the bench compares with a git worktree")
    proc = subprocess.run([sys.executable, "bench/bench_wear.py", "--quick", "--scenario", "parked", "--warmup", "0",
                           "--parked-seconds", "3", "--baseline", "HEAD", "--tmp", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    out = proc.stdout
    assert "| figure | parked, no sources: this | baseline | ratio |" in out, out
    rows = {cells[0]: cells[1:] for line in out.splitlines() if line.startswith("| ")
            for cells in [[c.strip() for c in line.strip("|").split("|")]]}
    for label in ROWS:
        assert label in rows, f"row {label!r} missing:\n{out}"
        this, base, ratio = rows[label]
        if label == "write amplification" and rows["the readings' own size (JSON) per day"][:2] == ["0 B", "0 B"]:
            # No reading in a 3 s parked window (health comes every 300 s): nothing to divide by.
            assert this == base == "n/a", rows[label]
            continue
        for cell in (this, base):
            assert math.isfinite(number(cell)), f"{label}: {cell!r}"
        assert ratio == "–" or math.isfinite(number(ratio)), f"{label}: ratio {ratio!r}"
    # Read from the agents' own /proc: an interpreter's memory, some CPU, a start-up time.
    for col in (0, 1):
        assert number(rows["RSS at the end (peak) MB"][col]) > 10, out
        assert number(rows["CPU, whole process (% of a core)"][col]) >= 0, out  # parked, 3 s: may round to 0
        assert 0 < number(rows["start-up to READY=1 (s)"][col]) < 60, out
    assert re.search(r"parked\s+this\s+\d+ in \d+ s", out), out
    assert re.search(r"parked\s+baseline\s+\d+ in \d+ s", out), out
    assert "goals (issue 14), this version:" in out
    assert not list(tmp_path.iterdir()), "the bench left its temp folder behind"
