"""Catch-up over a slow roaming link (agent/uplink/linkrate.py, agent/uplink/outbox.py), through a loopback
relay that adds latency and limits bandwidth (tests/linksim.py), to a real mosquitto.

A backlog is written into the store first (a day in the mountains, shortened), then the agent
connects through the link: events and the newest position must come first, messages must
fit the link and the broker's maximum packet size, and nothing may be lost.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agent.demo.broker import Mosquitto
from agent.model.reading import Reading
from agent.store.buffer import Store
from backlog import DEVICE, backlog
from linksim import LinkSim
from support import AgentProcess, Backend, agent_config, last_seqs, store_state, wait_until


def arrival(backend: Backend) -> list[tuple[str, list[dict[str, Any]], int]]:
    """(stream, readings, payload bytes) per data message, in arrival order."""
    out = []
    with backend._lock:
        msgs = list(backend.messages)
    for topic, payload, _retain in msgs:
        if topic.endswith("/status"):
            continue
        readings = backend.decode(payload)
        out.append((topic.rsplit("/", 1)[1], readings, len(payload)))
    return out


def complete(backend: Backend, want: dict[str, int]) -> bool:
    got: dict[str, set[int]] = {}
    for r in backend.readings():
        got.setdefault(r["stream"], set()).add(r["seq"])
    return all(got.get(s, set()) >= set(range(1, n + 1)) for s, n in want.items())


@pytest.mark.parametrize("encoding", ["json", "compact"])
def test_backlog_over_a_slow_link_events_and_newest_first_nothing_lost(tmp_path: Path, broker: Mosquitto,
                                                                        backend: Backend, encoding: str) -> None:
    db = tmp_path / "state" / "buffer.db"
    n = 3000 if encoding == "json" else 20_000
    backlog(db, n, events=10)
    want = last_seqs(db)
    # 256 kbit/s and 300 ms for the compact encoding (the goal's link); JSON is ~15x bigger,
    # so it gets a faster link to keep the test short.
    rate = 256_000 if encoding == "compact" else 2_000_000
    with LinkSim(broker.port, rtt_s=0.3, rate_bps=rate) as link:
        cfg = agent_config(tmp_path, link.port, mqtt_extra={"encoding": encoding, "max_message_bytes": 16_384})
        with AgentProcess(cfg, "--until-drained") as agent:
            assert agent.wait(120) == 0, agent.log()[-4000:]
        wait_until(lambda: complete(backend, want), 20, "every seq of every stream at the backend")
        wire = link.bytes_up + link.bytes_down
    msgs = arrival(backend)
    streams = [s for s, _r, _n in msgs]
    # Events first, then the newest position alone, then the backlog oldest first.
    first_position = streams.index("position")
    assert set(streams[:first_position]) == {"seal", "alarm"}, streams[:first_position + 2]
    assert "seal" not in streams[first_position:] and "alarm" not in streams[first_position:]
    newest = msgs[first_position][1]
    assert [r["seq"] for r in newest] == [want["position"]]
    assert [r["seq"] for r in msgs[first_position + 1][1]][0] == 1
    # No message over the limit; the backlog went in several messages sized to the link.
    assert max(size for _s, _r, size in msgs) <= 16_384
    positions = [size for s, _r, size in msgs if s == "position"]
    assert len(positions) >= 4
    per_position = wire / want["position"]
    if encoding == "compact":
        assert per_position <= 15, f"{per_position:.1f} bytes on the wire per position"
    st = json.loads(store_state(db)["status"])
    link_state = st["uplink"]["link"]
    # Measured, not configured: the relay's round trip is a floor for what the agent sees.
    assert link_state["rtt_ms"] >= 290, link_state
    assert st["uplink"]["encoding"] == encoding


def test_messages_never_exceed_the_brokers_maximum_packet_size(tmp_path: Path) -> None:
    """An MQTT 5 broker announces its Maximum Packet Size in CONNACK: the agent splits
    batches below it (mosquitto would disconnect a client that sends a bigger packet)."""
    broker = Mosquitto(tmp_path / "broker", extra_conf=["max_packet_size 3000"])
    broker.start()
    backend = Backend(broker.port)
    try:
        db = tmp_path / "state" / "buffer.db"
        backlog(db, 1500, events=4)
        want = last_seqs(db)
        cfg = agent_config(tmp_path, broker.port, mqtt_extra={"protocol": "5", "max_message_bytes": 131_072})
        with AgentProcess(cfg, "--until-drained") as agent:
            assert agent.wait(60) == 0, agent.log()[-4000:]
        wait_until(lambda: complete(backend, want), 20, "every seq at the backend")
        sizes = [size for _s, _r, size in arrival(backend)]
        assert max(sizes) <= 3000 - 60, max(sizes)
        assert "connection lost" not in agent.log()
    finally:
        backend.close()
        broker.stop()


def test_a_compact_encoding_failure_falls_back_to_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A codec bug must never stall the backlog: that batch goes as JSON (same topic, and the
    backend decodes both), and the error is visible in status."""
    from agent.config import load
    from agent.uplink import mqtt as uplink
    from agent.uplink.outbox import Batch

    cfg = load(agent_config(tmp_path, 1, mqtt_extra={"encoding": "compact"}))
    store = Store(tmp_path / "b.db", device=DEVICE)
    try:
        up = uplink.MqttUplink(cfg, store)
        bodies = ('{"device":"D","stream":"position","seq":1,"ts":"2026-11-21T08:42:10.000Z","lat":1.5}',
                  '{"device":"D","stream":"position","seq":2,"ts":"2026-11-21T08:42:11.000Z","lat":1.6}')
        batch = Batch("position", (1, 2), bodies)
        assert up._encode(batch)[:3] == b"\xd9\xd9\xf7"

        def broken(_bodies: Any) -> bytes:
            raise RuntimeError("codec bug")

        monkeypatch.setattr(uplink.compact, "encode", broken)
        assert json.loads(up._encode(batch)) == [json.loads(b) for b in bodies]
        assert "compact encoding failed" in up.snapshot()["last_error"]
    finally:
        store.close()


def test_a_batch_sent_as_json_after_a_compact_failure_says_json(tmp_path: Path, broker: Mosquitto,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Under MQTT 5 the content type is chosen per message: the fallback JSON once went out
    labelled application/cbor."""
    from agent.config import load
    from agent.uplink import mqtt as uplink

    def broken(_bodies: Any) -> bytes:
        raise RuntimeError("codec bug")

    monkeypatch.setattr(uplink.compact, "encode", broken)
    backend = Backend(broker.port, mqtt5=True)
    store = Store(tmp_path / "b.db", device=DEVICE, sync_interval_s=0.05)
    up = None
    try:
        cfg = load(agent_config(tmp_path, broker.port, mqtt_extra={"encoding": "compact", "protocol": "5"}))
        store.start()
        for i in range(3):
            store.append(Reading("position", 1_795_000_000_000 + i * 1000, {"lat": 22.0, "lon": 106.7 + i / 1e4}))
        store.flush()
        up = uplink.MqttUplink(cfg, store)
        up.start()
        wait_until(lambda: len(backend.readings("position")) == 3, 20, "the positions")
        with backend._lock:
            types = {backend.content_types.get(p) for t, p, _r in backend.messages if t.endswith("/position")}
        assert types == {"application/json"}, types
    finally:
        if up is not None:
            up.stop()
        store.close()
        backend.close()
