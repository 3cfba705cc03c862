"""Test helpers: a backend that subscribes like the real one, configs, agent processes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.store import peek

REPO = Path(__file__).resolve().parents[1]


class Backend:
    """A persistent-session QoS 1 subscriber to ``lorry/#``: what the tracking backend sees."""

    def __init__(self, port: int, *, topic: str = "lorry/#", tls: dict[str, str] | None = None,
                 client_id: str | None = None, mqtt5: bool = False):
        self.messages: list[tuple[str, bytes, bool]] = []
        self.content_types: dict[bytes, str | None] = {}
        """MQTT 5 content type by payload (None over MQTT 3.1.1)."""
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        # MQTT 5 to see properties (content type); its session outlives a disconnect for an hour.
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id or f"backend-{uuid.uuid4().hex[:8]}",
            clean_session=None if mqtt5 else False,
            protocol=MQTTProtocolVersion.MQTTv5 if mqtt5 else MQTTProtocolVersion.MQTTv311,
        )
        if tls:
            self.client.tls_set(ca_certs=tls["ca"], certfile=tls.get("cert"), keyfile=tls.get("key"))
        self.client.reconnect_delay_set(0.05, 0.5)
        self.topic = topic

        def on_connect(c: mqtt.Client, u: Any, flags: Any, rc: Any, props: Any) -> None:
            c.subscribe(topic, qos=1)

        def on_subscribe(*_a: Any) -> None:
            self._subscribed.set()

        def on_message(c: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
            content_type = getattr(msg.properties, "ContentType", None) if msg.properties else None
            with self._lock:
                self.messages.append((msg.topic, msg.payload, msg.retain))
                self.content_types[msg.payload] = content_type

        self.client.on_connect = on_connect
        self.client.on_subscribe = on_subscribe
        self.client.on_message = on_message
        if mqtt5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 3600
            self.client.connect("127.0.0.1", port, keepalive=5, clean_start=False, properties=props)
        else:
            self.client.connect("127.0.0.1", port, keepalive=5)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise RuntimeError("backend could not subscribe")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()

    def data_messages(self, stream: str | None = None) -> list[tuple[str, Any]]:
        """(topic, decoded JSON) of every reading message, in arrival order."""
        with self._lock:
            msgs = list(self.messages)
        out = []
        for topic, payload, _retain in msgs:
            if topic.endswith("/status"):
                continue
            if stream is None or topic.endswith("/" + stream):
                out.append((topic, json.loads(payload) if payload[:1] in (b"{", b"[") else self.decode(payload)))
        return out

    @staticmethod
    def decode(payload: bytes) -> list[dict[str, Any]]:
        """A message's readings, JSON or compact, as the backend decodes them (agent/tools/watch.py)."""
        from agent.tools.watch import decode

        return decode(payload)

    def readings(self, stream: str | None = None) -> list[dict[str, Any]]:
        """Every reading received, batches flattened, in arrival order."""
        out: list[dict[str, Any]] = []
        for _topic, obj in self.data_messages(stream):
            out.extend(obj if isinstance(obj, list) else [obj])
        return out

    def status_values(self) -> list[tuple[str, bool]]:
        with self._lock:
            return [(p.decode(), r) for t, p, r in self.messages if t.endswith("/status")]


def toml_value(v: Any) -> str:
    import datetime as dt

    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, dt.datetime):
        return v.isoformat()
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return json.dumps(str(v))


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    """Write a TOML config; nested dicts become sub-tables ([mqtt.tls])."""
    lines: list[str] = []

    def emit(name: str, table: dict[str, Any]) -> None:
        lines.append(f"[{name}]")
        subs = []
        for k, v in table.items():
            if isinstance(v, dict):
                subs.append((f"{name}.{k}", v))
            elif v is not None:
                lines.append(f"{k} = {toml_value(v)}")
        for sub_name, sub in subs:
            emit(sub_name, sub)

    for name, table in sections.items():
        if isinstance(table, list):  # [[seals]]: an array of tables
            for item in table:
                lines.append(f"[[{name}]]")
                lines.extend(f"{k} = {toml_value(v)}" for k, v in item.items())
        else:
            emit(name, table)
    path.write_text("\n".join(lines) + "\n")
    return path


