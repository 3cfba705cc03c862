"""The remote command channel: authenticated commands in, signed replies out (docs/commands.md).

A command is a JSON object on ``{prefix}/{device}/cmd``::

    {"id": "c-81", "cmd": "ping", "args": {}, "ts": "2026-11-24T10:00:00.000Z",
     "nonce": "9f2c…", "hmac": "<HMAC-SHA256 hex>"}

``hmac`` is HMAC-SHA256, with the per-device key, over the RFC 8785 canonical JSON of the
object without ``hmac`` (the same canonical form as the event chain). It is accepted only if
the HMAC is right, ``ts`` is within ``window_s`` of the device's trusted time, and the nonce
was not used in that window (a captured command cannot be replayed). Every command gets a
reply on ``.../cmd/reply`` with the same ``id``, signed the same way.

Replays across restarts: the nonces used within the window are kept in a small record file
next to the store (``<store>.commands``), written and fsynced before the command's action
runs. When that record is missing or damaged at start, the used nonces are unknown, so every
command signed before the agent started is refused (see ``NonceRecord``).

Nothing a message contains may raise out of ``handle``: whatever arrives (binary, huge,
nested 100,000 deep, wrong types anywhere) gets a signed refusal.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import logging
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.model.chain import canonical
from agent.model.clock import TimeKeeper
from agent.model.durablefile import replace_durably
from agent.model.reading import iso_ms

log = logging.getLogger(__name__)

Action = Callable[[dict[str, Any]], dict[str, Any]]
MAX_NONCES = 1_000
"""Commands accepted within one window (default 300 s): bounds memory and the record file."""
MAX_COMMAND_BYTES = 16 * 1024
"""A command is a few hundred bytes; anything bigger is refused before it is parsed."""
MAX_DEPTH = 32
"""JSON nesting allowed in a command (``args`` holds flat values)."""
MAX_RECORD_BYTES = 1024 * 1024
RECORD_VERSION = 1
_MAX_ID = 128
_MAX_REASON = 300
_MAX_KINDS = 32


class CommandError(Exception):
    """A command refused, with the reason sent back in the reply."""


class NonceRecord:
    """The nonces used within the window, on disk, so a replay is refused after a restart.

    The file (JSON with a SHA-256 of its own content) holds ``nonces`` (nonce → the command's
    ts in ms) and ``floor``: commands signed before it are refused. It is replaced atomically
    and fsynced (file and folder) before an accepted command's action runs, so a power cut
    leaves the old or the new record, never one without a nonce whose action ran.

    A record that is missing, unreadable, damaged or fails its checksum is unusable: the
    nonces used before are unknown. Then ``floor`` becomes the agent's start (in trusted time)
    and is kept in the record until it is older than the window: a command signed before
    this start cannot be told from a replay and is refused; one signed after it cannot have
    been used before this start, and this run's nonces are remembered. A captured command
    can therefore never replay, even when the record was lost."""

    def __init__(self, path: Path | None):
        self.path = path
        self.nonces: dict[str, int] = {}
        self.floor: int | None = None
        self.unusable: str | None = None
        """Why the record could not be used at start (None: read, or kept in memory only)."""
        self.write_errors = 0
        if path is not None:
            self._load(path)

    def _load(self, path: Path) -> None:
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_RECORD_BYTES + 1)
        except FileNotFoundError:
            self.unusable = "missing"
            return
        except OSError as e:
            self.unusable = f"unreadable ({e.strerror or e})"
        else:
            try:
                self.nonces, self.floor = _parse_record(raw)
                return
            except (ValueError, TypeError, KeyError, RecursionError) as e:
                self.unusable = f"damaged ({e})"
        log.error("command record %s is %s: commands signed before this start will be refused",
                  path, self.unusable)

    def save(self) -> None:
        """Replace the file atomically and fsync it; raises OSError when that fails."""
        if self.path is None:
            return
        body = {"version": RECORD_VERSION, "floor": self.floor, "nonces": self.nonces}
        data = json.dumps({**body, "sha256": _digest(body)}, separators=(",", ":")).encode()
        try:
            replace_durably(self.path, data)
        except OSError:
            self.write_errors += 1
            raise


def _digest(body: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(body).encode()).hexdigest()


def _parse_record(raw: bytes) -> tuple[dict[str, int], int | None]:
    if len(raw) > MAX_RECORD_BYTES:
        raise ValueError("too large")
    data = json.loads(raw)
    if not isinstance(data, dict) or data.get("version") != RECORD_VERSION:
        raise ValueError("not a version 1 record")
    body = {k: v for k, v in data.items() if k != "sha256"}
    if data.get("sha256") != _digest(body):
        raise ValueError("checksum mismatch")
    nonces, floor = data["nonces"], data["floor"]
    if not isinstance(nonces, dict) or not all(
            isinstance(k, str) and type(v) is int for k, v in nonces.items()):
        raise ValueError("nonces must map strings to integers")
    if floor is not None and type(floor) is not int:
        raise ValueError("floor must be an integer")
    return nonces, floor


class CommandHandler:
    def __init__(self, device: str, key: bytes, clock: TimeKeeper, actions: dict[str, Action],
                 window_s: float = 300, state_path: Path | None = None):
        """``state_path``: the nonce record (``<store>.commands``); None keeps nonces in
        memory only (a restart forgets them: for tests of other things)."""
        self.device = device
        self.key = key
        self.clock = clock
        self.actions = actions
        self.window_ms = int(window_s * 1000)
        self.record = NonceRecord(state_path)
        self._started_mono = clock.mono_now()
        self._need_floor = self.record.unusable is not None
        self._lock = threading.Lock()
        self.accepted = 0
        self.rejected: dict[str, int] = {}

    def handle(self, payload: bytes | bytearray | str) -> dict[str, Any]:
        """The signed reply to one command message, whatever it contains; never raises."""
        with self._lock:
            try:
                return self._handle(payload)
            except Exception as e:  # noqa: BLE001 - a reply, never an exception into paho
                log.exception("command handling failed")
                self._count("internal error")
                return self._sign({"id": None, "ok": False, "error": f"internal error: {type(e).__name__}"})

    def _handle(self, payload: bytes | bytearray | str) -> dict[str, Any]:
        command_id = None
        try:
            obj = _parse(payload)
            command_id = _reply_id(obj.get("id"))
            nonce, ts = self._authenticate(obj)
            cmd = obj.get("cmd")
            action = self.actions.get(cmd) if isinstance(cmd, str) else None
            if action is None:
                raise CommandError(f"unknown command {_short(cmd)}; known: {', '.join(sorted(self.actions))}")
            args = obj.get("args")
            if args is None:
                args = {}
            if not isinstance(args, dict):
                raise CommandError("args must be an object")
            self._remember(nonce, ts)  # on disk before anything is done
            try:
                result = action(args)
            except CommandError:
                raise
            except Exception as e:  # noqa: BLE001 - an action's failure is the command's answer
                log.exception("command %s (%s) failed", cmd, command_id)
                raise CommandError(f"failed: {type(e).__name__}: {e}") from None
            self.accepted += 1
            log.info("command %s (%s) done", cmd, command_id)
            return self._sign({"id": command_id, "ok": True, "result": result})
        except CommandError as e:
            reason = str(e)[:_MAX_REASON]
            self._count(reason)
            log.warning("command %s refused: %s", command_id, reason)
            return self._sign({"id": command_id, "ok": False, "error": reason})

    def _count(self, reason: str) -> None:
        kind = re.split(r"[:'(;,]", reason, maxsplit=1)[0].strip()[:40] or "other"
        if kind not in self.rejected and len(self.rejected) >= _MAX_KINDS:
            kind = "other"
        self.rejected[kind] = self.rejected.get(kind, 0) + 1

    def _authenticate(self, obj: dict[str, Any]) -> tuple[str, int]:
        mac = obj.get("hmac")
        if not isinstance(mac, str):
            raise CommandError("not signed")
        body = {k: v for k, v in obj.items() if k != "hmac"}
        try:
            data = canonical(body).encode()
        except (ValueError, TypeError, OverflowError, RecursionError) as e:
            raise CommandError(f"malformed: cannot be canonicalised ({type(e).__name__})") from None
        want = hmac.new(self.key, data, hashlib.sha256).hexdigest()
        if not (mac.isascii() and hmac.compare_digest(want, mac)):
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
        floor = self._floor(now)
        if floor is not None and ts < floor:
            raise CommandError(
                f"replayed? signed before the agent started ({iso_ms(floor)}) and the record of used "
                f"nonces was {self.record.unusable or 'lost'}: send it again with the current time")
        if nonce in self.record.nonces:
            raise CommandError("replayed: this nonce was already used")
        return nonce, ts

    def _floor(self, now: int) -> int | None:
        """Commands signed before this are refused (only after the record was unusable)."""
        record = self.record
        if self._need_floor:
            start = self.clock.stamp(self._started_mono).ts_ms
            if start is None:  # cannot happen once ``now`` is known; be safe anyway
                raise CommandError("no trusted time on the device yet: cannot check the command's age")
            record.floor = max(record.floor or start, start)
            self._need_floor = False
        if record.floor is not None and now - record.floor > self.window_ms:
            record.floor = None  # every command signed before it is outside the window anyway
        return record.floor

    def _remember(self, nonce: str, ts: int) -> None:
        """Record the nonce, on disk (fsynced) before the command's action runs."""
        now = self.clock.stamp().ts_ms or ts
        nonces = self.record.nonces
        # Only past entries expire: a future ts could come within the window again.
        for n in [n for n, t in nonces.items() if now - t > self.window_ms]:
            del nonces[n]
        if len(nonces) >= MAX_NONCES:
            raise CommandError(f"too many commands in the time window (at most {MAX_NONCES})")
        nonces[nonce] = ts
        try:
            self.record.save()
        except OSError as e:
            del nonces[nonce]  # its action will not run: nothing to protect
            raise CommandError(f"cannot record the nonce ({e.strerror or e}): not run, so it cannot be "
                               "replayed") from None

    def _sign(self, reply: dict[str, Any]) -> dict[str, Any]:
        now = self.clock.stamp().ts_ms
        reply = {**reply, "device": self.device, "ts": iso_ms(now) if now is not None else None}
        try:
            data = canonical(reply).encode()
        except (ValueError, TypeError, OverflowError, RecursionError):
            # An action returned something that is not JSON: say so, signed.
            reply = {"id": reply.get("id"), "ok": False, "error": "internal error: the result is not JSON",
                     "device": self.device, "ts": reply["ts"]}
            data = canonical(reply).encode()
        reply["hmac"] = hmac.new(self.key, data, hashlib.sha256).hexdigest()
        return reply


