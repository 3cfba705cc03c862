"""A fresh paho client for one connection, set up from ``[mqtt]``: protocol, Last Will,
credentials, TLS. (The uplink makes one per connection: agent/uplink/mqtt.py says why.)"""

from __future__ import annotations

import logging
import ssl

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from agent.config import Config
from agent.model.secrets import read_secret


def new_client(config: Config, *, will: tuple[str, bytes]) -> mqtt.Client:
    """The client, not connected; ``will``: the Last Will's topic and payload (QoS 1, retained)."""
    m = config.mqtt
    v5 = m.protocol == "5"
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=config.client_id,
        protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
        clean_session=None if v5 else True,
        reconnect_on_failure=False,
    )
    client.enable_logger(logging.getLogger("paho"))
    client.max_inflight_messages_set(m.max_inflight + 1)  # +1: the status message
    client.will_set(will[0], will[1], qos=1, retain=True)
    if m.username is not None:
        client.username_pw_set(m.username, password(config))
    if m.tls is not None:
        client.tls_set(
            ca_certs=str(m.tls.ca_file),
            certfile=str(m.tls.cert_file) if m.tls.cert_file else None,
            keyfile=str(m.tls.key_file) if m.tls.key_file else None,
            cert_reqs=ssl.CERT_REQUIRED,
            tls_version=ssl.PROTOCOL_TLS_CLIENT,
        )
        client.tls_insecure_set(m.tls.insecure_skip_hostname)
    return client


def password(config: Config) -> str | None:
    path = config.mqtt.password_file
    if path is None:
        return None
    # Read at each connection so a rotated password is picked up without a restart.
    text = read_secret(path).decode("utf-8")
    return text.splitlines()[0] if text else ""