def agent_config(tmp: Path, port: int, *, gps: dict[str, Any] | None = None, mqtt_extra: dict[str, Any] | None = None,
                 store_extra: dict[str, Any] | None = None, name: str = "agent.toml",
                 **sections: dict[str, Any]) -> Path:
    cfg: dict[str, dict[str, Any]] = {
        "device": {"id": "CQ-HN-0042"},
        "mqtt": {"host": "127.0.0.1", "port": port, "topic_prefix": "lorry", "reconnect_min_s": 0.2,
                 "reconnect_max_s": 1.0, "keepalive_s": 5, **(mqtt_extra or {})},
        "store": {"path": str(tmp / "state" / "buffer.db"), "sync_interval_s": 0.2, "lazy_sync_s": 0.2,
                  **(store_extra or {})},
        "reporting": {"min_period_s": 0, "min_distance_m": 0, "min_heading_deg": 0},
    }
    if gps is not None:
        cfg["gps"] = gps
    cfg.update(sections)
    return write_config(tmp / name, cfg)


class AgentProcess:
    """``lorry-agent run`` as a separate process, as systemd would run it."""

    def __init__(self, config: Path, *args: str, env: dict[str, str] | None = None):
        self.config = config
        self.log_path = config.with_suffix(f".{uuid.uuid4().hex[:6]}.log")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--config", str(config), *args],
            stdout=subprocess.PIPE if "--dry-run" in args else self._log,
            stderr=self._log,
            env={**os.environ, **(env or {})},
            cwd=REPO,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout: float = 60) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"agent did not exit within {timeout}s; log:\n{self.log()[-4000:]}") from None
        finally:
            self._log.close()

    def terminate(self, timeout: float = 30) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self._log.close()

    def __enter__(self) -> AgentProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.kill()


def last_seqs(db: Path) -> dict[str, int]:
    """Per stream, the last seq the store handed out (the backend must end up with 1..it)."""
    conn = peek.open_ro(db)
    try:
        return peek.last_seqs(conn, db)  # the journal's newest included (agent/store/journal.py)
    finally:
        conn.close()


def store_state(db: Path) -> dict[str, str]:
    """The status values the store holds now, the journal's newest included (agent/store/peek.py)."""
    conn = peek.open_ro(db)
    try:
        return peek.summary(conn, db)[1]
    finally:
        conn.close()


def store_readings(db: Path, stream: str | None = None) -> list[tuple[str, int, str, bool]]:
    """(stream, seq, body, held) of what the store holds now: SQLite's rows and the journal's."""
    conn = peek.open_ro(db)
    try:
        return [r for r in peek.readings(conn, db) if stream is None or r[0] == stream]
    finally:
        conn.close()


@contextlib.contextmanager
def journal_on_a_full_disk(store: Any) -> Iterator[None]:
    """The store's journal file descriptor pointed at /dev/full: every write fails with
    ENOSPC, as on a full card (cap SQLite's file with ``max_page_count`` for a whole full store)."""
    fd = store.journal._fd
    saved = os.dup(fd)
    full = os.open("/dev/full", os.O_WRONLY)
    os.dup2(full, fd)
    os.close(full)
    try:
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


def store_depth(db: Path) -> int:
    import sqlite3

    if not db.exists():
        return 0
    try:
        return peek.depth(db)  # SQLite's rows and the journal's (agent/store/journal.py)
    except sqlite3.OperationalError:
        return 0


def wait_until(predicate: Callable[[], bool], timeout: float = 30, what: str = "condition", *,
               poll_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


DRIVER_STOP_S = 5.0


class Running:
    """A driver's run() in a thread, as the agent runs it; always stopped and joined."""

    def __init__(self, driver: Any) -> None:
        self.driver = driver
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"{driver.kind}-test", daemon=True)

    def _run(self) -> None:
        try:
            self.driver.run(self.stop)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e

    def __enter__(self) -> Running:
        self.thread.start()
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=DRIVER_STOP_S)
        if exc_type is None:  # do not hide the test's own failure
            assert not self.thread.is_alive(), "driver did not stop"
            assert self.error is None, f"driver raised {self.error!r}"

    def join(self, timeout: float = DRIVER_STOP_S) -> None:
        """Wait for a finite driver (a replay) to end by itself."""
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "replay did not finish"
        assert self.error is None, f"driver raised {self.error!r}"


class Collector:
    """An ``emit`` for drivers under test: keeps every reading, thread-safely."""

    def __init__(self) -> None:
        self.readings: list[Any] = []
        self._lock = threading.Lock()

    def __call__(self, reading: Any) -> None:
        with self._lock:
            self.readings.append(reading)

    def snapshot(self) -> list[Any]:
        with self._lock:
            return list(self.readings)

