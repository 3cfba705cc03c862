"""Whatever arrives on the command topic, the agent answers (signed) or counts it, and never
lets it through paho as an exception: no RecursionError, no reconnect (docs/commands.md)."""

from __future__ import annotations

import json
import secrets
import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion
from test_commands import KEY, NOW, command

from agent.demo.broker import Mosquitto
from agent.model.clock import TimeKeeper
from agent.model.reading import iso_ms
from agent.uplink.commands import MAX_COMMAND_BYTES, CommandHandler, sign_command
from support import AgentProcess, agent_config, wait_until

# -- what may arrive --------------------------------------------------------------------------

json_scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=80))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=12)
KEYS = ("id", "cmd", "args", "ts", "nonce", "hmac")


@st.composite
def commands(draw: st.DrawFn) -> bytes:
    """Objects with the command's keys, each of any JSON type, signed or not: they get past
    the HMAC check and exercise every check after it."""
    good = {"id": "c-1", "cmd": "ping", "args": {}, "ts": iso_ms(NOW), "nonce": secrets.token_hex(8)}
    obj: dict[str, Any] = {}
    for k in KEYS[:-1]:
        choice = draw(st.sampled_from(["good", "absent", "any"]))
        if choice == "good":
            obj[k] = good[k]
        elif choice == "any":
            obj[k] = draw(json_values)
    obj.update(draw(st.dictionaries(st.text(max_size=8), json_values, max_size=3)))
    if draw(st.booleans()):
        obj = sign_command(KEY, obj)
    elif draw(st.booleans()):
        obj["hmac"] = draw(json_values)
    return json.dumps(obj, ensure_ascii=draw(st.booleans())).encode()


def nested(n: int, opener: str = "[") -> bytes:
    return (opener * n).encode()


ANY_PAYLOAD = st.one_of(
    st.binary(max_size=2048),
    st.text(max_size=200).map(lambda s: s.encode("utf-8", "surrogatepass")),
    json_values.map(lambda v: json.dumps(v).encode()),
    commands(),
    st.integers(1, 3000).map(lambda n: nested(n, "[")),
    st.integers(1, 3000).map(lambda n: ('{"a":' * n).encode()),
    st.integers(1, 40).map(lambda n: json.dumps({"id": "x", "args": json.loads("[" * n + "]" * n)}).encode()),
)

HOSTILE = [
    b"[" * 100_000,
    b"{" * 100_000,
    b'{"a":' * 100_000,
    b"[" * 5000 + b"]" * 5000,  # under the size limit, far too deep
    b"\xff\xfe\x00[\x00",
    b"\xc3\x28",  # invalid UTF-8
    b"",
    b"null",
    b"1e999",
    b'{"id": "\\ud800", "cmd": "ping", "ts": NaN}',
    b'{"id": 1, "id": 2}',
    b'{"ts": "' + b"9" * 5000 + b'"}',
    b'{"cmd": ' + b"1" * 4000 + b"}",
    b"x" * (MAX_COMMAND_BYTES + 1),
    b" " * (10 * 1024 * 1024),
]


def handler(tmp: Path | None = None) -> CommandHandler:
    clock = TimeKeeper(trust_system_clock="never", mono_ns=lambda: 10**12)
    clock.observe_gps(NOW, 10**12)

    def boom(_args: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError("an action's bug")

    actions = {"ping": lambda a: {"pong": True}, "boom": boom, "nan": lambda a: {"x": float("nan")}}
    return CommandHandler("CQ-HN-0042", KEY, clock, actions, window_s=300,
                          state_path=None if tmp is None else tmp / "buffer.db.commands")


def assert_signed_reply(reply: Any) -> None:
    assert isinstance(reply, dict) and isinstance(reply["ok"], bool)
    assert sign_command(KEY, reply) == reply, "the reply carries a valid HMAC"
    assert reply["ok"] or isinstance(reply["error"], str) and reply["error"]
    json.dumps(reply, allow_nan=False).encode("utf-8")  # publishable as it is


# -- the handler: never raises, always a signed reply -----------------------------------------


@pytest.fixture(scope="module")
def record_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("record")


@pytest.mark.parametrize("payload", HOSTILE, ids=lambda p: repr(p[:12]) + f"..{len(p)}")
def test_hostile_payloads_get_a_signed_refusal(payload: bytes) -> None:
    reply = handler().handle(payload)
    assert_signed_reply(reply)
    assert reply["ok"] is False


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=ANY_PAYLOAD)
@example(payload=b"[" * 100_000)
@example(payload=json.dumps(sign_command(KEY, {"id": "c", "cmd": "boom", "args": {}, "ts": iso_ms(NOW),
                                               "nonce": "boom-nonce-0001"})).encode())
@example(payload=json.dumps(sign_command(KEY, {"id": "c", "cmd": "nan", "args": {}, "ts": iso_ms(NOW),
                                               "nonce": "nan-nonce-00001"})).encode())
