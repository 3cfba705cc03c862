"""The remote command channel: authentication, replay protection, the commands themselves;
and the broker ACL that confines each device to its own topics."""

from __future__ import annotations

import json
import secrets
import subprocess
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.clock import TimeKeeper
from agent.commands import CommandHandler, sign_command
from agent.demo import trip
from agent.localbroker import Mosquitto
from agent.reading import iso_ms
from support import AgentProcess, Backend, agent_config, wait_until

REPO_DOCS = Path(__file__).resolve().parents[1] / "docs"
KEY = b"command-key-for-CQ-HN-0042-0123456789"
NOW = 1_795_000_000_000


def clock(now_ms: int | None = NOW) -> TimeKeeper:
    k = TimeKeeper(trust_system_clock="never", mono_ns=lambda: 10**12)
    if now_ms is not None:
        k.observe_gps(now_ms, 10**12)
    return k


def command(cmd: str, *, ts: int = NOW, nonce: str | None = None, key: bytes = KEY, **args) -> bytes:
    body = {"id": f"c-{cmd}-{secrets.token_hex(3)}", "cmd": cmd, "args": args, "ts": iso_ms(ts), "nonce": nonce or secrets.token_hex(8)}
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
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"op-{secrets.token_hex(3)}")
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
        subprocess.run(["mosquitto_passwd", "-b", *(["-c"] if user == "CQ-HN-0042" else []), str(passwd), user, f"{user}-pw"],
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
