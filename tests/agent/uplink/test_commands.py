"""The remote command channel: authentication, replay protection, the commands themselves;
and the broker ACL that confines each device to its own topics."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.demo import trip
from agent.demo.broker import Mosquitto
from agent.model.clock import TimeKeeper
from agent.model.reading import iso_ms
from agent.uplink.commands import CommandHandler, sign_command
from support import REPO, AgentProcess, Backend, agent_config, wait_until

REPO_DOCS = Path(__file__).resolve().parents[3] / "docs"
KEY = b"command-key-for-CQ-HN-0042-0123456789"
NOW = 1_795_000_000_000


def clock(now_ms: int | None = NOW) -> TimeKeeper:
    k = TimeKeeper(trust_system_clock="never", mono_ns=lambda: 10**12)
    if now_ms is not None:
        k.observe_gps(now_ms, 10**12)
    return k


def command(cmd: str, *, ts: int = NOW, nonce: str | None = None, key: bytes = KEY, **args) -> bytes:
    body = {"id": f"c-{cmd}-{secrets.token_hex(3)}", "cmd": cmd, "args": args, "ts": iso_ms(ts),
            "nonce": nonce or secrets.token_hex(8)}
    return json.dumps(sign_command(key, body)).encode()


def handler(now_ms: int | None = NOW) -> CommandHandler:
    return CommandHandler("CQ-HN-0042", KEY, clock(now_ms), {"ping": lambda a: {"pong": True}}, window_s=300)


def test_a_signed_fresh_command_runs_and_the_reply_is_signed() -> None:
    reply = handler().handle(command("ping"))
    assert reply["ok"] is True and reply["result"] == {"pong": True} and reply["id"].startswith("c-ping-")
    assert sign_command(KEY, reply) == reply, "the reply carries a valid HMAC"


@pytest.mark.parametrize(("payload", "reason"), [
    (command("ping", key=b"someone-else's-key-000000"), "authentication failed"),
    (command("ping", ts=NOW - 301_000), "outside the time window"),
    (command("ping", ts=NOW + 301_000), "outside the time window"),
    (command("reboot"), "unknown command 'reboot'"),
    (b"{not json", "malformed"),
    (b"[1, 2]", "not a JSON object"),
    (json.dumps({"id": "x", "cmd": "ping"}).encode(), "not signed"),
])
def test_bad_commands_are_refused_with_a_reason(payload: bytes, reason: str) -> None:
    reply = handler().handle(payload)
    assert reply["ok"] is False and reply["error"].startswith(reason)


def test_a_replayed_command_is_refused() -> None:
    h = handler()
    once = command("ping", nonce="fixed-nonce-1234")
    assert h.handle(once)["ok"] is True
    assert h.handle(once)["error"] == "replayed: this nonce was already used"


def test_without_a_trusted_time_commands_are_refused() -> None:
    reply = handler(None).handle(command("ping"))
    assert reply["ok"] is False and "no trusted time" in reply["error"]


class Operator:
    """The backend side: sends signed commands, collects replies."""

    def __init__(self, port: int, device: str = "CQ-HN-0042", **auth: str):
        self.replies: list[dict] = []
        self.topic = f"lorry/{device}/cmd"
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                  client_id=f"op-{secrets.token_hex(3)}")
        if auth:
            self.client.username_pw_set(auth["username"], auth["password"])
        ready = threading.Event()
        self.client.on_connect = lambda c, *_: c.subscribe(self.topic + "/reply", qos=1)
        self.client.on_subscribe = lambda *_: ready.set()
        self.client.on_message = lambda c, u, m: self.replies.append(json.loads(m.payload))
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert ready.wait(10)

    def send(self, cmd: str, now_ms: int, **args) -> dict:
        payload = command(cmd, ts=now_ms, **args)
        want = json.loads(payload)["id"]
        self.client.publish(self.topic, payload, qos=1)
        wait_until(lambda: any(r["id"] == want for r in self.replies), 15, f"reply to {cmd}")
        return [r for r in self.replies if r["id"] == want][-1]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_commands_end_to_end(tmp_path: Path, broker: Mosquitto, backend: Backend) -> None:
    key = tmp_path / "command.key"
    key.write_bytes(KEY)
    key.chmod(0o600)
    capture = tmp_path / "t.nmea"
    fixes = trip.write(capture, interval_s=5, max_hours=0.05)
    cfg = agent_config(tmp_path, broker.port, gps={"replay": str(capture), "replay_speed": 0},
                       commands={"key_file": str(key)})
    with AgentProcess(cfg) as agent:
        wait_until(lambda: len(backend.readings("position")) >= len(fixes), 30, "trip delivered")
        gps_now = int(fixes[-1].ts.timestamp() * 1000)  # the device's trusted time follows the GPS
        op = Operator(broker.port)
        try:
            ping = op.send("ping", gps_now)
            assert ping["ok"] and ping["result"]["pong"] is True
            before = len(backend.readings("position"))
            pos = op.send("position", gps_now)
            assert pos["ok"] and pos["result"]["event"] == "requested"
            wait_until(lambda: len(backend.readings("position")) == before + 1, 10, "the requested position")
            assert backend.readings("position")[-1]["event"] == "requested"
            parked = op.send("set_profile", gps_now, profile="parked")
            assert parked["ok"] and parked["result"]["state"] == "parked"
            assert op.send("flush", gps_now)["result"]["durable"] is True
            stale = op.send("ping", gps_now - 3_600_000)
            assert not stale["ok"] and "outside the time window" in stale["error"]
            assert agent.proc.poll() is None
        finally:
            op.close()
        agent.terminate()


ACL = (REPO_DOCS / "mosquitto.acl").read_text()


def test_broker_acl_confines_each_device_to_its_own_topics(tmp_path: Path) -> None:
    passwd = tmp_path / "passwd"
    for user in ("CQ-HN-0042", "CQ-HN-0043", "backend"):
        create = ["-c"] if user == "CQ-HN-0042" else []
        subprocess.run(["mosquitto_passwd", "-b", *create, str(passwd), user, f"{user}-pw"],
                       check=True, capture_output=True)
    acl = tmp_path / "acl"
    acl.write_text(ACL)
    broker = Mosquitto(tmp_path / "broker", extra_conf=["allow_anonymous false", f"password_file {passwd}",
                                                        f"acl_file {acl}"]).start()
    try:
        seen: list[str] = []
        spy = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="backend-spy")
        spy.username_pw_set("backend", "backend-pw")
        spy.on_connect = lambda c, *_: c.subscribe("lorry/#", qos=1)
        spy.on_message = lambda c, u, m: seen.append(m.topic)
        spy.connect("127.0.0.1", broker.port)
        spy.loop_start()
        time.sleep(0.5)
        device = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="CQ-HN-0042")
        device.username_pw_set("CQ-HN-0042", "CQ-HN-0042-pw")
        cmds: list[str] = []
        device.on_message = lambda c, u, m: cmds.append(m.topic)
        device.connect("127.0.0.1", broker.port)
        device.loop_start()
        device.subscribe("lorry/CQ-HN-0043/cmd", qos=1)  # another lorry's commands: denied
        device.subscribe("lorry/CQ-HN-0042/cmd", qos=1)
        time.sleep(0.5)
        device.publish("lorry/CQ-HN-0042/position", b"{}", qos=1).wait_for_publish(5)
        spy.publish("lorry/CQ-HN-0042/cmd", b"{}", qos=1).wait_for_publish(5)
        spy.publish("lorry/CQ-HN-0043/cmd", b"{}", qos=1).wait_for_publish(5)
        wait_until(lambda: cmds == ["lorry/CQ-HN-0042/cmd"], 5, "its own command")
        time.sleep(0.5)
        assert cmds == ["lorry/CQ-HN-0042/cmd"], "reads its own commands and no one else's"
        # Denied publishes. (mosquitto 2.0.11 answers them with an MQTT 5 reason code that a
        # 3.1.1 client takes for a broken connection: docs/commands.md.)
        for topic in ("lorry/CQ-HN-0043/position", "lorry/CQ-HN-0042/cmd", "fleet/other/position"):
            device.publish(topic, b"{}", qos=1)
            time.sleep(0.3)
        time.sleep(1.0)
        assert "lorry/CQ-HN-0042/position" in seen
        assert "lorry/CQ-HN-0043/position" not in seen, "may not write as another lorry"
        assert seen.count("lorry/CQ-HN-0042/cmd") == 1, "may not write its own commands (only the backend)"
        assert "fleet/other/position" not in seen
        for c in (device, spy):
            c.loop_stop()
            c.disconnect()
    finally:
        broker.stop()


# -- replays across restarts: the nonce record (<store>.commands) --------------------------------


class Clock:
    """A trusted clock whose time moves only when the test says so."""

    def __init__(self, now_ms: int = NOW):
        self.mono = 10**12
        self.keeper = TimeKeeper(trust_system_clock="never", mono_ns=lambda: self.mono)
        self.keeper.observe_gps(now_ms, self.mono)

    def advance(self, seconds: float) -> None:
        self.mono += int(seconds * 1e9)

    @property
    def now_ms(self) -> int:
        return self.keeper.stamp().ts_ms


def agent_handler(record: Path, clock: Clock, ran: list[str] | None = None) -> CommandHandler:
    """A handler as the agent builds it at start (one per run), on the same record file."""
    def ping(_args: dict) -> dict:
        if ran is not None:
            ran.append("ping")
        return {"pong": True}

    return CommandHandler("CQ-HN-0042", KEY, clock.keeper, {"ping": ping}, window_s=300, state_path=record)


def test_a_command_replayed_after_a_restart_is_refused(tmp_path: Path) -> None:
    record = tmp_path / "buffer.db.commands"
    clock = Clock()
    captured = command("ping", ts=clock.now_ms, nonce="captured-0001")
    assert agent_handler(record, clock).handle(captured)["ok"] is True
    clock.advance(20)  # the agent restarts 20 s later: well inside the 300 s window
    again = agent_handler(record, clock)
    assert again.handle(captured)["error"] == "replayed: this nonce was already used"
    assert again.handle(command("ping", ts=clock.now_ms))["ok"] is True, "fresh commands still run"


DAMAGE = {
    "deleted": None,
    "empty": b"",
    "garbage": bytes(range(256)) * 4,
    "truncated": "take the first half",
    "bit flip in a nonce": "flip",
    "wrong types": b'{"version":1,"floor":"x","nonces":[1,2],"sha256":"0"}',
    "nested": b"[" * 200_000,
}


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_a_replay_after_the_record_is_lost_or_damaged_is_refused(tmp_path: Path, damage: str) -> None:
    """A power cut or a failing card may take the record: a command signed before this start
    cannot be told from a replay and is refused; one signed after it runs."""
    record = tmp_path / "buffer.db.commands"
    clock = Clock()
    captured = command("ping", ts=clock.now_ms, nonce="captured-0002")
    assert agent_handler(record, clock).handle(captured)["ok"] is True
    text = record.read_bytes()
    assert b"captured-0002" in text
    how = DAMAGE[damage]
    if how is None:
        record.unlink()
    elif how == "take the first half":
        record.write_bytes(text[: len(text) // 2])
    elif how == "flip":
        record.write_bytes(text.replace(b"captured-0002", b"captured-0003"))
    else:
        record.write_bytes(how)
    clock.advance(5)
    ran: list[str] = []
    restarted = agent_handler(record, clock, ran)
    refused = restarted.handle(captured)
    assert refused["ok"] is False and refused["error"].startswith("replayed? signed before the agent started")
    assert ran == []
    clock.advance(1)
    fresh = command("ping", ts=clock.now_ms)
    assert restarted.handle(fresh)["ok"] is True and ran == ["ping"]
    # And after one more restart (the record is sound again, and keeps the start as its floor):
    clock.advance(5)
    third = agent_handler(record, clock, ran)
    assert third.handle(captured)["ok"] is False, "the command captured before the loss still cannot replay"
    assert third.handle(fresh)["error"] == "replayed: this nonce was already used"
    assert ran == ["ping"]


def test_the_nonce_is_on_disk_and_fsynced_before_the_action_runs(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from agent.model import durablefile  # the record is written through it

    record = tmp_path / "buffer.db.commands"
    events: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(durablefile.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])

    def ping(_args: dict) -> dict:
        events.append("action")
        assert b"on-disk-nonce-1" in record.read_bytes(), "the nonce is in the record before the action"
        return {"pong": True}

    clock = Clock()
    h = CommandHandler("CQ-HN-0042", KEY, clock.keeper, {"ping": ping}, window_s=300, state_path=record)
    assert h.handle(command("ping", ts=clock.now_ms, nonce="on-disk-nonce-1"))["ok"] is True
    assert events == ["fsync", "fsync", "action"], "file and folder fsynced, then the action"


def test_a_command_whose_nonce_cannot_be_recorded_does_not_run(tmp_path: Path) -> None:
    (tmp_path / "not-a-folder").write_text("")
    ran: list[str] = []
    h = agent_handler(tmp_path / "not-a-folder" / "buffer.db.commands", Clock(), ran)
    reply = h.handle(command("ping"))
    assert reply["ok"] is False and reply["error"].startswith("cannot record the nonce")
    assert ran == []


def test_the_record_stays_bounded(tmp_path: Path) -> None:
    record = tmp_path / "buffer.db.commands"
    clock = Clock()
    h = agent_handler(record, clock)
    for _ in range(120):  # a command every 10 s for 20 minutes: only the last 300 s are kept
        assert h.handle(command("ping", ts=clock.now_ms))["ok"] is True
        clock.advance(10)
    kept = json.loads(record.read_text())["nonces"]
    assert 29 <= len(kept) <= 31
    burst = [h.handle(command("ping", ts=clock.now_ms)) for _ in range(1_100)]
    assert sum(r["ok"] for r in burst) + len(kept) <= 1_000 + 31
    assert burst[-1]["error"].startswith("too many commands in the time window")
    assert record.stat().st_size < 100_000


def operator_config(tmp: Path, port: int) -> Path:
    key = tmp / "command.key"
    key.write_bytes(KEY)
    key.chmod(0o600)
    # The system clock as trusted time (a real lorry's moves on across a restart; a replayed
    # GPS capture's would not), and a reading a second so the status is saved.
    return agent_config(tmp, port, commands={"key_file": str(key)}, time={"trust_system_clock": "always"},
                        health={"interval_s": 1})


def answering(op: Operator, what: str) -> None:
    """Ping until the agent answers one (it only gets commands sent after it subscribed)."""
    def ok() -> bool:
        payload = command("ping", ts=int(time.time() * 1000))
        want = json.loads(payload)["id"]
        op.client.publish(op.topic, payload, qos=1)
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            if any(r["id"] == want and r["ok"] for r in op.replies):
                return True
            time.sleep(0.05)
        return False

    wait_until(ok, 30, what)


def send_raw(op: Operator, payload: bytes) -> dict:
    want = json.loads(payload)["id"]
    before = len([r for r in op.replies if r["id"] == want])
    op.client.publish(op.topic, payload, qos=1)
    wait_until(lambda: len([r for r in op.replies if r["id"] == want]) > before, 15, "a reply")
    return [r for r in op.replies if r["id"] == want][-1]


def test_a_captured_command_cannot_be_replayed_after_a_restart_or_a_power_cut(tmp_path: Path,
                                                                              broker: Mosquitto) -> None:
    """The real agent, restarted on the same store: cleanly (SIGTERM), after a power cut
    (SIGKILL), and after a power cut that also lost the record file or left garbage in it."""
    cfg = operator_config(tmp_path, broker.port)
    record = tmp_path / "state" / "buffer.db.commands"
    op = Operator(broker.port)
    try:
        with AgentProcess(cfg) as agent:
            answering(op, "the agent answering")
            captured = command("set_profile", ts=int(time.time() * 1000), profile="parked")
            assert send_raw(op, captured)["ok"] is True
            assert agent.terminate() == 0
        for restart in ("sigterm", "sigkill", "record deleted", "record garbage"):
            with AgentProcess(cfg) as agent:
                answering(op, f"answering after {restart}")
                replay = send_raw(op, captured)
                assert replay["ok"] is False, (restart, replay)
                if restart in ("sigterm", "sigkill"):  # the record tells
                    assert replay["error"] == "replayed: this nonce was already used"
                else:  # the record is gone: signed before this start, so refused
                    assert replay["error"].startswith("replayed? signed before the agent started"), replay
                assert sign_command(KEY, replay) == replay
                assert agent.proc.poll() is None
                if restart == "sigterm":
                    agent.kill()  # next: restarted after a power cut
                elif restart == "sigkill":
                    agent.kill()
                    assert record.exists(), "the record lives next to the store"
                    record.unlink()
                elif restart == "record deleted":
                    agent.kill()
                    record.write_bytes(b"\x00" * 37 + b'{"version":1')
                else:
                    agent.terminate()
                    status = subprocess.run([sys.executable, "-m", "agent", "status", "--config", str(cfg)],
                                            capture_output=True, text=True, cwd=REPO, timeout=30).stdout
                    assert "nonce record damaged" in status and "commands signed before it refused" in status, status
    finally:
        op.close()
