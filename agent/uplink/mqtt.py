"""Uplinks: hand batches from the outbox to the backend and report what was acknowledged.

``MqttUplink`` is the real one; ``ConsoleUplink`` prints what would be published (``run
--dry-run``). Both run in their own thread and delete rows only on acknowledgement.

A reading that can never be delivered is set aside (``Store.set_aside``: deleted, announced by
a ``data_dropped`` alarm) so that its stream moves on instead of re-sending it forever:

* ``too_large``: its message alone is larger than the broker's Maximum Packet Size (MQTT 5
  CONNACK) or than ``[mqtt] max_message_bytes`` (the size the broker is promised never to
  see exceeded: mosquitto acknowledges an over-limit message from an MQTT 3.1.1 client and
  discards it), or an MQTT 5 broker refused it or disconnected with "Packet too large";
* ``undeliverable``: MQTT 3.1.1 has no advertised limit, and a broker simply closes the
  connection on a packet over its own. After a connection lost within ``KILL_WINDOW_S`` of a
  send with several messages in flight, the next connection sends one message at a time
  (once the broker took our ``online``: a reset loses the acknowledgements before it, so only
  a lone message can be blamed). A message blamed that way ``KILL_STRIKES`` connections in
  a row is the suspect: a batch bigger than anything the broker took is split (messages
  capped at half its size, halving again at each further loss; the cap is doubled again
  after ``LEARNED_HOLD_S`` without one), and a single reading bigger than anything the
  broker took is set aside after ``KILL_STRIKES`` losses alone in its message
  (``KILL_STRIKES_CLOSE`` when it is less than twice that size).

A broker that is down, slow or flapping never causes this: a failed connection attempt, a
keepalive timeout, a loss long after the send or before the broker took our ``online``, a
broker shutting down (MQTT 5) resets the count, and a reading no larger than what already got
through is never set aside.
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
from agent.model.backoff import backoff_delay
from agent.config import Config
from agent.uplink.linkrate import LinkRate
from agent.uplink.outbox import Batch, Outbox
from agent.uplink.regions import STATE_KEY as USAGE_KEY
from agent.uplink.regions import UplinkPlan
from agent.model.secrets import read_secret
from agent.store.buffer import Store
from agent.uplink.socketmeter import SocketMeter

log = logging.getLogger(__name__)

STATUS_ONLINE = b"online"
STATUS_OFFLINE = b"offline"
JSON_CONTENT_TYPE = "application/json"
# Fixed header (≤ 5) + topic length (2) + packet id (2) + properties (≤ 40 with a content type).
_PUBLISH_OVERHEAD = 49
_USAGE_SAVE_S = 10.0
KILL_STRIKES = 3
"""Connections in a row lost right after the same message before it is the suspect."""
KILL_STRIKES_CLOSE = 8
"""The same for a single reading less than twice the size of what the broker took."""
KILL_WINDOW_S = 3.0
"""A loss this soon after the send can be the message's doing (a broker closes at once on an
oversize packet, so within about a round trip: 4 × the measured round trip, at least 0.5 s,
when known); a dead link is noticed by keepalive, at least 5 s after the last traffic."""
# Why a connection ended: only these can be a message's doing (paho names a dropped socket
# "Unspecified error"; an MQTT 5 broker says why in its DISCONNECT).
_MESSAGE_FAULTS = frozenset({"Unspecified error", "Protocol error", "Packet too large", "Malformed packet",
                             "Implementation specific error", "Payload format invalid", "Topic Name invalid"})
_TOO_LARGE = "Packet too large"
LEARNED_HOLD_S = 300.0
"""A message cap learned from lost connections is doubled after this long without another
(a flaky link can look like a small broker for a while; a real limit is found again)."""


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
        """A CommandHandler (agent/uplink/commands.py) when the command channel is configured."""
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
        self._max_payload = m.max_message_bytes
        self._usage_saved_at = 0.0
        self._inflight: dict[int, Batch] = {}
        self._sent: dict[int, tuple[float, int, int]] = {}
        """mid → (monotonic send time, packet bytes, payload bytes), status messages included."""
        self._connack: mqtt.ReasonCode | None = None
        self._lost = False
        self._lost_reason: str | None = None
        self._paho_error: str | None = None
        self._broker_max_packet: int | None = None
        self._largest_acked = 0
        """Largest packet this broker acknowledged since start: what it certainly accepts."""
        self._learned_max: int | None = None
        """Payload cap learned from connections lost right after big batches (MQTT 3.1.1)."""
        self._learned_at = 0.0
        self._suspect: int | None = None
        """First row id of the message last blamed for a lost connection."""
        self._strikes = 0
        self._lone_strikes = 0
        self._probe = 0
        """Acknowledgements to wait for one message at a time, after a suspicious loss."""
        self._status_mid: int | None = None
        self._status_acked = False
        self.readings_set_aside = 0
        """Readings given up as undeliverable (``too_large``, ``undeliverable``)."""
        self.commands_dropped = 0
        """Command messages that got no reply (the handler or the reply failed)."""

    def status(self) -> dict[str, Any]:
        out = super().status() | {
            "broker": f"{self.config.mqtt.host}:{self.config.mqtt.port}",
            "connects": self.connects,
            "disconnects": self.disconnects,
            "inflight": len(self._inflight),
            "set_aside": self.readings_set_aside,
            "commands_dropped": self.commands_dropped,
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
                self._judge_loss()
            else:
                attempt += 1
                # The broker is away: no message can be blamed.
                self._strikes = self._lone_strikes = self._probe = 0
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
        self._lost_reason = None
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
        info = client.publish(self.status_topic, STATUS_ONLINE, qos=1, retain=True)
        size = _packet_size(self.status_topic, STATUS_ONLINE, None, self.config.mqtt.protocol == "5")
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
            self._relax()
            # After a loss a message may have caused, one message at a time (and only once the
            # broker took our status message): a broker resets the connection on an oversize
            # packet, and the acknowledgements of the messages before it are lost with it.
            window = 1 if self._probe else self.config.mqtt.max_inflight
            ready = self._status_acked or not self._probe
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
        single reading that is too large for any message is set aside."""
        payload = self._encode(batch)
        props = None if encodings is None else encodings[compact.is_compact(payload)]
        topic = self.config.topic(batch.stream)
        size = _packet_size(topic, payload, props, self.config.mqtt.protocol == "5")
        too_large = self._too_large(len(payload), size)
        if batch.count > 1 and (too_large or len(payload) > self._max_payload):
            first, second = batch.halves()
            if self._probe:  # one message at a time: the second half is paged again later
                self.outbox.rewind(second)
                return self._publish(client, first, encodings)
            return self._publish(client, first, encodings) and self._publish(client, second, encodings)
        if too_large:
            self._give_up(batch, "too_large", too_large)
            return True
        info = client.publish(topic, payload, qos=1, properties=props)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._error(f"publish failed: {mqtt.error_string(info.rc)}")
            return False
        self._inflight[info.mid] = batch
        self._sent[info.mid] = (time.monotonic(), size, len(payload))
        self.rate.sent(info.mid, len(payload) + len(topic) + _PUBLISH_OVERHEAD)
        return True

    def _too_large(self, payload_bytes: int, packet_bytes: int) -> str | None:
        """Why a message can never be sent as it is, or None."""
        broker = self._broker_max_packet
        if broker and packet_bytes > broker:
            return f"{packet_bytes}-byte packet, over the broker's Maximum Packet Size of {broker}"
        limit = self.config.mqtt.max_message_bytes
        if payload_bytes > limit:
            return f"{payload_bytes}-byte message, over [mqtt] max_message_bytes = {limit}"
        return None

    def _give_up(self, batch: Batch, reason: str, why: str) -> None:
        """Set a reading aside for good: deleted and announced (a data_dropped alarm), unless it
        is itself such an alarm, which would only be followed by another as undeliverable."""
        announce = not (batch.stream == "alarm" and all(_is_drop_alarm(b) for b in batch.bodies))
        log.error("MQTT: %s %s reading(s) (row %d) set aside as %s: %s", batch.count, batch.stream,
                  batch.ids[0], reason, why)
        self.last_error = f"set aside {batch.count} {batch.stream} reading(s) as {reason}: {why}"
        if self.store.set_aside(batch.stream, batch.ids, reason, announce=announce):
            self.readings_set_aside += batch.count

    def _judge_loss(self) -> None:
        """The connection ended: was it the oldest message in flight that killed it?"""
        oldest = next(iter(self._inflight.items()), None)
        reason = self._lost_reason
        # A connection on which the broker never took our status message is not one a
        # message of ours can be blamed for (a refused topic prefix, a broker in trouble).
        if self._stop.is_set() or oldest is None or reason not in _MESSAGE_FAULTS or not self._status_acked:
            self._strikes = self._lone_strikes = self._probe = 0
            return
        mid, batch = oldest
        sent_at, packet, payload = self._sent.get(mid, (0.0, 0, 0))
        rtt = self.rate.rtt_s
        window = KILL_WINDOW_S if rtt is None else min(KILL_WINDOW_S, max(0.5, 4 * rtt))
        if time.monotonic() - sent_at > window:
            self._strikes = self._lone_strikes = self._probe = 0
            return
        if len(self._inflight) > 1:
            # Several in flight: the oldest may have been acknowledged in the packets the reset
            # lost. Blame nothing yet; next time they go one at a time.
            self._probe = len(self._inflight) + 1
            self._strikes = self._lone_strikes = 0
            self._suspect = None
            return
        self._probe = max(self._probe, 2)
        same = batch.ids[0] == self._suspect
        self._suspect = batch.ids[0]
        self._strikes = self._strikes + 1 if same else 1
        # A single reading needs strikes of its own, alone in its message.
        self._lone_strikes = (self._lone_strikes + 1 if same else 1) if batch.count == 1 else 0
        if reason == _TOO_LARGE:  # an MQTT 5 broker said so: no need to see it again
            self._strikes = max(self._strikes, KILL_STRIKES)
            self._lone_strikes = KILL_STRIKES if batch.count == 1 else 0
        if batch.count > 1:
            # Only a message bigger than anything the broker took can be too big for it.
            if self._strikes >= KILL_STRIKES and packet > self._largest_acked:
                self._learned_max = max(1, payload // 2)
                self._learned_at = time.monotonic()
                log.warning("MQTT: the connection was lost %d times right after a %d-byte message of %d %s "
                            "readings: messages capped at %d bytes from now on", self._strikes, payload,
                            batch.count, batch.stream, self._learned_max)
                self._apply_limits()
            return
        # Only a reading bigger than anything the broker took can be too big for it; one not
        # much bigger must be blamed longer (a flaky link also drops connections at sends).
        if packet <= self._largest_acked:
            if self._lone_strikes >= KILL_STRIKES:
                self._error(f"connection lost {self._lone_strikes} times right after a {batch.stream} reading, but "
                            f"the broker took bigger messages ({self._largest_acked} bytes): kept, the link is to blame")
            return
        needed = KILL_STRIKES if packet >= 2 * self._largest_acked or reason == _TOO_LARGE else KILL_STRIKES_CLOSE
        if self._lone_strikes < needed:
            return
        strikes = self._lone_strikes
        self._strikes = self._lone_strikes = 0
        self._suspect = None
        self._give_up(batch, "too_large" if reason == _TOO_LARGE else "undeliverable",
                      f"the broker closed the connection each time it was sent ({strikes} connections in a row, "
                      f"{packet}-byte packet; the largest it took: {self._largest_acked})")

    def _relax(self) -> None:
        """Double a learned cap that has held for a while (gone once back at the config's)."""
        if self._learned_max is None or time.monotonic() - self._learned_at < LEARNED_HOLD_S:
            return
        self._learned_max *= 2
        self._learned_at = time.monotonic()
        if self._learned_max >= self.config.mqtt.max_message_bytes:
            self._learned_max = None
        log.info("MQTT: message cap raised to %s bytes", self._learned_max or self.config.mqtt.max_message_bytes)
        self._apply_limits()

    def _apply_limits(self) -> None:
        """The batching target: config, the broker's Maximum Packet Size, what was learned."""
        limit = self.config.mqtt.max_message_bytes
        if self._broker_max_packet:  # MQTT 5: never send a packet the broker would disconnect us for
            topic = len(self.config.topic("temperature").encode())
            limit = min(limit, self._broker_max_packet - _PUBLISH_OVERHEAD - topic - 16)
        limit = max(256, limit)
        if self._learned_max is not None:
            limit = min(limit, self._learned_max)
        self._max_payload = limit
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
        self._sent.clear()
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
        broker_max = getattr(props, "MaximumPacketSize", None) if props is not None else None
        self._broker_max_packet = int(broker_max) if broker_max else None
        self._apply_limits()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: mqtt.ReasonCode, props: Any) -> None:
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

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: mqtt.ReasonCode, props: Any) -> None:
        sent = self._sent.pop(mid, None)
        if sent is not None and not reason.is_failure:
            self._largest_acked = max(self._largest_acked, sent[1])
        if mid == self._status_mid:
            self._status_acked = not reason.is_failure
        batch = self._inflight.pop(mid, None)
        if batch is None:
            return  # the status message
        self.rate.acked(mid)
        if reason.is_failure:
            self._error(f"broker rejected {batch.count} {batch.stream} readings: {reason}")
            if reason.getName() == _TOO_LARGE and sent is not None:
                if batch.count > 1:  # split from now on; the outbox sends them again
                    self._learned_max = max(1, sent[2] // 2)
                    self._learned_at = time.monotonic()
                    self._apply_limits()
                    self.outbox.rewind(batch)
                else:
                    self._give_up(batch, "too_large", f"the broker refused it: {reason}")
            return
        if self._probe:
            self._probe -= 1
        self._acked(batch)


def _packet_size(topic: str, payload: bytes, props: Properties | None, v5: bool) -> int:
    """Bytes of the QoS 1 PUBLISH packet, as a broker's Maximum Packet Size counts them."""
    rest = 2 + len(topic.encode()) + 2 + len(payload)
    if v5:
        rest += len(props.pack()) if props is not None else 1
    header = 1
    n = rest
    while True:
        header += 1
        n //= 128
        if n == 0:
            return header + rest


def _is_drop_alarm(body: str) -> bool:
    try:
        return json.loads(body).get("kind") == "data_dropped"
    except (ValueError, AttributeError):
        return False
