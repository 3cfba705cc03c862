"""What a broker takes: message size limits, and whether a lost connection was a message's doing.

A reading that can never be delivered is rejected (agent/uplink/outcome.py: set aside, deleted
and announced by a ``data_dropped`` alarm) so that its stream moves on instead of re-sending it
forever:

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
  (``KILL_STRIKES_CLOSE`` when it is less than twice that size). (An MQTT 5 broker that
  refuses a single reading with "Payload format invalid" also rejects it, as
  ``undeliverable``: agent/uplink/outcome.py.)

A broker that is down, slow or flapping never causes this: a failed connection attempt, a
keepalive timeout, a loss long after the send or before the broker took our ``online``, a
broker shutting down (MQTT 5) resets the count, and a reading no larger than what already got
through is never set aside.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from paho.mqtt.properties import Properties

from agent.uplink.outbox import Batch
from agent.uplink.outcome import TOO_LARGE, Verdict, rejected

log = logging.getLogger(__name__)

# Fixed header (≤ 5) + topic length (2) + packet id (2) + properties (≤ 40 with a content type).
PUBLISH_OVERHEAD = 49
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
MESSAGE_FAULTS = frozenset({"Unspecified error", "Protocol error", "Packet too large", "Malformed packet",
                            "Implementation specific error", "Payload format invalid", "Topic Name invalid"})
LEARNED_HOLD_S = 300.0
"""A message cap learned from lost connections is doubled after this long without another
(a flaky link can look like a small broker for a while; a real limit is found again)."""


class Deliverability:
    """Per uplink, across its connections; driven by the uplink thread only."""

    def __init__(self, max_message_bytes: int, topic_bytes: int, *, on_limit: Callable[[int], None],
                 on_error: Callable[[str], None]):
        self.config_max = max_message_bytes
        self.topic_bytes = topic_bytes
        """The longest stream topic, in bytes (the MQTT 5 packet margin)."""
        self._on_limit = on_limit
        self._on_error = on_error
        self.max_payload = max_message_bytes
        """The batching target: config, the broker's Maximum Packet Size, what was learned."""
        self.broker_max_packet: int | None = None
        self.largest_acked = 0
        """Largest packet this broker acknowledged since start: what it certainly accepts."""
        self.learned_max: int | None = None
        """Payload cap learned from connections lost right after big batches (MQTT 3.1.1)."""
        self.learned_at = 0.0
        self.suspect: int | None = None
        """First row id of the message last blamed for a lost connection."""
        self.strikes = 0
        self.lone_strikes = 0
        self.probe = 0
        """Acknowledgements to wait for one message at a time, after a suspicious loss."""

    # -- limits ------------------------------------------------------------------------------

    def connected(self, broker_max_packet: int | None) -> None:
        """A CONNACK: the broker's Maximum Packet Size (MQTT 5), or None."""
        self.broker_max_packet = broker_max_packet
        self.apply_limits()

    def too_large(self, payload_bytes: int, packet_bytes: int) -> str | None:
        """Why a message can never be sent as it is, or None."""
        broker = self.broker_max_packet
        if broker and packet_bytes > broker:
            return f"{packet_bytes}-byte packet, over the broker's Maximum Packet Size of {broker}"
        if payload_bytes > self.config_max:
            return f"{payload_bytes}-byte message, over [mqtt] max_message_bytes = {self.config_max}"
        return None

    def refused_as_too_large(self, payload_bytes: int) -> None:
        """A message of several readings was refused as too large: split from now on."""
        self._learn(max(1, payload_bytes // 2))

    def relax(self) -> None:
        """Double a learned cap that has held for a while (gone once back at the config's)."""
        if self.learned_max is None or time.monotonic() - self.learned_at < LEARNED_HOLD_S:
            return
        self.learned_max *= 2
        self.learned_at = time.monotonic()
        if self.learned_max >= self.config_max:
            self.learned_max = None
        log.info("MQTT: message cap raised to %s bytes", self.learned_max or self.config_max)
        self.apply_limits()

    def apply_limits(self) -> None:
        limit = self.config_max
        if self.broker_max_packet:  # MQTT 5: never send a packet the broker would disconnect us for
            limit = min(limit, self.broker_max_packet - PUBLISH_OVERHEAD - self.topic_bytes - 16)
        limit = max(256, limit)
        if self.learned_max is not None:
            limit = min(limit, self.learned_max)
        self.max_payload = limit
        self._on_limit(limit)

    def _learn(self, cap: int) -> None:
        self.learned_max = cap
        self.learned_at = time.monotonic()
        self.apply_limits()

    # -- answers and losses ------------------------------------------------------------------

    def acked(self, packet_bytes: int) -> None:
        self.largest_acked = max(self.largest_acked, packet_bytes)

    def answered(self) -> None:
        """The broker answered a message (the connection survived it)."""
        if self.probe:
            self.probe -= 1

    def clear(self) -> None:
        """Nothing to blame on a message (the broker is away, or the loss was not one)."""
        self.strikes = self.lone_strikes = self.probe = 0

    def judge_loss(self, oldest: tuple[Batch, float, int, int] | None, inflight: int, reason: str | None,
                   status_acked: bool, rtt_s: float | None) -> Verdict | None:
        """The connection ended: was it the oldest message in flight that killed it?
        ``oldest``: (batch, monotonic send time, packet bytes, payload bytes). Returns the
        rejection of a reading found undeliverable, else None."""
        # A connection on which the broker never took our status message is not one a
        # message of ours can be blamed for (a refused topic prefix, a broker in trouble).
        if oldest is None or reason not in MESSAGE_FAULTS or not status_acked:
            self.clear()
            return None
        batch, sent_at, packet, payload = oldest
        window = KILL_WINDOW_S if rtt_s is None else min(KILL_WINDOW_S, max(0.5, 4 * rtt_s))
        if time.monotonic() - sent_at > window:
            self.clear()
            return None
        if inflight > 1:
            # Several in flight: the oldest may have been acknowledged in the packets the reset
            # lost. Blame nothing yet; next time they go one at a time.
            self.probe = inflight + 1
            self.strikes = self.lone_strikes = 0
            self.suspect = None
            return None
        self.probe = max(self.probe, 2)
        same = batch.ids[0] == self.suspect
        self.suspect = batch.ids[0]
        self.strikes = self.strikes + 1 if same else 1
        # A single reading needs strikes of its own, alone in its message.
        self.lone_strikes = (self.lone_strikes + 1 if same else 1) if batch.count == 1 else 0
        if reason == TOO_LARGE:  # an MQTT 5 broker said so: no need to see it again
            self.strikes = max(self.strikes, KILL_STRIKES)
            self.lone_strikes = KILL_STRIKES if batch.count == 1 else 0
        if batch.count > 1:
            # Only a message bigger than anything the broker took can be too big for it.
            if self.strikes >= KILL_STRIKES and packet > self.largest_acked:
                self._learn(max(1, payload // 2))
                log.warning("MQTT: the connection was lost %d times right after a %d-byte message of %d %s "
                            "readings: messages capped at %d bytes from now on", self.strikes, payload,
                            batch.count, batch.stream, self.learned_max)
            return None
        # Only a reading bigger than anything the broker took can be too big for it; one not
        # much bigger must be blamed longer (a flaky link also drops connections at sends).
        if packet <= self.largest_acked:
            if self.lone_strikes >= KILL_STRIKES:
                self._on_error(f"connection lost {self.lone_strikes} times right after a {batch.stream} reading, "
                               f"but the broker took bigger messages ({self.largest_acked} bytes): kept, the link "
                               "is to blame")
            return None
        needed = KILL_STRIKES if packet >= 2 * self.largest_acked or reason == TOO_LARGE else KILL_STRIKES_CLOSE
        if self.lone_strikes < needed:
            return None
        strikes = self.lone_strikes
        self.strikes = self.lone_strikes = 0
        self.suspect = None
        return rejected("too_large" if reason == TOO_LARGE else "undeliverable",
                        f"the broker closed the connection each time it was sent ({strikes} connections in a row, "
                        f"{packet}-byte packet; the largest it took: {self.largest_acked})")


def packet_size(topic: str, payload: bytes, props: Properties | None, v5: bool) -> int:
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
