"""The MQTT uplink: QoS 1 publishing with a bounded window of unacknowledged messages.

Each connection gets a fresh paho client: paho would otherwise re-send its whole in-memory
queue at once on reconnect, and that queue dies with the process anyway. The store is the
queue; a new connection simply pages through it again (agent/uplink/outbox.py).

Every batch ends in an explicit outcome (agent/uplink/outcome.py): a PUBACK accepts it, or
the broker's reason keeps it (retried at once in smaller messages, or later) or rejects it
(set aside, announced). What a broker can take, and when a lost connection is a message's
doing, is agent/uplink/deliverability.py; the paho client for a connection is made by
agent/uplink/client.py. The base class (agent/uplink/base.py) and the dry-run console
(agent/uplink/console.py) are importable from here too.
"""

from __future__ import annotations

import json
import logging
import ssl
import time
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent import compact
from agent.config import Config
from agent.model import streams
from agent.model.backoff import backoff_delay
from agent.store.buffer import Store
from agent.uplink.base import Uplink
from agent.uplink.client import new_client
from agent.uplink.commands import CommandHandler
from agent.uplink.console import ConsoleUplink
from agent.uplink.deliverability import PUBLISH_OVERHEAD, Deliverability, packet_size
from agent.uplink.linkrate import LinkRate
from agent.uplink.outbox import Batch
from agent.uplink.outcome import TOO_LARGE, Outcome, Verdict, of_puback, rejected
from agent.uplink.regions import STATE_KEY as USAGE_KEY
from agent.uplink.regions import UplinkPlan
from agent.uplink.socketmeter import SocketMeter

__all__ = ["ConsoleUplink", "MqttUplink", "Uplink"]

log = logging.getLogger(__name__)

STATUS_ONLINE = b"online"
STATUS_OFFLINE = b"offline"
JSON_CONTENT_TYPE = "application/json"
_USAGE_SAVE_S = 10.0