def test_any_payload_gets_a_signed_reply_and_never_raises(record_dir: Path, payload: bytes) -> None:
    reply = handler(record_dir).handle(payload)  # a new handler on the same record: a restart
    assert_signed_reply(reply)


@settings(max_examples=200, deadline=None)
@given(cmd=json_values, args=json_values, ts=json_values, nonce=json_values, cid=json_values)
def test_signed_commands_with_any_value_at_any_key_are_answered(cmd: Any, args: Any, ts: Any, nonce: Any,
                                                                 cid: Any) -> None:
    obj = sign_command(KEY, {"id": cid, "cmd": cmd, "args": args, "ts": ts, "nonce": nonce})
    reply = handler().handle(json.dumps(obj).encode())
    assert_signed_reply(reply)
    assert reply["id"] == (cid if isinstance(cid, str) else None)


def test_an_actions_failure_is_a_signed_refusal_and_counted() -> None:
    h = handler()
    reply = h.handle(command("boom"))
    assert_signed_reply(reply)
    assert reply["ok"] is False and reply["error"].startswith("failed: RuntimeError")
    assert h.handle(command("ping"))["ok"] is True, "the handler carries on"


def test_refusal_counters_stay_bounded() -> None:
    h = handler()
    for k in range(200):
        h.handle(json.dumps(sign_command(KEY, {"id": "c", "cmd": f"unknown-{k}-" + "x" * k, "args": {},
                                               "ts": iso_ms(NOW), "nonce": f"nonce-{k:08d}"})).encode())
        h.handle(json.dumps({"ts": f"garbage {k}"}).encode())
    assert len(h.rejected) <= 32 and sum(h.rejected.values()) == 400


# -- end to end: a real agent, a real mosquitto ------------------------------------------------


class Listener:
    """Collects every reply on the device's reply topic, and can publish raw bytes."""

    def __init__(self, port: int) -> None:
        self.replies: list[dict[str, Any]] = []
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                  client_id=f"op-{secrets.token_hex(3)}")
        ready = threading.Event()
        self.client.on_connect = lambda c, *_: c.subscribe("lorry/CQ-HN-0042/cmd/reply", qos=1)
        self.client.on_subscribe = lambda *_: ready.set()
        self.client.on_message = lambda c, u, m: self.replies.append(json.loads(m.payload))
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert ready.wait(10)

    def send(self, payload: bytes) -> None:
        self.client.publish("lorry/CQ-HN-0042/cmd", payload, qos=1).wait_for_publish(10)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def uplink_status(cfg: Path) -> dict[str, Any]:
    import subprocess
    import sys

    from support import REPO

    out = subprocess.run([sys.executable, "-m", "agent", "status", "--config", str(cfg), "--json"],
                         capture_output=True, text=True, cwd=REPO, timeout=30)
    try:
        return json.loads(out.stdout)["uplink"] or {}
    except (ValueError, KeyError, TypeError):
        return {}  # not saved yet


def test_hostile_messages_on_the_command_topic_never_drop_the_connection(tmp_path: Path, broker: Mosquitto) -> None:
    """100,000 nested brackets, binary, a huge message: each gets a signed refusal, the agent
    stays connected (one connection from start to end) and still runs a good command."""
    key = tmp_path / "command.key"
    key.write_bytes(KEY)
    key.chmod(0o600)
    cfg = agent_config(tmp_path, broker.port, commands={"key_file": str(key)}, time={"trust_system_clock": "always"},
                       health={"interval_s": 1})  # a reading a second: the status is saved with each commit
    with AgentProcess(cfg) as agent:
        wait_until(lambda: uplink_status(cfg).get("connected"), 20,
                   "agent connected")
        op = Listener(broker.port)
        try:
            hostile = [b"[" * 100_000, b"{" * 100_000, b"[" * 5000, b"\xff\xfe\xc3\x28" * 50, b"x" * 300_000,
                       b'{"id": "c-utf", "cmd": "\\ud800"}']
            for n, payload in enumerate(hostile, 1):
                op.send(payload)
                wait_until(lambda n=n: len(op.replies) >= n, 15, f"a reply to hostile message {n}")
            assert all(r["ok"] is False for r in op.replies)
            for r in op.replies:
                assert_signed_reply(r)
            import time as _time

            now = int(_time.time() * 1000)
            op.send(command("ping", ts=now))
            wait_until(lambda: any(r["ok"] for r in op.replies), 15, "the good command's reply")
            _time.sleep(1.5)  # the status is saved every second
            up = uplink_status(cfg)
            assert up["connects"] == 1 and up["disconnects"] == 0, up
            assert agent.proc.poll() is None
            log = agent.log()
            assert "RecursionError" not in log and "Traceback" not in log, log[-3000:]
        finally:
            op.close()
        assert agent.terminate() == 0
