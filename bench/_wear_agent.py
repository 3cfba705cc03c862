"""bench/bench_wear.py's agent: the versions compared (a snapshot of this tree, a git worktree
of the baseline), ``python -m agent run`` as systemd runs it (``NOTIFY_SOCKET``), and what the
backend receives from it (a subscriber) or what it left in its store."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import tempfile
import threading
import time
from collections import deque
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from _positions import REPO
from _wear_proc import spawn
from paho.mqtt.enums import CallbackAPIVersion

DEVICE = "CQ-HN-0042"


# -- systemd's side of sd_notify ---------------------------------------------------------------


class NotifySocket:
    """What systemd gives a Type=notify service: $NOTIFY_SOCKET. Every message is read at once
    (an unread socket would fill up and block the agent's main loop) and kept with its time."""

    def __init__(self) -> None:
        # In the abstract namespace (``@name``, as systemd allows): no file, and no limit of
        # 108 bytes on the temp folder's path.
        self.address = f"@lorry-bench-wear-{os.getpid()}-{time.monotonic_ns()}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.address[1:])
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="notify", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            now = time.monotonic()
            for line in data.decode(errors="replace").splitlines():
                self.messages.append((now, line))
                if line == "READY=1":
                    self._ready.set()

    def wait_ready(self, timeout: float) -> float | None:
        """When READY=1 came (monotonic), or None."""
        if not self._ready.wait(timeout):
            return None
        return next(t for t, m in self.messages if m == "READY=1")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


# -- the versions compared ---------------------------------------------------------------------


@dataclass
class Version:
    label: str
    tree: Path
    rev: str

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
        env["PYTHONPATH"] = str(self.tree)
        env["PYTHONDONTWRITEBYTECODE"] = "1"  # a run never writes .pyc files (compile() made them)
        return env | extra

    def compile(self, python: str) -> None:
        """Byte-compile the tree once, as an installed package is: no run compiles at start."""
        subprocess.run([python, "-m", "compileall", "-q", "-j", "0", str(self.tree / "agent"),
                        str(self.tree / "drivers")], check=True, capture_output=True)

    def check_imports(self, python: str) -> None:
        """The agent this version's processes import is this tree's, not the installed one."""
        out = subprocess.run([python, "-c", "import agent, drivers; print(agent.__file__); print(drivers.__file__)"],
                             cwd=self.tree, env=self.env(), capture_output=True, text=True, check=True).stdout
        for line in out.split():
            if not Path(line).resolve().is_relative_to(self.tree.resolve()):
                raise SystemExit(f"bench_wear: {self.label} imports {line}, not its tree {self.tree}")


def add_worktree(rev: str, where: Path) -> tuple[Path, str]:
    """``git worktree add --detach`` of ``rev`` (its full hash returned)."""
    full = subprocess.run(["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], cwd=REPO, capture_output=True,
                          text=True)
    if full.returncode != 0:
        raise SystemExit(f"bench_wear: --baseline {rev}: not a commit ({full.stderr.strip()})")
    subprocess.run(["git", "worktree", "add", "--detach", "--quiet", str(where), full.stdout.strip()], cwd=REPO,
                   check=True, capture_output=True)
    return where, full.stdout.strip()


def remove_worktree(where: Path) -> None:
    subprocess.run(["git", "worktree", "remove", "--force", str(where)], cwd=REPO, capture_output=True)
    subprocess.run(["git", "worktree", "prune"], cwd=REPO, capture_output=True)


def snapshot_tree(where: Path) -> Path:
    """The working tree's agent/ and drivers/ as they are now: a run is not changed half-way by
    someone saving a file."""
    for pkg in ("agent", "drivers"):
        shutil.copytree(REPO / pkg, where / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    return where


def describe_tree() -> str:
    """HEAD of the working tree, and whether files differ from it."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "agent", "drivers"],
                           cwd=REPO, capture_output=True, text=True).stdout.strip()
    return f"{head.stdout.strip()}{' + uncommitted changes in agent/ or drivers/' if dirty else ''}"


class AgentRun:
    """``python -m agent run --config F`` of one version, as systemd runs it (Type=notify,
    WatchdogSec=30, RuntimeDirectory= in RAM: a folder under /dev/shm). stdout and stderr
    (journald's share, not the agent's disk writes) go to a pipe that is counted."""

    def __init__(self, version: Version, config: Path, workdir: Path, python: str, *,
                 python_args: tuple[str, ...] = (), keep_log: bool = False):
        self.workdir = workdir
        self.full_log: list[str] | None = [] if keep_log else None
        self.notify = NotifySocket()
        self.log_bytes = 0
        self.log_tail: deque[str] = deque(maxlen=60)
        self._log_file = open(workdir / f"agent-{time.monotonic_ns() % 10**9}.log", "w")
        ram = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.runtime = tempfile.mkdtemp(prefix="lorry-bench-run-", dir=ram)
        self.t_start = time.monotonic()
        self.proc = spawn([python, *python_args, "-m", "agent", "run", "--config", str(config)], cwd=version.tree,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          env=version.env(NOTIFY_SOCKET=self.notify.address, WATCHDOG_USEC="30000000",
                                          RUNTIME_DIRECTORY=self.runtime))
        self.pid = self.proc.pid
        self._drain = threading.Thread(target=self._read_log, name="agent-log", daemon=True)
        self._drain.start()

    def _read_log(self) -> None:
        assert self.proc.stdout is not None
        for line in iter(self.proc.stdout.readline, b""):
            self.log_bytes += len(line)
            text = line.decode(errors="replace").rstrip()
            self.log_tail.append(text)
            self._log_file.write(text + "\n")
            if self.full_log is not None:
                self.full_log.append(text)
        self._log_file.close()

    def log(self) -> str:
        return "\n".join(self.log_tail)

    def wait_ready(self, timeout: float = 120) -> float:
        """Seconds from the start of the process to READY=1."""
        t = self.notify.wait_ready(timeout)
        if t is None:
            raise RuntimeError(f"the agent sent no READY=1 within {timeout:.0f} s "
                               f"(exit {self.proc.poll()}):\n{self.log()}")
        return t - self.t_start

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, as systemd stops it; SIGKILL after ``timeout``."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._drain.join(5)
        self.notify.close()
        shutil.rmtree(self.runtime, ignore_errors=True)
        return self.proc.returncode



# -- what the backend receives -----------------------------------------------------------------


@dataclass
class Received:
    wall: float
    stream: str
    readings: int
    json_bytes: int


CBOR_MAGIC = b"\xd9\xd9\xf7"


def json_size(payload: bytes) -> tuple[int, int]:
    """(readings, bytes of their JSON objects) in one message: a lone reading's payload is its
    object, a batch ``[o1,o2,…]``; compact (CBOR) batches are decoded and each reading counted
    as the JSON object it stands for."""
    if payload.startswith(CBOR_MAGIC):
        from agent.tools.watch.decoding import decode  # the backend's decoder (agent/tools/watch)

        readings = decode(payload)
        return len(readings), sum(len(json.dumps(r, separators=(",", ":"), ensure_ascii=False).encode())
                                  for r in readings)
    if payload.startswith(b"["):
        n = len(json.loads(payload))
        return n, len(payload) - 1 - n  # brackets and the commas between
    return 1, len(payload)


class Subscriber:
    """A QoS 1 subscriber to ``lorry/#`` that notes when each reading message arrived and what
    it holds (status messages are not readings: left out)."""

    def __init__(self, port: int):
        self.received: list[Received] = []
        self._lock = threading.Lock()
        ready = threading.Event()
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                  client_id=f"bench-wear-{os.getpid()}-{time.monotonic_ns() % 10**9}")
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe("lorry/#", qos=1)
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        if not ready.wait(10):
            self.close()
            raise RuntimeError("the bench's subscriber could not subscribe")

    def _on_message(self, c: mqtt.Client, u: object, msg: mqtt.MQTTMessage) -> None:
        parts = msg.topic.split("/")
        if len(parts) != 3 or parts[2] == "status":
            return
        now = time.time()
        try:
            n, size = json_size(msg.payload)
        except Exception:  # noqa: BLE001 - an undecodable payload is counted as it is
            n, size = 1, len(msg.payload)
        with self._lock:
            self.received.append(Received(now, parts[2], n, size))

    def between(self, t0: float, t1: float) -> tuple[int, int]:
        with self._lock:
            got = [r for r in self.received if t0 <= r.wall < t1]
        return sum(r.readings for r in got), sum(r.json_bytes for r in got)

    def first(self, stream: str, after: float) -> float | None:
        with self._lock:
            return next((r.wall for r in self.received if r.stream == stream and r.wall >= after), None)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def stored_between(state: Path, db_name: str, t0_ms: int, t1_ms: int) -> tuple[int, int] | str:
    """(readings, bytes of their JSON bodies) the store holds with ``stored_ms`` in [t0, t1):
    what the agent committed in the window while nothing could be sent. Read from a copy, after
    the agent stopped; a string says why it could not be counted."""
    copy = state.parent / (state.name + "-inspect")
    shutil.rmtree(copy, ignore_errors=True)
    copy.mkdir()
    for suffix in ("", "-wal"):
        src = state / f"{db_name}{suffix}"
        if src.exists():
            shutil.copyfile(src, copy / f"{db_name}{suffix}")
    try:
        with closing(sqlite3.connect(copy / db_name)) as conn:
            n, size = conn.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(CAST(body AS BLOB))), 0) FROM readings "
                                   "WHERE stored_ms >= ? AND stored_ms < ?", (t0_ms, t1_ms)).fetchone()
            return n, size
    except sqlite3.Error as e:
        return f"store not countable ({e})"
    finally:
        shutil.rmtree(copy, ignore_errors=True)

