"""Broker security against real mosquitto processes: mutual TLS, CA and hostname pinning,
username/password, and the retained online/offline status.

The agent always runs as a real process (``lorry-agent run``); what it reports about itself is
read back with ``lorry-agent status --json`` as a technician would.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import certs
from agent.demo import trip
from agent.demo.broker import BrokerTls, Mosquitto, mosquitto_binary
from support import REPO, AgentProcess, Backend, agent_config, store_depth, wait_until

DEVICE = "CQ-HN-0042"


@dataclass(frozen=True)
class Pki:
    ca: certs.Authority
    server: certs.Pair
    client: certs.Pair
    other_ca: certs.Authority
    """A CA that signed nothing the broker uses: pinning it must refuse the broker."""

    def backend_tls(self) -> dict[str, str]:
        return {"ca": str(self.ca.cert), "cert": str(self.client.cert), "key": str(self.client.key)}


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    folder = tmp_path / "pki"
    ca = certs.authority(folder, "ca")
    return Pki(ca=ca, server=ca.server(folder), client=ca.client(folder), other_ca=certs.authority(folder, "other-ca"))


@pytest.fixture
def start_broker(tmp_path: Path) -> Iterator[Any]:
    """Start brokers on free loopback ports; all are stopped at the end of the test."""
    if mosquitto_binary() is None:
        pytest.fail("mosquitto is not installed: run .ci/setup (apt-get install -y mosquitto)")
    started: list[Mosquitto] = []

    def start(name: str, **kwargs: Any) -> Mosquitto:
        b = Mosquitto(tmp_path / name, **kwargs)
        started.append(b)
        return b.start()

    yield start
    for b in started:
        b.stop()


def folder(path: Path) -> Path:
    """One agent's own folder (config, password, store), for tests that run several agents."""
    path.mkdir(parents=True, exist_ok=True)
    return path


def make_trip(tmp: Path) -> tuple[Path, list[trip.TruthFix]]:
    """72 fixes, 5 s apart (6 minutes of driving)."""
    path = tmp / "trip.nmea"
    return path, trip.write(path, interval_s=5, max_hours=0.1)


def status(cfg: Path) -> dict[str, Any] | None:
    """``lorry-agent status --json``; None while the agent has not created its store yet."""
    r = subprocess.run([sys.executable, "-m", "agent", "status", "--config", str(cfg), "--json"],
                       capture_output=True, text=True, cwd=REPO, timeout=30)
    if r.returncode != 0:
        return None
    return json.loads(r.stdout)


def refused_status(cfg: Path, needle: str) -> dict[str, Any]:
    """Wait until the agent reports itself disconnected with an error containing ``needle``."""
    seen: dict[str, Any] = {}

    def check() -> bool:
        s = status(cfg)
        if s is None or not s.get("uplink"):
            return False
        seen["s"] = s
        up = s["uplink"]
        return up["connected"] is False and bool(up["last_error"]) and needle in up["last_error"]

    try:
        wait_until(check, 15, f"status showing a refused uplink ({needle!r})")
    except AssertionError as e:
        raise AssertionError(f"{e}; last status: {json.dumps(seen.get('s'), indent=1)}") from None
    return seen["s"]


def tls_section(ca: Path, client: certs.Pair | None = None, **extra: Any) -> dict[str, Any]:
    t: dict[str, Any] = {"ca_file": str(ca)}
    if client is not None:
        t |= {"cert_file": str(client.cert), "key_file": str(client.key)}
    return t | extra


def seqs(backend: Backend, device: str = DEVICE) -> list[int]:
    """The seq of every position reading the backend got from ``device``, in arrival order."""
    return [r["seq"] for topic, obj in backend.data_messages("position") if topic == f"lorry/{device}/position"
            for r in (obj if isinstance(obj, list) else [obj])]


def assert_every_seq_once(backend: Backend, n: int, device: str = DEVICE) -> None:
    wait_until(lambda: len(seqs(backend, device)) >= n, 10, f"{n} positions from {device} at the backend")
    time.sleep(0.2)  # a duplicate would arrive right behind
    assert sorted(seqs(backend, device)) == list(range(1, n + 1)), "every seq exactly once"


