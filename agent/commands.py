"""The remote command channel: authenticated commands in, signed replies out (docs/commands.md).

A command is a JSON object on ``{prefix}/{device}/cmd``::

    {"id": "c-81", "cmd": "ping", "args": {}, "ts": "2026-11-24T10:00:00.000Z",
     "nonce": "9f2c…", "hmac": "<HMAC-SHA256 hex>"}

``hmac`` is HMAC-SHA256, with the per-device key, over the RFC 8785 canonical JSON of the
object without ``hmac`` (the same canonical form as the event chain). It is accepted only if
the HMAC is right, ``ts`` is within ``window_s`` of the device's trusted time, and the nonce
was not used in that window (a captured command cannot be replayed). Every command gets a
reply on ``.../cmd/reply`` with the same ``id``, signed the same way.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import logging
from collections.abc import Callable
from typing import Any

from agent.chain import canonical
from agent.clock import TimeKeeper
from agent.reading import iso_ms

log = logging.getLogger(__name__)

Action = Callable[[dict[str, Any]], dict[str, Any]]
MAX_NONCES = 10_000


class CommandError(Exception):
    """A command refused, with the reason sent back in the reply."""


class CommandHandler:
    def __init__(self, device: str, key: bytes, clock: TimeKeeper, actions: dict[str, Action],
                 window_s: float = 300):
        self.device = device
        self.key = key
        self.clock = clock
        self.actions = actions
        self.window_ms = int(window_s * 1000)
        self._nonces: dict[str, int] = {}
        self.accepted = 0
        self.rejected: dict[str, int] = {}

    def handle(self, payload: bytes) -> dict[str, Any]:
        """The signed reply to one command message, whatever it contains."""
        command_id = None
        try:
            obj = json.loads(payload)
            if not isinstance(obj, dict):
                raise CommandError("not a JSON object")
            command_id = obj.get("id") if isinstance(obj.get("id"), str) else None
            self._authenticate(obj)
            action = self.actions.get(obj.get("cmd"))
            if action is None:
                raise CommandError(f"unknown command {obj.get('cmd')!r}; known: {', '.join(sorted(self.actions))}")
            args = obj.get("args") or {}
            if not isinstance(args, dict):
                raise CommandError("args must be an object")
            result = action(args)
            self.accepted += 1
            log.info("command %s (%s) done", obj.get("cmd"), command_id)
            return self._sign({"id": command_id, "ok": True, "result": result})
        except (CommandError, ValueError, TypeError, KeyError) as e:
            reason = str(e) if isinstance(e, CommandError) else f"malformed: {e}"
            self.rejected[reason.split(":")[0]] = self.rejected.get(reason.split(":")[0], 0) + 1
            log.warning("command %s refused: %s", command_id, reason)
            return self._sign({"id": command_id, "ok": False, "error": reason})

    def _authenticate(self, obj: dict[str, Any]) -> None:
        mac = obj.get("hmac")
        if not isinstance(mac, str):
            raise CommandError("not signed")
        body = {k: v for k, v in obj.items() if k != "hmac"}
        want = hmac.new(self.key, canonical(body).encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(want, mac):
            raise CommandError("authentication failed")
        now = self.clock.stamp().ts_ms
        if now is None:
            raise CommandError("no trusted time on the device yet: cannot check the command's age")
        ts = _parse_ts(obj.get("ts"))
        if abs(now - ts) > self.window_ms:
            raise CommandError(f"outside the time window: ts is {(ts - now) / 1000:+.0f} s from the device's time")
        nonce = obj.get("nonce")
        if not isinstance(nonce, str) or not 8 <= len(nonce) <= 64:
            raise CommandError("nonce must be a string of 8 to 64 characters")
        self._forget_old(now)
        if nonce in self._nonces:
            raise CommandError("replayed: this nonce was already used")
        self._nonces[nonce] = ts

    def _forget_old(self, now: int) -> None:
        if len(self._nonces) > MAX_NONCES // 2:
            self._nonces = {n: t for n, t in self._nonces.items() if abs(now - t) <= self.window_ms}
        if len(self._nonces) >= MAX_NONCES:
            raise CommandError("too many commands in the time window")

    def _sign(self, reply: dict[str, Any]) -> dict[str, Any]:
        now = self.clock.stamp().ts_ms
        reply = {**reply, "device": self.device, "ts": iso_ms(now) if now is not None else None}
        reply["hmac"] = hmac.new(self.key, canonical(reply).encode(), hashlib.sha256).hexdigest()
        return reply


def _parse_ts(value: Any) -> int:
    if not isinstance(value, str):
        raise CommandError("ts must be an ISO 8601 UTC time")
    try:
        t = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise CommandError(f"ts is not an ISO 8601 time: {value!r}") from None
    if t.tzinfo is None:
        raise CommandError("ts must say its time zone (Z)")
    return int(t.timestamp() * 1000)


def sign_command(key: bytes, command: dict[str, Any]) -> dict[str, Any]:
    """What a backend does before sending (used by tests and tools)."""
    body = {k: v for k, v in command.items() if k != "hmac"}
    return {**body, "hmac": hmac.new(key, canonical(body).encode(), hashlib.sha256).hexdigest()}
