"""Uplinks: hand batches from the outbox to the backend and report what was acknowledged.

``MqttUplink`` is the real one; ``ConsoleUplink`` prints what would be published (``run
--dry-run``). Both run in their own thread and delete rows only on acknowledgement.
"""

from __future__ import annotations

import json
import logging
import ssl
import sys
import threading
import time
from typing import IO, Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent import compact
from agent.backoff import backoff_delay
from agent.config import Config
from agent.linkrate import LinkRate
from agent.outbox import Batch, Outbox
from agent.profiles import STATE_KEY as USAGE_KEY
from agent.profiles import UplinkPlan
from agent.secrets import read_secret
from agent.store import Store
from agent.wire import SocketMeter

log = logging.getLogger(__name__)

STATUS_ONLINE = b"online"
STATUS_OFFLINE = b"offline"
JSON_CONTENT_TYPE = "application/json"
# Fixed header (≤ 5) + topic length (2) + packet id (2) + properties (≤ 40 with a content type).
_PUBLISH_OVERHEAD = 49
_USAGE_SAVE_S = 10.0


class Uplink:
    """Common bookkeeping; subclasses implement ``_serve``."""

    def __init__(self, config: Config, store: Store, plan: UplinkPlan | None = None):
        self.config = config
        self.store = store
        self.plan = plan
        compact = config.mqtt.encoding == "compact"
        # Compact messages are ~15x smaller than their JSON: the outbox's limit is in JSON bytes,
        # the wire limit is checked on the encoded message.
        json_limit = config.mqtt.max_message_bytes * (64 if compact else 1)
        self.outbox = Outbox(store, max_batch=config.mqtt.max_batch, max_bytes=json_limit, plan=plan)
        self.connected = False
        self.messages_acked = 0
        self.readings_acked = 0
        self.last_ack_wall: float | None = None
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._guarded, name=type(self).__name__, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def status(self) -> dict[str, Any]:
        return {
            "connected": self.connected,
            "messages_acked": self.messages_acked,
            "readings_acked": self.readings_acked,
            "last_publish": self.last_ack_wall,
            "last_error": self.last_error,
        }

    def _acked(self, batch: Batch) -> None:
        self.store.ack(batch.ids)
        self.messages_acked += 1
        self.readings_acked += batch.count
        self.last_ack_wall = time.time()

    def _guarded(self) -> None:
        # The uplink must outlive any bug in one connection: log it, back off, carry on.
        attempt = 0
        while not self._stop.is_set():
            try:
                self._serve()
                return
            except Exception as e:  # noqa: BLE001 - last line of defence for a daemon thread
                attempt += 1
                self.last_error = f"{type(e).__name__}: {e}"
                log.exception("uplink failed; restarting it")
                self._stop.wait(backoff_delay(attempt, 1, 60))

    def _serve(self) -> None:
        raise NotImplementedError


class ConsoleUplink(Uplink):
    """Prints each message as ``{"topic": ..., "payload": ...}`` on one line; acks at once."""

    def __init__(self, config: Config, store: Store, out: IO[str] = sys.stdout):
        super().__init__(config, store)
        self.out = out

    def _serve(self) -> None:
        self.connected = True
        seen = -1
        while not self._stop.is_set():
            batch = self.outbox.next_batch()
            if batch is None:
                seen = self.store.wait_for_change(max(seen, self.store.durable_id), 0.2)
                continue
            topic = json.dumps(self.config.topic(batch.stream))
            self.out.write(f'{{"topic":{topic},"payload":{batch.json().decode()}}}\n')
            self.out.flush()
            self._acked(batch)