class MqttUplink(Uplink):
    def __init__(self, config: Config, store: Store, plan: UplinkPlan | None = None):
        super().__init__(config, store, plan)
        self.presence_topic = config.topic("status")
        self.commands: CommandHandler | None = None
        """Set by the runner when the command channel is configured."""
        self.connects = 0
        self.disconnects = 0
        m = config.mqtt
        self.rate = LinkRate(m.max_message_bytes, adaptive=m.adaptive)
        self.meter = SocketMeter()
        self.wire_bytes = 0
        """Bytes on the wire since start, both directions (agent/uplink/socketmeter.py)."""
        self._compact = m.encoding == "compact"
        self._ratio = 1.0 if not self._compact else 0.1
        """Encoded bytes per JSON byte, measured: turns a wire target into an outbox budget."""
        self.limits = Deliverability(m.max_message_bytes, len(config.topic(streams.LONGEST_NAME).encode()),
                                     on_limit=self._limit_changed, on_error=self._error)
        self._usage_saved_at = 0.0
        self._inflight: dict[int, Batch] = {}
        self._sent: dict[int, tuple[float, int, int]] = {}
        """mid → (monotonic send time, packet bytes, payload bytes), status messages included."""
        self._connack: ReasonCode | None = None
        self._lost = False
        self._lost_reason: str | None = None
        self._paho_error: str | None = None
        self._status_mid: int | None = None
        self._status_acked = False
        self._refused = False
        """The broker refused a message on this connection (a PUBACK reason >= 0x80)."""
        self.commands_dropped = 0
        """Command messages that got no reply (the handler or the reply failed)."""

    def snapshot(self) -> dict[str, Any]:
        out = super().snapshot() | {
            "broker": f"{self.config.mqtt.host}:{self.config.mqtt.port}",
            "connects": self.connects,
            "disconnects": self.disconnects,
            "inflight": len(self._inflight),
            "set_aside": self.readings_set_aside,
            "commands_dropped": self.commands_dropped,
            "encoding": self.config.mqtt.encoding,
            "wire_bytes": self.wire_bytes if self.meter.available else None,
            "link": self.rate.snapshot() | {"inflight_bytes": self.rate.inflight_bytes,
                                          "max_message_bytes": self.limits.max_payload},
        }
        if self.plan is not None:
            out["data"] = self.plan.snapshot()
        return out

    def _serve(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            client = self._client()
            if self._connect(client):
                attempt = 0
                self._session(client)
                self._judge_loss()
            else:
                attempt += 1
                self.limits.clear()  # the broker is away: no message can be blamed
            self._close(client)
            if not self._stop.is_set():
                m = self.config.mqtt
                self._stop.wait(backoff_delay(attempt or 1, m.reconnect_min_s, m.reconnect_max_s))

    # -- connection -------------------------------------------------------------------------

    def _client(self) -> mqtt.Client:
        client = new_client(self.config, will=(self.presence_topic, STATUS_OFFLINE))
        client.on_log = self._on_log
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        return client

    def _connect(self, client: mqtt.Client) -> bool:
        m = self.config.mqtt
        self._connack = None
        self._lost = False
        self._lost_reason = None
        self._paho_error = None
        self._refused = False
        try:
            rc = client.connect(m.host, m.port, keepalive=m.keepalive_s)
        except (OSError, ssl.SSLError, ValueError) as e:
            self._error(f"cannot connect to {m.host}:{m.port}: {e}")
            return False
        deadline = time.monotonic() + max(10.0, client.connect_timeout * 2)
        while rc == MQTTErrorCode.MQTT_ERR_SUCCESS and self._connack is None and not self._lost:
            if self._stop.is_set() or time.monotonic() > deadline:
                break
            rc = client.loop(timeout=0.1)
        # paho reports a refusal through on_connect and then fails the same loop() call, so the
        # CONNACK's reason is checked first: "Not authorized" is not a network problem.
        if self._connack is not None and self._connack.is_failure:
            self._error(f"broker {m.host}:{m.port} refused the connection: {self._connack}")
            return False
        if self._connack is None:
            # No CONNACK: the link or the TLS session died first (e.g. the broker rejected our
            # client certificate with a TLS alert); paho's own error says which.
            why = self._paho_error or (mqtt.error_string(rc) if rc else "no answer")
            if m.tls is not None and m.tls.cert_file is None:
                # TLS 1.3 brokers reject a missing client certificate after the handshake, and
                # the alert naming it is often lost with the connection.
                why += " (no client certificate configured: does the broker require one?)"
            self._error(f"no CONNACK from {m.host}:{m.port}: {why}")
            return False
        self.connects += 1
        self.connected = True
        log.info("connected to %s:%d", m.host, m.port)
        info = client.publish(self.presence_topic, STATUS_ONLINE, qos=1, retain=True)
        size = packet_size(self.presence_topic, STATUS_ONLINE, None, self.config.mqtt.protocol == "5")
        self._sent[info.mid] = (time.monotonic(), size, len(STATUS_ONLINE))
        self._status_mid, self._status_acked = info.mid, False
        if self.commands is not None:
            client.subscribe(self.config.topic("cmd"), qos=1)
        return True

    def _session(self, client: mqtt.Client) -> None:
        """Publish until the connection drops or we are told to stop."""
        self.outbox.reset()
        self._inflight.clear()
        self.rate.reset()
        seen = self.store.durable_id
        props = self._publish_properties()
        while not self._stop.is_set():
            self._account(client)
            self.limits.relax()
            # After a loss a message may have caused, one message at a time (and only once the
            # broker took our status message): a broker resets the connection on an oversize
            # packet, and the acknowledgements of the messages before it are lost with it.
            probe = self.limits.probe
            window = 1 if probe else self.config.mqtt.max_inflight
            ready = self._status_acked or not probe
            while ready and len(self._inflight) < window and self.rate.may_send():
                target = self.rate.message_bytes()
                batch = self.outbox.next_batch(max(256, int(target / self._ratio)))
                if batch is None:
                    break
                if not self._publish(client, batch, props):
                    return
            busy = len(self._inflight) >= window or self.store.durable_id != seen
            seen = self.store.durable_id
            rc = client.loop(timeout=0.05 if busy or self._inflight else 0.2)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or self._lost:
                self._error(f"connection lost: {mqtt.error_string(rc) if rc else 'disconnected'}")
                return
        self._goodbye(client)

    def _publish_properties(self) -> dict[bool, Properties] | None:
        """Per encoding (compact or not), the MQTT 5 properties that announce it: a batch the
        compact encoder failed on goes as JSON, and must say so."""
        if self.config.mqtt.protocol != "5":
            return None  # MQTT 3.1.1 has no properties: compact payloads announce themselves
        out = {}
        for is_compact, content_type in ((True, compact.CONTENT_TYPE), (False, JSON_CONTENT_TYPE)):
            out[is_compact] = props = Properties(PacketTypes.PUBLISH)
            props.ContentType = content_type
        return out

    def _encode(self, batch: Batch) -> bytes:
        if not self._compact:
            return batch.json()
        try:
            payload = compact.encode(batch.bodies)
        except Exception as e:  # noqa: BLE001 - a codec bug must not stall the backlog
            # JSON is always valid on the same topics: the backend decodes both.
            self._error(f"compact encoding failed ({type(e).__name__}: {e}); sent {batch.count} as JSON")
            return batch.json()
        json_len = sum(len(b) for b in batch.bodies) + batch.count + 1
        self._ratio = 0.8 * self._ratio + 0.2 * (len(payload) / json_len)
        return payload

    def _publish(self, client: mqtt.Client, batch: Batch, encodings: dict[bool, Properties] | None) -> bool:
        """Publish one batch, split in halves while its message is over the size limit; a
        single reading that is too large for any message is rejected."""
        payload = self._encode(batch)
        props = None if encodings is None else encodings[compact.is_compact(payload)]
        topic = self.config.topic(batch.stream)
        size = packet_size(topic, payload, props, self.config.mqtt.protocol == "5")
        too_large = self.limits.too_large(len(payload), size)
        if batch.count > 1 and (too_large or len(payload) > self.limits.max_payload):
            first, second = batch.halves()
            if self.limits.probe:  # one message at a time: the second half is paged again later
                self.outbox.rewind(second)
                return self._publish(client, first, encodings)
            return self._publish(client, first, encodings) and self._publish(client, second, encodings)
        if too_large:
            self._end(batch, rejected("too_large", too_large))
            return True
        info = client.publish(topic, payload, qos=1, properties=props)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._error(f"publish failed: {mqtt.error_string(info.rc)}")
            return False
        self._inflight[info.mid] = batch
        self._sent[info.mid] = (time.monotonic(), size, len(payload))
        self.rate.sent(info.mid, len(payload) + len(topic) + PUBLISH_OVERHEAD)
        return True

    def _judge_loss(self) -> None:
        """The connection ended: was it the oldest message in flight that killed it? Not when
        the broker refused a message first (mosquitto 2.0 closes the connection after a PUBACK
        "Not authorized"), nor when a retry of a refused stream was in flight (its refusal
        lost with the connection): that counts as another refusal, and waits its backoff."""
        retried: dict[str, Batch] = {}
        for batch in self._inflight.values():
            if batch.stream in self._refusals:
                retried.setdefault(batch.stream, batch)
        for stream, batch in retried.items():
            self._keep(batch, Verdict(Outcome.KEPT, self._kept_why.get(stream, "refused before"), later=True))
        if self._stop.is_set() or self._refused or retried:
            self.limits.clear()
            return
        oldest = next(iter(self._inflight.items()), None)
        judged = None
        if oldest is not None:
            mid, batch = oldest
            judged = (batch, *self._sent.get(mid, (0.0, 0, 0)))
        verdict = self.limits.judge_loss(judged, len(self._inflight), self._lost_reason, self._status_acked,
                                         self.rate.rtt_s)
        if verdict is not None and judged is not None:
            self._end(judged[0], verdict)

    def _limit_changed(self, limit: int) -> None:
        self.rate.max_message = limit

    def _account(self, client: mqtt.Client) -> None:
        """Bytes on the wire since the last look, charged to the active profile."""
        n = self.meter.take(client.socket())
        self.wire_bytes += n
        plan = self.plan
        if plan is None:
            return
        plan.tick()
        plan.charge(n)
        now = time.monotonic()
        if n and now - self._usage_saved_at >= _USAGE_SAVE_S:
            self.store.set_state(USAGE_KEY, plan.saved())
            self._usage_saved_at = now

    def _goodbye(self, client: mqtt.Client) -> None:
        """Clean shutdown: wait briefly for acks in flight, then say offline ourselves."""
        deadline = time.monotonic() + 3.0
        info = client.publish(self.presence_topic, STATUS_OFFLINE, qos=1, retain=True)
        while time.monotonic() < deadline and (self._inflight or not info.is_published()):
            if client.loop(timeout=0.05) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return
        client.disconnect()

    def _close(self, client: mqtt.Client) -> None:
        self._account(client)
        if self.plan is not None:
            self.store.set_state(USAGE_KEY, self.plan.saved())
        if self.connected:
            self.disconnects += 1
        self.connected = False
        self._inflight.clear()
        self._sent.clear()
        sock = client.socket()
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    # -- paho callbacks (called from client.loop in our own thread) ---------------------------

    def _on_log(self, client: mqtt.Client, userdata: Any, level: int, message: str) -> None:
        if level == mqtt.MQTT_LOG_ERR:
            self._paho_error = message

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any) -> None:
        self._connack = reason
        broker_max = getattr(props, "MaximumPacketSize", None) if props is not None else None
        self.limits.connected(int(broker_max) if broker_max else None)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode,
                       props: Any) -> None:
        self._lost = True
        self._lost_reason = getattr(reason, "getName", lambda: str(reason))()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        # Whatever arrives (any bytes, any size, any topic name), nothing may raise out of a
        # paho callback: paho would re-raise it from loop() and the connection would drop.
        try:
            if self.commands is None or msg.topic != self.config.topic("cmd"):
                return
            # The handler refuses anything over MAX_COMMAND_BYTES before parsing it.
            reply = self.commands.handle(msg.payload)
            client.publish(self.config.topic("cmd") + "/reply", json.dumps(reply, separators=(",", ":")), qos=1)
        except Exception:  # noqa: BLE001 - counted and logged, never a reconnect
            self.commands_dropped += 1
            log.exception("MQTT: a command message was dropped")

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: ReasonCode, props: Any) -> None:
        sent = self._sent.pop(mid, None)
        if sent is not None and not reason.is_failure:
            self.limits.acked(sent[1])
        if mid == self._status_mid:
            self._status_acked = not reason.is_failure
        batch = self._inflight.pop(mid, None)
        if batch is None:
            return  # the status message
        self.rate.acked(mid)
        self.limits.answered()  # whatever the reason: the broker answered the message
        self._refused = self._refused or reason.is_failure
        verdict = of_puback(reason.is_failure, reason.getName(), batch.count)
        if verdict.split and reason.getName() == TOO_LARGE:
            # Every message from now on is capped at half its size (the outbox pages it again).
            verdict = Verdict(Outcome.KEPT, verdict.why)
            if sent is not None:
                self.limits.refused_as_too_large(sent[2])
        self._end(batch, verdict)