# -- 1. mutual TLS --------------------------------------------------------------------------------


def test_mutual_tls_delivers_every_reading_exactly_once(tmp_path: Path, pki: Pki, start_broker: Any) -> None:
    broker = start_broker("broker",
                          tls=BrokerTls(pki.ca.cert, pki.server.cert, pki.server.key, require_certificate=True))
    backend = Backend(broker.port, tls=pki.backend_tls())
    try:
        capture, truth = make_trip(tmp_path)
        cfg = agent_config(tmp_path, broker.port, gps={"replay": str(capture), "replay_speed": 0},
                           mqtt_extra={"tls": tls_section(pki.ca.cert, pki.client)})
        with AgentProcess(cfg, "--until-drained") as agent:
            assert agent.wait(30) == 0, agent.log()
        assert_every_seq_once(backend, len(truth))
        assert store_depth(tmp_path / "state" / "buffer.db") == 0
        wait_until(lambda: len(backend.status_values()) >= 2, 5, "online and offline")
        assert [v for v, _r in backend.status_values()] == ["online", "offline"]
        s = status(cfg)
        assert s is not None and s["uplink"]["readings_acked"] == len(truth)
        assert s["uplink"]["connects"] == 1 and s["uplink"]["last_error"] is None
    finally:
        backend.close()


# -- 2. TLS refusals: no client certificate, wrong CA, wrong hostname ------------------------------


def test_tls_refused_without_client_certificate_or_with_another_ca(tmp_path: Path, pki: Pki, start_broker: Any) -> None:
    broker = start_broker("broker",
                          tls=BrokerTls(pki.ca.cert, pki.server.cert, pki.server.key, require_certificate=True))
    backend = Backend(broker.port, tls=pki.backend_tls())
    capture, truth = make_trip(tmp_path)
    # Readings keep arriving for ~3.6 s: each store commit also writes the agent's status.
    gps = {"replay": str(capture), "replay_speed": 100}
    no_cert_dir, wrong_ca_dir = folder(tmp_path / "no-cert"), folder(tmp_path / "wrong-ca")
    no_cert = agent_config(no_cert_dir, broker.port, gps=gps,
                           mqtt_extra={"tls": tls_section(pki.ca.cert), "client_id": "agent-no-cert"})
    # Pinned to a CA that did not sign the broker's certificate; its own client cert is fine.
    wrong_ca = agent_config(wrong_ca_dir, broker.port, gps=gps,
                            mqtt_extra={"tls": tls_section(pki.other_ca.cert, pki.client),
                                        "client_id": "agent-wrong-ca"})
    try:
        with AgentProcess(no_cert) as a1, AgentProcess(wrong_ca) as a2:
            s2 = refused_status(wrong_ca, "certificate verify failed")
            # Its wording is timing-dependent (see test_missing_client_certificate_is_named_in_the_status).
            s1 = refused_status(no_cert, "")
            for s in (s1, s2):
                assert s["agent_running"] is True
                assert s["uplink"]["connects"] == 0 and s["uplink"]["readings_acked"] == 0
            # Everything stays in the store; nothing reaches the backend.
            for d in (no_cert_dir, wrong_ca_dir):
                wait_until(lambda d=d: store_depth(d / "state" / "buffer.db") == len(truth), 15,
                           f"{d.name}: all buffered")
            time.sleep(0.5)
            assert a1.proc.poll() is None and a2.proc.poll() is None, "the agents keep running and retrying"
            assert backend.messages == [], "nothing may arrive from a refused agent"
            assert a1.terminate() == 0, a1.log()
            assert a2.terminate() == 0, a2.log()
        for cfg, d in ((no_cert, no_cert_dir), (wrong_ca, wrong_ca_dir)):
            assert store_depth(d / "state" / "buffer.db") == len(truth), "readings kept across the shutdown"
            s = status(cfg)
            assert s is not None
            assert s["buffer"]["position"]["depth"] == len(truth)
            assert s["uplink"]["connected"] is False and s["uplink"]["last_error"]
        assert backend.messages == []
    finally:
        backend.close()