def _parse(payload: bytes | bytearray | str) -> dict[str, Any]:
    """The command object, or CommandError; size and nesting are checked before parsing."""
    if isinstance(payload, str):
        payload = payload.encode("utf-8", "surrogatepass")
    elif not isinstance(payload, (bytes, bytearray)):
        raise CommandError(f"malformed: a {type(payload).__name__}, not bytes")
    if len(payload) > MAX_COMMAND_BYTES:
        raise CommandError(f"too large: {len(payload)} bytes (at most {MAX_COMMAND_BYTES})")
    if _depth(payload) > MAX_DEPTH:
        raise CommandError(f"malformed: nested deeper than {MAX_DEPTH} levels")
    try:
        obj = json.loads(bytes(payload).decode("utf-8"), object_pairs_hook=_no_duplicates,
                         parse_constant=_no_constant)
    except UnicodeDecodeError as e:
        raise CommandError(f"malformed: not UTF-8 (byte {e.start})") from None
    except (ValueError, RecursionError) as e:
        raise CommandError(f"malformed: {str(e)[:120]}") from None
    if not isinstance(obj, dict):
        raise CommandError("not a JSON object")
    return obj


def _depth(payload: bytes | bytearray) -> int:
    """The deepest nesting of arrays and objects, ignoring brackets inside strings."""
    deepest = depth = 0
    in_string = escaped = False
    for b in payload:
        if in_string:
            if escaped:
                escaped = False
            elif b == 0x5C:  # backslash
                escaped = True
            elif b == 0x22:  # quote
                in_string = False
        elif b == 0x22:
            in_string = True
        elif b in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > MAX_DEPTH:
                    return deepest
        elif b in (0x5D, 0x7D):
            depth -= 1
    return deepest


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("a key appears twice")
    return obj


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _reply_id(value: Any) -> str | None:
    """The command's id, echoed when it is a string that can be (short, valid Unicode)."""
    if not isinstance(value, str) or len(value) > _MAX_ID:
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _parse_ts(value: Any) -> int:
    if not isinstance(value, str) or len(value) > 40:
        raise CommandError("ts must be an ISO 8601 UTC time")
    try:
        t = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        if t.tzinfo is None:
            raise CommandError("ts must say its time zone (Z)")
        return int(t.timestamp() * 1000)
    except (ValueError, OverflowError, OSError):
        raise CommandError(f"ts is not an ISO 8601 time: {_short(value)}") from None


def sign_command(key: bytes, command: dict[str, Any]) -> dict[str, Any]:
    """What a backend does before sending (used by tests and tools)."""
    body = {k: v for k, v in command.items() if k != "hmac"}
    return {**body, "hmac": hmac.new(key, canonical(body).encode(), hashlib.sha256).hexdigest()}
