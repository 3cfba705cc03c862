"""Every batch the uplink takes ends accepted, kept or rejected (agent/uplink/outcome.py).

Against a real mosquitto: an ACL that refuses a topic makes it answer an MQTT 5 PUBACK with
0x87 Not authorized (kept: the rows wait in the store, the stream retries on the same
connection and goes once the broker allows it); ``message_size_limit`` makes it answer 0x95
Packet too large (kept and split while several readings, then the lone reading rejected:
set aside and announced).
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from agent.config import load
from agent.demo.broker import Mosquitto
from agent.model.chain import Chain
from agent.model.reading import Reading
from agent.store.buffer import Store
from agent.uplink.mqtt import MqttUplink
from agent.uplink.outbox import Batch
from agent.uplink.outcome import Outcome, of_puback
from support import AgentProcess, Backend, agent_config, last_seqs, store_depth, store_readings, store_state, wait_until

DEVICE = "CQ-HN-0042"
START_MS = 1_795_000_000_000


def fill(db: Path, positions: int, can: int = 0, *, oversize: dict[int, int] | None = None) -> None:
    store = Store(db, device=DEVICE, chain=Chain(DEVICE))
    store.start()
    for i in range(1, positions + 1):
        data: dict[str, Any] = {"lat": round(22.0 + i * 1e-4, 7), "lon": round(106.7 + i * 1e-4, 7), "fix": "gps"}
        if oversize and i in oversize:
            data["note"] = "x" * oversize[i]
        store.append(Reading("position", START_MS + i * 1000, data))
    for i in range(1, can + 1):
        store.append(Reading("can", START_MS + i * 1000, {"spn": 190, "value": 1200 + i}))
    store.close()


def saved_status(db: Path) -> dict[str, Any]:
    saved = store_state(db).get("status")
    return json.loads(saved) if saved else {}


def depth(db: Path, stream: str) -> int:
    return len(store_readings(db, stream))


def dropped_alarms(backend: Backend) -> list[dict[str, Any]]:
    return [a for a in backend.readings("alarm") if a.get("kind") == "data_dropped"]


# -- the rules ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("code", "count", "outcome", "later", "dropped_as"), [
    (0x00, 5, Outcome.ACCEPTED, False, ""),
    (0x10, 5, Outcome.ACCEPTED, False, ""),  # No matching subscribers: the broker has it
    (0x87, 5, Outcome.KEPT, True, ""),  # Not authorized: the topic's, not the reading's
    (0x87, 1, Outcome.KEPT, True, ""),
    (0x90, 1, Outcome.KEPT, True, ""),  # Topic Name invalid
    (0x97, 1, Outcome.KEPT, True, ""),  # Quota exceeded
    (0x80, 1, Outcome.KEPT, True, ""),  # Unspecified error
    (0x83, 1, Outcome.KEPT, True, ""),  # Implementation specific error
    (0x91, 1, Outcome.KEPT, True, ""),  # Packet Identifier in use
    (0x95, 5, Outcome.KEPT, False, ""),  # Packet too large: split
    (0x95, 1, Outcome.REJECTED, False, "too_large"),
    (0x99, 5, Outcome.KEPT, False, ""),  # Payload format invalid: split
    (0x99, 1, Outcome.REJECTED, False, "undeliverable"),
])
def test_each_puback_reason_has_one_outcome(code: int, count: int, outcome: Outcome, later: bool,
                                            dropped_as: str) -> None:
    if code == 0x95:  # not a PUBACK code in MQTT 5 (mosquitto sends it; paho 2 cannot parse it)
        failed, name = True, "Packet too large"
    else:
        reason = ReasonCode(PacketTypes.PUBACK, identifier=code)
        failed, name = reason.is_failure, reason.getName()
    v = of_puback(failed, name, count)
    assert (v.outcome, v.later, v.dropped_as) == (outcome, later, dropped_as), name
    assert v.split == (outcome is Outcome.KEPT and not later)


def test_a_refused_payload_is_split_then_the_lone_reading_rejected(tmp_path: Path) -> None:
    """0x99 Payload format invalid (no mosquitto sends it: the PUBACK is fed to the uplink's
    callback): a batch is sent again at once in halves, the readings next to the refused one
    stay, and the lone refused reading is set aside and announced."""
    announced: list[Any] = []
    store = Store(tmp_path / "b.db", device=DEVICE, sync_interval_s=0.05, on_drop=announced.extend)
    store.start()
    up = None
    try:
        for i in range(8):
            store.append(Reading("position", START_MS + i, {"i": i}))
        store.flush()
        up = MqttUplink(load(agent_config(tmp_path, 1, mqtt_extra={"protocol": "5"})), store)
        box = up.outbox
        invalid = ReasonCode(PacketTypes.PUBACK, identifier=0x99)

        def send(batch: Batch, reason: ReasonCode | None = None) -> None:
            mid = 1000 + batch.ids[0]
            up._inflight[mid] = batch
            up._sent[mid] = (0.0, 100, 100)
            up.rate.sent(mid, 100)
            up._on_publish(None, None, mid, reason or ReasonCode(PacketTypes.PUBACK, identifier=0), None)

        first = box.next_batch()
        assert first is not None and first.count == 1, "the newest first, then the backlog"
        send(first)  # the newest one went
        whole = box.next_batch()
        assert whole is not None and whole.count == 7
        send(whole, invalid)
        half = box.next_batch()
        assert half is not None and half.ids == whole.ids[:3], "the same readings again, in half as many"
        send(half, invalid)
        quarter = box.next_batch()
        assert quarter is not None and quarter.ids == whole.ids[:1]
        send(quarter, invalid)  # alone and refused: rejected
        assert [(d.stream, d.count, d.reason) for d in announced] == [("position", 1, "undeliverable")]
        assert up.readings_set_aside == 1 and "set aside 1 position" in up.snapshot()["last_error"]
        rest = box.next_batch()
        assert rest is not None and rest.ids == whole.ids[1:], "the stream moves on"
        send(rest)
        store.flush()
        assert store.pending() == 0
    finally:
        if up is not None:
            up.stop()
        store.close()


# -- against mosquitto ----------------------------------------------------------------------------


def acl(path: Path, *, deny_can: bool) -> Path:
    path.write_text("topic readwrite lorry/#\n" + ("topic deny lorry/+/can\n" if deny_can else ""))
    return path


def test_not_authorized_keeps_the_stream_and_retries_it_with_backoff(tmp_path: Path) -> None:
    """mosquitto refuses the `can` topic (MQTT 5 PUBACK 0x87, then it closes the connection):
    positions go on, CAN readings stay in the store (not deleted, not set aside, not blamed
    for the lost connection), retried with backoff, not at every reconnect; once the ACL
    allows them (SIGHUP reload) they go."""
    rules = acl(tmp_path / "acl", deny_can=True)
    broker = Mosquitto(tmp_path / "broker", extra_conf=[f"acl_file {rules}"]).start()
    backend = Backend(broker.port)
    try:
        db = tmp_path / "state" / "buffer.db"
        fill(db, 30, can=12)
        want = last_seqs(db)
        cfg = agent_config(tmp_path, broker.port, mqtt_extra={"protocol": "5", "max_batch": 5},
                           time={"trust_system_clock": "always"})
        with AgentProcess(cfg, "--until-drained") as agent:
            started = time.monotonic()
            wait_until(lambda: {r["seq"] for r in backend.readings("position")} >= set(range(1, 31)), 30,
                       "every position, while CAN is refused")
            wait_until(lambda: "can" in saved_status(db).get("uplink", {}).get("kept", {}), 30, "status: can kept")
            kept = saved_status(db)["uplink"]["kept"]["can"]
            assert "Not authorized" in kept["reason"], kept
            assert depth(db, "can") == want["can"], "refused rows stay in the store"
            assert backend.readings("can") == [] and dropped_alarms(backend) == []
            assert agent.proc.poll() is None, "not drained: CAN is still waiting"
            time.sleep(2)
            # mosquitto closes the connection after each refusal: a connection per retry of the
            # stream, at the retry's backoff (reconnect_min_s 0.2 … reconnect_max_s 1 here), not
            # a reconnect storm at every reconnect_min_s.
            refused_for = time.monotonic() - started
            connects = saved_status(db)["uplink"]["connects"]
            assert connects <= 4 + refused_for / 0.5, (connects, refused_for)
            acl(rules, deny_can=False)
            broker.proc.send_signal(signal.SIGHUP)
            assert agent.wait(60) == 0, agent.log()[-4000:]
        wait_until(lambda: {r["seq"] for r in backend.readings("can")} == set(range(1, want["can"] + 1)), 10,
                   "every CAN reading once allowed")
        assert store_depth(db) == 0 and dropped_alarms(backend) == []
        st = saved_status(db)["uplink"]
        assert st["set_aside"] == 0 and "kept" not in st
        assert "can readings kept (the broker refused it: Not authorized): retried later" in agent.log()
    finally:
        backend.close()
        broker.stop()


def test_a_message_over_the_brokers_message_size_limit_is_split_then_rejected(tmp_path: Path) -> None:
    """mosquitto's ``message_size_limit`` (no Maximum Packet Size announced, so the agent cannot
    know before sending) answers an over-limit MQTT 5 message with a PUBACK 0x95 Packet too
    large, a code MQTT 5 does not allow in a PUBACK: paho takes it as a protocol error and the
    connection drops. The lost-connection rule (agent/uplink/deliverability.py) then splits the
    batches and rejects the one reading no message can carry; every other position arrives."""
    broker = Mosquitto(tmp_path / "broker", extra_conf=["message_size_limit 2000"]).start()
    backend = Backend(broker.port)
    try:
        db = tmp_path / "state" / "buffer.db"
        fill(db, 40, oversize={7: 3000})
        cfg = agent_config(tmp_path, broker.port, mqtt_extra={"protocol": "5"}, time={"trust_system_clock": "always"})
        with AgentProcess(cfg, "--until-drained") as agent:
            assert agent.wait(60) == 0, agent.log()[-4000:]
        wait_until(lambda: {r["seq"] for r in backend.readings("position")} >= set(range(1, 41)) - {7}, 10,
                   "every other position")
        assert 7 not in {r["seq"] for r in backend.readings("position")}
        wait_until(lambda: dropped_alarms(backend), 10, "the data_dropped alarm")
        (a,) = dropped_alarms(backend)
        assert (a["dropped_stream"], a["first_seq"], a["last_seq"]) == ("position", 7, 7)
        assert a["reason"] in ("too_large", "undeliverable"), a
        st = saved_status(db)["uplink"]
        assert st["set_aside"] == 1, st
        assert store_depth(db) == 0
    finally:
        backend.close()
        broker.stop()