class MqttUplink(Uplink):
    """QoS 1 publishing with a bounded window of unacknowledged messages.

    Each connection gets a fresh paho client: paho would otherwise re-send its whole
    in-memory queue at once on reconnect, and that queue dies with the process anyway. The
    store is the queue; a new connection simply pages through it again.
    """

    def __init__(self, config: Config, store: Store, plan: UplinkPlan | None = None):
        super().__init__(config, store, plan)
        self.status_topic = config.topic("status")
        self.commands: Any = None
        """A CommandHandler (agent/commands.py) when the command channel is configured."""
        self.connects = 0
        self.disconnects = 0
        m = config.mqtt
        self.rate = LinkRate(m.max_message_bytes, adaptive=m.adaptive)
        self.meter = SocketMeter()
        self.wire_bytes = 0
        """Bytes on the wire since start, both directions (agent/wire.py)."""
        self._compact = m.encoding == "compact"
        self._ratio = 1.0 if not self._compact else 0.1
        """Encoded bytes per JSON byte, measured: turns a wire target into an outbox budget."""
        self._max_payload = m.max_message_bytes
        self._usage_saved_at = 0.0
        self._inflight: dict[int, Batch] = {}
        self._connack: mqtt.ReasonCode | None = None
        self._lost = False
        self._paho_error: str | None = None

    def status(self) -> dict[str, Any]:
        out = super().status() | {
            "broker": f"{self.config.mqtt.host}:{self.config.mqtt.port}",
            "connects": self.connects,
            "disconnects": self.disconnects,
            "inflight": len(self._inflight),
            "encoding": self.config.mqtt.encoding,
            "wire_bytes": self.wire_bytes if self.meter.available else None,
            "link": self.rate.status() | {"inflight_bytes": self.rate.inflight_bytes,
                                          "max_message_bytes": self._max_payload},
        }
        if self.plan is not None:
            out["data"] = self.plan.status()
        return out

    def _serve(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            client = self._client()
            if self._connect(client):
                attempt = 0
                self._session(client)
            else:
                attempt += 1
            self._close(client)
            if not self._stop.is_set():
                m = self.config.mqtt
                self._stop.wait(backoff_delay(attempt or 1, m.reconnect_min_s, m.reconnect_max_s))

    # -- connection -------------------------------------------------------------------------

    def _client(self) -> mqtt.Client:
        m = self.config.mqtt
        v5 = m.protocol == "5"
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.config.client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if v5 else True,
            reconnect_on_failure=False,
        )
        client.enable_logger(logging.getLogger("paho"))
        client.max_inflight_messages_set(m.max_inflight + 1)  # +1: the status message
        client.will_set(self.status_topic, STATUS_OFFLINE, qos=1, retain=True)
        if m.username is not None:
            client.username_pw_set(m.username, self._password())
        if m.tls is not None:
            client.tls_set(
                ca_certs=str(m.tls.ca_file),
                certfile=str(m.tls.cert_file) if m.tls.cert_file else None,
                keyfile=str(m.tls.key_file) if m.tls.key_file else None,
                cert_reqs=ssl.CERT_REQUIRED,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
            client.tls_insecure_set(m.tls.insecure_skip_hostname)
        client.on_log = self._on_log
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        return client

    def _password(self) -> str | None:
        path = self.config.mqtt.password_file
        if path is None:
            return None
        # Read at each connection so a rotated password is picked up without a restart.
        text = read_secret(path).decode("utf-8")
        return text.splitlines()[0] if text else ""

    def _connect(self, client: mqtt.Client) -> bool:
        m = self.config.mqtt
        self._connack = None
        self._lost = False
        self._paho_error = None
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
        client.publish(self.status_topic, STATUS_ONLINE, qos=1, retain=True)
        if self.commands is not None:
            client.subscribe(self.config.topic("cmd"), qos=1)
        return True

    def _session(self, client: mqtt.Client) -> None:
        """Publish until the connection drops or we are told to stop."""
        self.outbox.reset()
        self._inflight.clear()
        self.rate.reset()
        window = self.config.mqtt.max_inflight
        seen = self.store.durable_id
        props = self._publish_properties()
        while not self._stop.is_set():
            self._account(client)
            while len(self._inflight) < window and self.rate.may_send():
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

    def _publish_properties(self) -> Properties | None:
        if self.config.mqtt.protocol != "5":
            return None  # MQTT 3.1.1 has no properties: compact payloads announce themselves
        props = Properties(PacketTypes.PUBLISH)
        props.ContentType = compact.CONTENT_TYPE if self._compact else JSON_CONTENT_TYPE
        return props

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

    def _publish(self, client: mqtt.Client, batch: Batch, props: Properties | None) -> bool:
        """Publish one batch, split in halves while its message is over the size limit."""
        payload = self._encode(batch)
        if len(payload) > self._max_payload and batch.count > 1:
            first, second = batch.halves()
            return self._publish(client, first, props) and self._publish(client, second, props)
        topic = self.config.topic(batch.stream)
        info = client.publish(topic, payload, qos=1, properties=props)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._error(f"publish failed: {mqtt.error_string(info.rc)}")
            return False
        self._inflight[info.mid] = batch
        self.rate.sent(info.mid, len(payload) + len(topic) + _PUBLISH_OVERHEAD)
        return True

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
        info = client.publish(self.status_topic, STATUS_OFFLINE, qos=1, retain=True)
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
        sock = client.socket()
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    def _error(self, message: str) -> None:
        if message != self.last_error:
            log.warning("MQTT: %s", message)
        self.last_error = message

    # -- paho callbacks (called from client.loop in our own thread) ---------------------------

    def _on_log(self, client: mqtt.Client, userdata: Any, level: int, message: str) -> None:
        if level == mqtt.MQTT_LOG_ERR:
            self._paho_error = message

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: mqtt.ReasonCode, props: Any) -> None:
        self._connack = reason
        limit = self.config.mqtt.max_message_bytes
        broker_max = getattr(props, "MaximumPacketSize", None) if props is not None else None
        if broker_max:  # MQTT 5: never send a packet the broker would disconnect us for
            limit = min(limit, broker_max - _PUBLISH_OVERHEAD - len(self.config.topic("temperature")) - 16)
        self._max_payload = max(256, limit)
        self.rate.max_message = self._max_payload

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: mqtt.ReasonCode, props: Any) -> None:
        self._lost = True

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if self.commands is None or msg.topic != self.config.topic("cmd"):
            return
        reply = self.commands.handle(msg.payload)
        client.publish(self.config.topic("cmd") + "/reply", json.dumps(reply, separators=(",", ":")), qos=1)

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: mqtt.ReasonCode, props: Any) -> None:
        batch = self._inflight.pop(mid, None)
        if batch is None:
            return  # the status message
        self.rate.acked(mid)
        if reason.is_failure:
            self._error(f"broker rejected {batch.count} {batch.stream} readings: {reason}")
            return
        self._acked(batch)
