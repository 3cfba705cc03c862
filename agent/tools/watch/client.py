"""The MQTT side of ``watch``: where and how to subscribe (:class:`Options`) and a paho-mqtt
client that feeds a :class:`~agent.tools.watch.watcher.Watcher` (:class:`MqttWatch`)."""

from __future__ import annotations

import ssl
import sys
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from agent.tools.watch.watcher import Watcher

RECONNECT_MIN_S = 0.5
RECONNECT_MAX_S = 30.0


@dataclass(frozen=True)
class Options:
    """Where and how to subscribe (the command line merged with ``--config``)."""

    host: str = "127.0.0.1"
    port: int = 1883
    prefix: str = "lorry"
    device: str = "+"
    client_id: str | None = None
    keep_session: bool = False
    protocol: str = "3.1.1"
    keepalive: int = 30
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_insecure_hostname: bool = False
    username: str | None = None
    password: str | None = None

    @property
    def topic(self) -> str:
        return f"{self.prefix}/{self.device}/#"


class MqttWatch:
    """A :class:`Watcher` fed by a paho-mqtt client subscribed like the backend.

    paho's network thread (``loop_start``) reconnects with backoff after a broker loss, and
    the subscription is renewed on every connection. ``on_readings`` is called (in that
    thread) with every message's accepted readings; ``note`` with one-line events for a human.
    """

    def __init__(self, opts: Options, watcher: Watcher | None = None, *,
                 on_readings: Callable[[list[dict[str, Any]]], None] | None = None,
                 note: Callable[[str], None] | None = None,
                 reconnect: tuple[float, float] = (RECONNECT_MIN_S, RECONNECT_MAX_S)) -> None:
        self.opts = opts
        self.watcher = watcher or Watcher(opts.prefix)
        self.on_readings = on_readings
        self.note = note or (lambda _line: None)
        self.connected = False
        self.stopping = False
        self.connects = 0
        self.last_error: str | None = None
        self.subscribed = threading.Event()
        """Set once the broker granted the subscription (renewed on each connection)."""
        self.client = self._client(reconnect)

    def _client(self, reconnect: tuple[float, float]) -> mqtt.Client:
        o = self.opts
        v5 = o.protocol == "5"
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=o.client_id or f"lorry-watch-{uuid.uuid4().hex[:8]}",
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if v5 else not o.keep_session,
        )
        client.reconnect_delay_set(*reconnect)  # type: ignore[arg-type]  # paho says int; it sleeps seconds
        if o.username is not None:
            client.username_pw_set(o.username, o.password)
        if o.tls_ca is not None:
            client.tls_set(ca_certs=str(o.tls_ca),
                           certfile=str(o.tls_cert) if o.tls_cert else None,
                           keyfile=str(o.tls_key) if o.tls_key else None,
                           cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
            client.tls_insecure_set(o.tls_insecure_hostname)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        return client

    def start(self) -> None:
        o = self.opts
        kwargs: dict[str, Any] = {}
        if o.protocol == "5":
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            kwargs["clean_start"] = not o.keep_session
            if o.keep_session:
                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = 7 * 86400
                kwargs["properties"] = props
        self.client.connect_async(o.host, o.port, keepalive=o.keepalive, **kwargs)
        self.client.loop_start()

    def stop(self) -> None:
        self.stopping = True
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()

    # -- paho callbacks (network thread) --------------------------------------------------

    def _on_connect(self, client: mqtt.Client, _u: Any, flags: Any, reason: Any, _props: Any) -> None:
        o = self.opts
        if reason.is_failure:
            self._error(f"broker {o.host}:{o.port} refused the connection: {reason}")
            return
        self.connected = True
        self.connects += 1
        self.last_error = None
        resumed = " (session resumed)" if getattr(flags, "session_present", False) else ""
        self.note(f"connected to {o.host}:{o.port}{resumed}")
        client.subscribe(o.topic, qos=1)

    def _on_connect_fail(self, _client: mqtt.Client, _u: Any) -> None:
        # paho calls this inside its ``except OSError``: the exception says why (refused,
        # unreachable, a certificate the CA does not vouch for...).
        why = sys.exc_info()[1]
        self._error(f"cannot connect to {self.opts.host}:{self.opts.port}" + (f": {why}" if why else ""), "; retrying")

    def _on_disconnect(self, _client: mqtt.Client, _u: Any, _flags: Any, reason: Any, _props: Any) -> None:
        was = self.connected
        self.connected = False
        self.subscribed.clear()
        if was and not self.stopping:
            self._error(f"connection to {self.opts.host}:{self.opts.port} lost ({reason})", "; reconnecting")

    def _on_subscribe(self, _client: mqtt.Client, _u: Any, _mid: int, reasons: list[Any], _props: Any) -> None:
        if any(r.is_failure for r in reasons):
            self._error(f"the broker refused the subscription to {self.opts.topic} ({reasons[0]})")
            return
        self.note(f"subscribed to {self.opts.topic} (QoS 1)")
        self.subscribed.set()

    def _on_message(self, _client: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        content_type = getattr(msg.properties, "ContentType", None) if msg.properties is not None else None
        readings = self.watcher.on_payload(msg.topic, msg.payload, content_type, retained=bool(msg.retain))
        if readings and self.on_readings is not None:
            self.on_readings(readings)

    def _error(self, text: str, then: str = "") -> None:
        """Note a problem, once while it stays the same (paho retries every few seconds)."""
        if text != self.last_error:
            self.note(text + then)
        self.last_error = text

