"""How a batch handed from the store to the uplink ends: accepted, kept or rejected.

Telegraf's output buffer is the model: every batch a transport takes from the outbox ends in
exactly one explicit outcome, never inferred from silence.

* **accepted**: the broker acknowledged it (QoS 1 PUBACK, reason below 0x80; ``0x10`` No
  matching subscribers included: the broker has it). The rows are deleted (``Store.ack``).
* **kept**: the rows stay in the store, due again: *at once* in smaller messages when the
  refusal was about the message's size or content and it held several readings, or *later*
  (the stream waits, capped jittered backoff from ``[mqtt] reconnect_min_s`` to
  ``reconnect_max_s``; the other streams go on) when the refusal is about the topic, the
  client's rights or the broker's state. Every reading of the stream would meet such a
  refusal, and the remedy is on the broker's side; set aside, a whole stream would be thrown
  away one batch at a time. Kept rows still count against ``[store] max_mb`` /
  ``max_age_days``, so a refusal that lasts ends in the store's usual, announced shedding.
* **rejected**: a single reading the broker can never take, set aside for good
  (``Store.set_aside``: deleted, announced by a ``data_dropped`` alarm) so its stream moves on.

MQTT 5 PUBACK reason codes (MQTT 3.1.1 has none: a refused message is acknowledged and
discarded by the broker, mosquitto included):

* 0x00 Success, 0x10 No matching subscribers: accepted.
* 0x95 Packet too large: several readings kept, at once, every message from now on capped at
  half its size; a single reading rejected as ``too_large``. (Not a PUBACK code in MQTT 5:
  mosquitto sends it for ``message_size_limit``, and paho 2 drops the connection on it as a
  protocol error, so there the lost-connection rule applies instead.)
* 0x99 Payload format invalid: several readings kept, at once, the stream's next message
  half as many; a single reading rejected as ``undeliverable``.
* 0x87 Not authorized, 0x90 Topic Name invalid, 0x97 Quota exceeded, 0x80 Unspecified error,
  0x83 Implementation specific error, 0x91 Packet Identifier in use, any other failure: kept,
  later.

A reading that cannot be sent at all is rejected before it is (``too_large``: over the
broker's Maximum Packet Size or ``[mqtt] max_message_bytes``), and one the broker closes the
connection on each time is rejected as ``undeliverable`` (agent/uplink/deliverability.py).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Outcome(enum.Enum):
    ACCEPTED = "accepted"
    KEPT = "kept"
    REJECTED = "rejected"


@dataclass(frozen=True, slots=True)
class Verdict:
    outcome: Outcome
    why: str = ""
    """The broker's reason, or ours; empty when accepted."""
    later: bool = False
    """Kept: retry after a delay, the stream waiting (else at once)."""
    split: bool = False
    """Kept at once: in smaller messages."""
    dropped_as: str = ""
    """Rejected: the ``data_dropped`` reason (``too_large``, ``undeliverable``)."""


ACCEPTED = Verdict(Outcome.ACCEPTED)

TOO_LARGE = "Packet too large"
PAYLOAD_INVALID = "Payload format invalid"
ABOUT_THE_MESSAGE = {TOO_LARGE: "too_large", PAYLOAD_INVALID: "undeliverable"}
"""Refusals of a message's size or content (reason name → ``data_dropped`` reason for a
single reading); every other failure is about the topic, the client or the broker's state."""


def rejected(dropped_as: str, why: str) -> Verdict:
    return Verdict(Outcome.REJECTED, why, dropped_as=dropped_as)


def of_puback(failed: bool, reason: str, count: int) -> Verdict:
    """The outcome of a PUBACK: ``failed`` (reason code >= 0x80) with the reason's name, for a
    message of ``count`` readings."""
    if not failed:
        return ACCEPTED
    why = f"the broker refused it: {reason}"
    dropped_as = ABOUT_THE_MESSAGE.get(reason)
    if dropped_as is None:
        return Verdict(Outcome.KEPT, why, later=True)
    if count > 1:
        return Verdict(Outcome.KEPT, why, split=True)
    return rejected(dropped_as, why)