def test_missing_client_certificate_is_named_in_the_status(tmp_path: Path, pki: Pki, start_broker: Any) -> None:
    broker = start_broker("broker",
                          tls=BrokerTls(pki.ca.cert, pki.server.cert, pki.server.key, require_certificate=True))
    capture, _truth = make_trip(tmp_path)
    cfg = agent_config(tmp_path, broker.port, gps={"replay": str(capture), "replay_speed": 100},
                       mqtt_extra={"tls": tls_section(pki.ca.cert)})
    with AgentProcess(cfg):
        s = refused_status(cfg, "")
    assert "certificate" in s["uplink"]["last_error"].lower(), s["uplink"]


def test_tls_hostname_is_checked_unless_explicitly_skipped(tmp_path: Path, pki: Pki, start_broker: Any) -> None:
    # Same CA, but the certificate names another host: reaching it by IP must be refused...
    other_host = pki.ca.server(tmp_path / "pki", "other-host", hosts=("broker.lorry.test",), ips=())
    broker = start_broker("broker",
                          tls=BrokerTls(pki.ca.cert, other_host.cert, other_host.key, require_certificate=True))
    capture, truth = make_trip(tmp_path)
    strict_dir, skip_dir = folder(tmp_path / "strict"), folder(tmp_path / "skip")
    strict = agent_config(strict_dir, broker.port, gps={"replay": str(capture), "replay_speed": 100},
                          mqtt_extra={"tls": tls_section(pki.ca.cert, pki.client), "client_id": "agent-strict"})
    # ...unless the configuration says so (the CA is still pinned).
    skip = agent_config(skip_dir, broker.port, gps={"replay": str(capture), "replay_speed": 0},
                        mqtt_extra={"tls": tls_section(pki.ca.cert, pki.client, insecure_skip_hostname=True),
                                    "client_id": "agent-skip"})
    with AgentProcess(strict) as a1, AgentProcess(skip, "--until-drained") as a2:
        refused_status(strict, "certificate is not valid for '127.0.0.1'")
        assert a2.wait(30) == 0, a2.log()
        wait_until(lambda: store_depth(strict_dir / "state" / "buffer.db") == len(truth), 15, "strict: all buffered")
        assert a1.proc.poll() is None
        assert a1.terminate() == 0, a1.log()
    assert store_depth(strict_dir / "state" / "buffer.db") == len(truth)
    assert store_depth(skip_dir / "state" / "buffer.db") == 0
    s = status(skip)
    assert s is not None and s["uplink"]["readings_acked"] == len(truth)


# -- 3. username / password -----------------------------------------------------------------------


def test_username_password(tmp_path: Path, start_broker: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    passwd = tmp_path / "mosquitto.passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwd), "lorry", "s3cret-pw"], check=True, capture_output=True)
    subprocess.run(["mosquitto_passwd", "-b", str(passwd), "backend", "backend-pw"], check=True, capture_output=True)
    # The helper writes "allow_anonymous true" first; without per_listener_settings these are
    # global options and the later line wins (mosquitto 2.0.11) - checked with an anonymous client.
    broker = start_broker("broker", extra_conf=["allow_anonymous false", f"password_file {passwd}"])
    assert _anonymous_connect_refused(broker.port), "the broker must refuse anonymous clients"
    backend = _backend_with_password(monkeypatch, broker.port, "backend", "backend-pw")
    capture, truth = make_trip(tmp_path)
    good_dir, bad_dir = folder(tmp_path / "good"), folder(tmp_path / "bad")
    (good_dir / "password").write_text("s3cret-pw\n")
    (bad_dir / "password").write_text("wrong-pw\n")
    for d in (good_dir, bad_dir):
        (d / "password").chmod(0o600)  # the agent refuses a secret anyone can read
    good = agent_config(good_dir, broker.port, gps={"replay": str(capture), "replay_speed": 0},
                        mqtt_extra={"username": "lorry", "password_file": str(good_dir / "password")})
    bad = agent_config(bad_dir, broker.port, gps={"replay": str(capture), "replay_speed": 100},
                       mqtt_extra={"username": "lorry", "password_file": "password"},  # relative to the config file
                       device={"id": "CQ-HN-0043"})
    try:
        with AgentProcess(good, "--until-drained") as a1, AgentProcess(bad) as a2:
            assert a1.wait(30) == 0, a1.log()
            assert_every_seq_once(backend, len(truth))
            # The reason it gives is checked in test_refused_credentials_are_named_in_the_status.
            s = refused_status(bad, "")
            assert s["uplink"]["connects"] == 0 and s["uplink"]["readings_acked"] == 0
            wait_until(lambda: store_depth(bad_dir / "state" / "buffer.db") == len(truth), 15, "bad: all buffered")
            time.sleep(1.0)
            assert a2.proc.poll() is None, "a refused agent keeps running"
            assert not [t for t, _p, _r in backend.messages if "/CQ-HN-0043/" in t], "nothing from a refused agent"
            assert store_depth(bad_dir / "state" / "buffer.db") == len(truth)
            # It keeps retrying, and reads the password file at each attempt: fixing it is enough.
            (bad_dir / "password").write_text("s3cret-pw\n")
            assert_every_seq_once(backend, len(truth), "CQ-HN-0043")
            wait_until(lambda: store_depth(bad_dir / "state" / "buffer.db") == 0, 10, "acknowledged rows deleted")
            assert a2.terminate() == 0, a2.log()
    finally:
        backend.close()


def test_refused_credentials_are_named_in_the_status(tmp_path: Path, start_broker: Any) -> None:
    passwd = tmp_path / "mosquitto.passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwd), "lorry", "s3cret-pw"], check=True, capture_output=True)
    broker = start_broker("broker", extra_conf=["allow_anonymous false", f"password_file {passwd}"])
    capture, _truth = make_trip(tmp_path)
    (tmp_path / "password").write_text("wrong-pw\n")
    (tmp_path / "password").chmod(0o600)
    cfg = agent_config(tmp_path, broker.port, gps={"replay": str(capture), "replay_speed": 100},
                       mqtt_extra={"username": "lorry", "password_file": "password"})
    with AgentProcess(cfg):
        s = refused_status(cfg, "")
    assert "Not authorized" in s["uplink"]["last_error"], s["uplink"]


def _anonymous_connect_refused(port: int) -> bool:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    result: list[Any] = []
    c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="anonymous-probe")
    c.on_connect = lambda _c, _u, _f, rc, _p: result.append(rc)
    c.connect("127.0.0.1", port, keepalive=5)
    deadline = time.monotonic() + 5
    while not result and time.monotonic() < deadline:
        if c.loop(0.1) != 0:
            break
    c.disconnect()
    return bool(result) and result[0].is_failure


def _backend_with_password(monkeypatch: pytest.MonkeyPatch, port: int, username: str, password: str) -> Backend:
    """``support.Backend`` logged in: its client gets credentials before its constructor connects."""
    import paho.mqtt.client as mqtt

    class AuthClient(mqtt.Client):
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw)
            self.username_pw_set(username, password)

    with monkeypatch.context() as m:
        m.setattr(mqtt, "Client", AuthClient)
        return Backend(port)


# -- 4. retained status ---------------------------------------------------------------------------


def test_retained_status_online_then_offline(tmp_path: Path, start_broker: Any) -> None:
    broker = start_broker("broker")
    watcher = Backend(broker.port, topic=f"lorry/{DEVICE}/status")
    cfg = agent_config(tmp_path, broker.port)  # no sources: it just stays connected
    try:
        with AgentProcess(cfg) as agent:
            wait_until(lambda: ("online", False) in watcher.status_values(), 15, "agent online")
            late = Backend(broker.port, topic=f"lorry/{DEVICE}/status")
            try:
                wait_until(lambda: late.status_values() == [("online", True)], 5, "retained online")
            finally:
                late.close()
            assert agent.terminate() == 0, agent.log()
        wait_until(lambda: watcher.status_values()[-1] == ("offline", False), 5, "offline at shutdown")
        later = Backend(broker.port, topic=f"lorry/{DEVICE}/status")
        try:
            wait_until(lambda: later.status_values() == [("offline", True)], 5, "retained offline")
            time.sleep(0.3)
            assert later.status_values() == [("offline", True)], "exactly one retained status"
        finally:
            later.close()
    finally:
        watcher.close()
