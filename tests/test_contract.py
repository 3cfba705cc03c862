"""The MQTT contract in machine-readable form: docs/asyncapi.yaml (AsyncAPI 3.0.0).

Three layers:

- the document itself: AsyncAPI 3 structure (channels, operations, references, bindings), its
  schemas well-formed, its own examples valid, and strict where the contract is strict;
- every message the real agent publishes, through a real mosquitto, on every channel of the
  document (GPS and CAN replays, scripted seals, a DS18B20 that goes missing and then
  overheats, a damaged store, health, the command channel, status and the Last Will), checked
  against the document as written (open: payloads may gain fields) and against a closed
  variant of it (every published field is documented);
- paths the run cannot reach cheaply (a reading without a trusted time, a data_dropped alarm)
  through the agent's own pipeline, store and outbox, in process.

There is no official AsyncAPI validator for Python; the structural checks are ours. The
payload schemas are validated with jsonschema's Draft 2020-12 validator, references resolved
inside the document through a `referencing` registry.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import os
import re
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml
from jsonschema import Draft7Validator, Draft202012Validator
from jsonschema.exceptions import ValidationError
from paho.mqtt.enums import CallbackAPIVersion
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

import canlog as cl
from agent import compact
from agent.compact.decoder import decode
from agent.demo import trip
from agent.demo.broker import Mosquitto
from agent.model.reading import Reading, iso_ms
from agent.uplink.commands import sign_command
from support import REPO, AgentProcess, Backend, agent_config, store_depth, wait_until

DOC_PATH = REPO / "docs" / "asyncapi.yaml"
BASE_URI = "urn:lorry-agent:asyncapi"
DEVICE = "CQ-HN-0042"
PREFIX = "lorry"
CHAIN_KEY = b"customs-transit-key-CQ-HN-0042\n"
COMMAND_KEY = b"command-key-for-CQ-HN-0042-0123456789"
SENSOR_ID = "28-0316a2795dff"
SCHEMA_KEYWORDS_WITH_SCHEMA = ("items", "additionalProperties", "not", "if", "then", "else", "contains",
                               "propertyNames")


# -- the document ---------------------------------------------------------------------------------


def load_doc() -> dict[str, Any]:
    return yaml.safe_load(DOC_PATH.read_text(encoding="utf-8"))


def deref(doc: dict[str, Any], node: Any) -> Any:
    """Follow internal ``$ref``s (``#/a/b``) until a node that is not a reference."""
    seen = set()
    while isinstance(node, dict) and "$ref" in node:
        ref = node["$ref"]
        assert ref.startswith("#/"), f"only internal references are used: {ref}"
        assert ref not in seen, f"reference loop at {ref}"
        seen.add(ref)
        node = pointer(doc, ref)
    return node


def pointer(doc: dict[str, Any], ref: str) -> Any:
    node: Any = doc
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict) and part in node, f"{ref}: no {part!r}"
        node = node[part]
    return node


def walk(node: Any, path: str = "#") -> Iterator[tuple[str, Any]]:
    """Every (JSON pointer, value) in the document."""
    yield path, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from walk(v, f"{path}/{str(k).replace('~', '~0').replace('/', '~1')}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk(v, f"{path}/{i}")


def address_regex(address: str) -> re.Pattern[str]:
    """``{prefix}/{device}/position`` → a regex with one named group per parameter."""
    parts = re.split(r"\{(\w+)\}", address)
    return re.compile("".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>[^/+#]+)" for i, p in enumerate(parts)) + r"\Z")


def close_objects(doc: dict[str, Any]) -> dict[str, Any]:
    """The document with every object schema closed (``unevaluatedProperties: false``), so a
    field the agent publishes that the document does not declare fails validation.

    Schemas that are parts of an ``allOf`` (the envelope, the chain fields…) stay open: each
    describes only some of an object's fields; the object they compose is closed instead, and
    ``unevaluatedProperties`` sees through ``allOf``, ``$ref`` and ``if``/``then``. Schemas that
    say what to do with other fields (``additionalProperties``: maps) are left alone."""
    doc = copy.deepcopy(doc)
    composed = {item["$ref"].rsplit("/", 1)[1] for _p, node in walk(doc) if isinstance(node, dict)
                for item in (node.get("allOf") if isinstance(node.get("allOf"), list) else [])
                if isinstance(item, dict) and "$ref" in item}
    for name, schema in doc["components"]["schemas"].items():
        _close(schema, part=name in composed)
    return doc


def _close(node: Any, part: bool = False) -> None:
    if not isinstance(node, dict):
        return
    types = node.get("type")
    is_object = types == "object" or (isinstance(types, list) and "object" in types)
    if (is_object and not part and ("properties" in node or "allOf" in node)
            and "additionalProperties" not in node and "unevaluatedProperties" not in node):
        node["unevaluatedProperties"] = False
    for key, value in list(node.items()):
        if key == "allOf":
            for item in value:
                _close(item, part=True)
        elif key in ("anyOf", "oneOf"):
            for item in value:
                _close(item)
        elif key in ("properties", "patternProperties"):
            for sub in value.values():
                _close(sub)
        elif key in SCHEMA_KEYWORDS_WITH_SCHEMA:
            _close(value)


class Contract:
    """The document's channels and message schemas, ready to validate received messages."""

    def __init__(self, doc: dict[str, Any], *, closed: bool = False):
        self.doc = close_objects(doc) if closed else doc
        resource = Resource.from_contents(self.doc, default_specification=DRAFT202012)
        self.registry = Registry().with_resource(BASE_URI, resource)
        self.addresses = {name: address_regex(ch["address"]) for name, ch in self.doc["channels"].items()}
        self._validators: dict[str, Draft202012Validator] = {}

    def channel_of(self, topic: str) -> tuple[str, dict[str, str]]:
        hits = [(name, m.groupdict()) for name, rx in self.addresses.items() if (m := rx.match(topic))]
        assert len(hits) == 1, f"topic {topic!r} matches {len(hits)} channels of the document (want exactly 1)"
        return hits[0]

    def message_refs(self, channel: str) -> list[str]:
        return [m["$ref"] for m in self.doc["channels"][channel]["messages"].values()]

    def validator(self, message_ref: str) -> Draft202012Validator:
        v = self._validators.get(message_ref)
        if v is None:
            v = Draft202012Validator({"$ref": f"{BASE_URI}{message_ref}/payload"}, registry=self.registry)
            self._validators[message_ref] = v
        return v

    def decode(self, message_ref: str, payload: bytes) -> Any:
        content_type = pointer(self.doc, message_ref).get("contentType", self.doc["defaultContentType"])
        text = payload.decode("utf-8")
        if content_type == "application/json":
            return json.loads(text, parse_constant=_no_nan)
        assert content_type == "text/plain", content_type
        return text

    def problems(self, channel: str, payload: bytes) -> list[str]:
        """Why ``payload`` matches none of the channel's messages ([] when it matches one).

        A compact message (docs/compact.md) must be offered by the channel, and each reading
        it carries must match the channel's JSON reading message, exactly as if sent alone."""
        if compact.is_compact(payload):
            refs = self.message_refs(channel)
            if "#/components/messages/compactBatch" not in refs:
                return [f"{channel}: a compact message on a channel that does not offer one"]
            try:
                readings = decode(payload)
            except compact.CompactError as e:
                return [f"compact: cannot decode: {e}"]
            return [p for r in readings for p in self.problems(channel, json.dumps(r).encode())]
        out = []
        for ref in self.message_refs(channel):
            if ref == "#/components/messages/compactBatch":
                continue
            try:
                value = self.decode(ref, payload)
            except ValueError as e:
                out.append(f"{ref}: cannot decode: {e}")
                continue
            found = self.value_problems(ref, value)
            if not found:
                return []
            out += [f"{ref}: {p}" for p in found]
        return out

    def value_problems(self, message_ref: str, value: Any) -> list[str]:
        return [p for e in self.validator(message_ref).iter_errors(value) for p in explain(e)]


def explain(error: ValidationError) -> list[str]:
    """An error in words; for a oneOf/anyOf that nothing matched, the errors of the closest
    branch (the one with fewest), so an alarm says what is wrong with it as its kind."""
    where = "/".join(map(str, error.absolute_path)) or "the root"
    if error.validator in ("oneOf", "anyOf") and error.context:
        branches: dict[Any, list[ValidationError]] = {}
        for sub in error.context:
            branches.setdefault(sub.relative_schema_path[0], []).append(sub)
        index, closest = min(branches.items(), key=lambda kv: len(kv[1]))
        return [f"no {error.validator} branch matches at {where}; closest (#{index}): {p}"
                for sub in closest for p in explain(sub)]
    return [f"{error.message} at {where}"]


def _no_nan(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return load_doc()


@pytest.fixture(scope="module")
def contract(doc: dict[str, Any]) -> Contract:
    return Contract(doc)


@pytest.fixture(scope="module")
def closed(doc: dict[str, Any]) -> Contract:
    return Contract(doc, closed=True)


def alarm_kinds(doc: dict[str, Any]) -> set[str]:
    """The ``kind`` of each branch of the alarm reading's oneOf."""
    kinds = set()
    for branch in doc["components"]["schemas"]["AlarmReading"]["oneOf"]:
        schema = deref(doc, branch)
        consts = [deref(doc, part).get("properties", {}).get("kind", {}).get("const") for part in schema["allOf"]]
        [kind] = [c for c in consts if c is not None]
        kinds.add(kind)
    return kinds


# -- the document's structure ---------------------------------------------------------------------


def test_document_is_structurally_asyncapi_3(doc: dict[str, Any]) -> None:
    assert doc["asyncapi"] == "3.0.0"
    assert isinstance(doc["info"]["title"], str) and isinstance(doc["info"]["version"], str)
    assert "agent" in doc["info"]["description"] and "Point of view" in doc["info"]["description"]
    assert doc["defaultContentType"] == "application/json"
    assert set(doc) <= {"asyncapi", "id", "info", "servers", "defaultContentType", "channels", "operations",
                        "components"}

    # Every internal reference resolves; AsyncAPI Reference Objects have no siblings.
    for path, node in walk(doc):
        if isinstance(node, dict) and "$ref" in node and isinstance(node["$ref"], str):
            assert set(node) == {"$ref"}, f"{path}: a $ref with siblings {sorted(set(node) - {'$ref'})}"
            deref(doc, node)

    # Servers: plain and TLS MQTT, variables in braces, the Last Will on the status topic.
    servers = doc["servers"]
    assert {s["protocol"] for s in servers.values()} == {"mqtt", "secure-mqtt"}
    status_address = doc["channels"]["status"]["address"]
    for name, server in servers.items():
        used = set(re.findall(r"\{(\w+)\}", server["host"]))
        assert used == set(server.get("variables", {})), f"servers.{name}: variables {used}"
        assert all(isinstance(v["default"], str) for v in server["variables"].values())
        will = server["bindings"]["mqtt"]["lastWill"]
        assert will == {"topic": status_address, "qos": 1, "message": "offline", "retain": True}
        for scheme in server.get("security", []):
            assert deref(doc, scheme)["type"] in ("X509", "userPassword")
    tls = next(s for s in servers.values() if s["protocol"] == "secure-mqtt")
    assert tls["variables"]["port"]["default"] == "8883"
    assert any(deref(doc, s)["type"] == "X509" for s in tls["security"]), "client certificates on the TLS server"

    # Channels: an address, parameters for exactly its {placeholders}, messages with payloads.
    channels = doc["channels"]
    streams = ["position", "seal", "alarm", "temperature", "can", "ignition", "health", "status", "cmd", "cmd/reply"]
    assert sorted(ch["address"] for ch in channels.values()) == sorted(f"{{prefix}}/{{device}}/{s}" for s in streams)
    for name, ch in channels.items():
        assert isinstance(ch["address"], str) and ch["messages"], f"channels.{name}"
        assert set(re.findall(r"\{(\w+)\}", ch["address"])) == set(ch["parameters"]) == {"prefix", "device"}
        for p in ch["parameters"].values():
            assert "description" in deref(doc, p)
        for key, msg in ch["messages"].items():
            assert msg["$ref"].startswith("#/components/messages/"), f"channels.{name}.messages.{key}"
            message = deref(doc, msg)
            assert "payload" in message and message.get("contentType") in ("application/json", "text/plain",
                                                                           "application/cbor")

    # Operations: from the agent's point of view; each refers to a channel of the document and
    # to messages of that very channel; QoS 1 everywhere.
    used_channels = set()
    for name, op in doc["operations"].items():
        assert op["action"] in ("send", "receive"), f"operations.{name}"
        ref = op["channel"]["$ref"]
        assert re.fullmatch(r"#/channels/[^/]+", ref) and ref.rsplit("/", 1)[1] in channels, f"operations.{name}: {ref}"
        used_channels.add(ref.rsplit("/", 1)[1])
        for m in op["messages"]:
            assert m["$ref"].startswith(ref + "/messages/"), f"operations.{name}: {m['$ref']} is not a message of {ref}"
            deref(doc, m)
        if "reply" in op:
            reply_ref = op["reply"]["channel"]["$ref"]
            assert reply_ref.rsplit("/", 1)[1] in channels
            used_channels.add(reply_ref.rsplit("/", 1)[1])
            for m in op["reply"]["messages"]:
                assert m["$ref"].startswith(reply_ref + "/messages/")
        binding = op["bindings"]["mqtt"]
        assert binding["qos"] == 1, f"operations.{name}: QoS 1"
        if op["action"] == "send":
            assert isinstance(binding["retain"], bool)
    assert used_channels == set(channels), f"channels no operation uses: {set(channels) - used_channels}"
    received = {deref(doc, op["channel"])["address"] for op in doc["operations"].values() if op["action"] == "receive"}
    assert received == {"{prefix}/{device}/cmd"}, "the agent receives commands only; it sends everything else"
    retained = {deref(doc, op["channel"])["address"] for op in doc["operations"].values()
                if op["bindings"]["mqtt"].get("retain")}
    assert retained == {status_address}

    # Schemas: valid for draft 7 (what AsyncAPI 3's Schema Object extends) and 2020-12 (what we
    # validate with).
    for schema in doc["components"]["schemas"].values():
        Draft7Validator.check_schema(schema)
        Draft202012Validator.check_schema(schema)
    assert alarm_kinds(doc) == {"dtc", "temperature", "sensor_lost", "seal_opened", "seal_cut", "seal_battery_low",
                                "geofence", "data_dropped", "store_damaged"}


def test_the_documents_examples_match_its_schemas(doc: dict[str, Any], contract: Contract, closed: Contract) -> None:
    count = 0
    for name, message in doc["components"]["messages"].items():
        assert message.get("examples"), f"message {name} has examples"
        for example in message["examples"]:
            ref = f"#/components/messages/{name}"
            assert contract.value_problems(ref, example["payload"]) == [], f"{name} example {example['name']}"
            assert closed.value_problems(ref, example["payload"]) == [], \
                f"{name} example {example['name']}: undeclared field"
            count += 1
    assert count >= 20


def _position(**change: Any) -> dict[str, Any]:
    base = {"device": DEVICE, "stream": "position", "seq": 3, "ts": "2026-11-21T08:42:10.000Z",
            "lat": 23.9, "lon": 108.1, "speed_kmh": 74.08, "course": 178.6, "alt_m": None, "sats": 14, "hdop": 0.8,
            "fix": "gps"}
    return {k: v for k, v in (base | change).items() if v is not ...}


@pytest.mark.parametrize(("message", "value", "valid"), [
    ("position", _position(), True),
    ("position", [_position(seq=1), _position(seq=2)], True),
    ("position", _position(ts_trusted=False), True),
    ("position", _position(heading_src="imu"), True),  # new optional fields may appear
    ("position", _position(lat=...), False),  # required
    ("position", _position(ts="2026-11-21T08:42:10Z"), False),  # milliseconds, always
    ("position", _position(ts="2026-11-21T08:42:10.000+00:00"), False),
    ("position", _position(seq=0), False),
    ("position", _position(ts_trusted=True), False),  # absent, or false
    ("position", _position(fix="3d"), False),
    ("position", _position(stream="can"), False),
    ("position", _position(device="CQ/HN"), False),
    ("position", [], False),
    ("position", [_position(), {"device": DEVICE, "stream": "can", "seq": 1, "ts": "2026-11-21T08:42:10.000Z",
                                "values": [{"name": "x", "spn": 1, "value": 1, "unit": "", "sa": 0}]}], False),
    ("temperature", {"device": DEVICE, "stream": "temperature", "seq": 1, "ts": "2026-11-21T08:42:10.000Z",
                     "sensor": "reefer_front", "c": None, "error": None}, False),  # null needs a reason
    ("temperature", {"device": DEVICE, "stream": "temperature", "seq": 1, "ts": "2026-11-21T08:42:10.000Z",
                     "sensor": "reefer_front", "c": 4.0, "error": "crc"}, False),
    ("alarm", {"device": DEVICE, "stream": "alarm", "seq": 1, "ts": "2026-11-21T08:42:10.000Z", "kind": "flood",
               "state": "raised", "chain_seq": 1, "prev_hash": "0" * 64, "hash": "1" * 64}, False),
    ("alarm", {"device": DEVICE, "stream": "alarm", "seq": 1, "ts": "2026-11-21T08:42:10.000Z", "kind": "geofence",
               "state": "enter", "zone": "yard", "zone_kind": "customs", "seal_opening": "authorised",
               "lat": 21.97, "lon": 106.71}, False),  # not chained
    ("alarm", {"device": DEVICE, "stream": "alarm", "seq": 1, "ts": "2026-11-21T08:42:10.000Z", "kind": "seal_opened",
               "state": "raised", "severity": "info", "seal": "door", "seal_id": None, "authorised": False,
               "zones": [], "position": None,
               "chain_seq": 1, "prev_hash": "0" * 64, "hash": "1" * 64}, False),  # unauthorised: critical
    ("status", "online", True),
    ("status", "gone", False),
    ("command", {"id": "c-1", "cmd": "ping", "ts": "2026-11-24T10:00:00.000Z", "nonce": "short",
                 "hmac": "a" * 64}, False),
    ("command", {"id": "c-1", "cmd": "set_profile", "args": {"profile": "fast"}, "ts": "2026-11-24T10:00:00.000Z",
                 "nonce": "9f2c6a0e5b7d4411", "hmac": "a" * 64}, False),
    ("commandReply", {"id": "c-1", "ok": True, "device": DEVICE, "ts": "2026-11-24T10:00:00.000Z",
                      "hmac": "a" * 64}, False),
    ("commandReply", {"id": None, "ok": False, "error": "malformed: Expecting value", "device": DEVICE, "ts": None,
                      "hmac": "a" * 64}, True),
])
def test_schemas_are_strict_where_the_contract_is(contract: Contract, message: str, value: Any, valid: bool) -> None:
    problems = contract.value_problems(f"#/components/messages/{message}", value)
    assert (problems == []) == valid, problems or "accepted"


def test_the_closed_variant_catches_undeclared_fields(contract: Contract, closed: Contract) -> None:
    extra = _position(heading_src="imu")
    assert contract.value_problems("#/components/messages/position", extra) == []
    assert closed.value_problems("#/components/messages/position", extra) != []
    assert closed.value_problems("#/components/messages/position", _position()) == []


# -- the real agent --------------------------------------------------------------------------------


class Published:
    """What a backend subscribed to ``lorry/#`` received during the run, plus what late
    subscribers found retained."""

    def __init__(self, messages: list[tuple[str, bytes, bool]], retained_online: list[tuple[str, bytes, bool]],
                 retained_after: list[tuple[str, bytes, bool]], will: list[tuple[str, bytes, bool]],
                 encoding: str = "json", content_types: dict[bytes, str | None] | None = None):
        self.encoding = encoding
        self.content_types = content_types or {}
        """MQTT 5 content type by payload, as the backend received it."""
        self.messages = messages
        self.retained_online = retained_online
        self.retained_after = retained_after
        self.will = will

    def all(self) -> list[tuple[str, bytes, bool]]:
        return self.messages + self.retained_online + self.retained_after

    def readings(self, stream: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for topic, payload, _retain in self.messages:
            if topic == f"{PREFIX}/{DEVICE}/{stream}":
                obj = as_readings(payload)
                out += obj if isinstance(obj, list) else [obj]
        return out


def as_readings(payload: bytes) -> Any:
    """A JSON object or array as it is; a compact message as its list of readings."""
    return decode(payload) if compact.is_compact(payload) else json.loads(payload)


def retained_messages(port: int, topic: str, settle_s: float = 0.6) -> list[tuple[str, bytes, bool]]:
    """What a subscriber arriving now gets at once: the retained messages."""
    got: list[tuple[str, bytes, bool]] = []
    ready = threading.Event()
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"late-{secrets.token_hex(4)}")
    client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
    client.on_subscribe = lambda *_: ready.set()
    client.on_message = lambda c, u, m: got.append((m.topic, m.payload, bool(m.retain)))
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        assert ready.wait(10), "late subscriber could not subscribe"
        time.sleep(settle_s)
    finally:
        client.loop_stop()
        client.disconnect()
    return got


class Operator:
    """The backend's side of the command channel: publishes signed commands."""

    def __init__(self, port: int):
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                  client_id=f"op-{secrets.token_hex(3)}")
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def send(self, cmd: str, ts_ms: int, **args: Any) -> str:
        body = {"id": f"c-{cmd}-{secrets.token_hex(3)}", "cmd": cmd, "args": args, "ts": iso_ms(ts_ms),
                "nonce": secrets.token_hex(8)}
        self.client.publish(f"{PREFIX}/{DEVICE}/cmd", json.dumps(sign_command(COMMAND_KEY, body)),
                            qos=1).wait_for_publish(5)
        return body["id"]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def write_secret(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def set_sensor(w1_root: Path, milli_c: int) -> None:
    """A DS18B20 on the fake 1-Wire tree (newer kernels' ``temperature`` file), atomically."""
    device = w1_root / SENSOR_ID
    device.mkdir(parents=True, exist_ok=True)
    tmp = device / ".temperature.tmp"
    tmp.write_text(f"{milli_c}\n")
    os.replace(tmp, device / "temperature")


def run_sections(tmp: Path) -> dict[str, Any]:
    """A config that makes every stream and most alarm kinds appear within seconds."""
    import tomllib

    demo = tomllib.loads((REPO / "agent" / "demo" / "data" / "demo.toml").read_text())
    nmea = tmp / "trip.nmea"
    trip.write(nmea, interval_s=5, max_hours=0.25)  # 22:00-22:15, out of the Chongqing depot
    can_log = cl.write_log(tmp / "truck.log", cl.truck().frames)  # DTCs appear and clear; a silent gap
    start = trip.START
    at = lambda s: start + dt.timedelta(seconds=s)  # noqa: E731
    (tmp / "w1").mkdir()
    return {
        "gps": {"replay": str(nmea), "replay_speed": 0},
        "can": {"interface": "replay", "replay": str(can_log), "replay_speed": 0, "ignition": True,
                "min_interval_s": 2, "max_interval_s": 10},
        "seals": [{
            "name": "container_door", "driver": "sim", "seal_id": "ES-0042-01",
            "events": [
                {"at": at(5), "event": "sealed"},
                {"at": at(15), "event": "opened"},  # in the depot: authorised, info
                {"at": at(20), "event": "sealed"},
                {"at": at(600), "event": "tampered"},  # 12 km out: critical seal_cut
                {"at": at(720), "event": "battery_low"},
            ],
        }],
        "temperature": [
            *demo["temperature"],
            {"name": "reefer_rear", "driver": "ds18b20", "sensor_id": SENSOR_ID, "w1_root": str(tmp / "w1"),
             "interval_s": 0.2, "low_c": 2, "high_c": 8, "min_duration_s": 0, "lost_after_s": 0.5},
        ],
        "geofences": demo["geofences"],
        "chain": {"hmac_key_file": str(write_secret(tmp / "chain.key", CHAIN_KEY))},
        "commands": {"key_file": str(write_secret(tmp / "command.key", COMMAND_KEY))},
        "health": {"interval_s": 1},
        "time": {"trust_system_clock": "always"},
    }


def depth(db: Path) -> int:
    """Readings in the store; 0 while the damaged file is still there."""
    import sqlite3

    try:
        return store_depth(db)
    except sqlite3.DatabaseError:
        return 0


def alarms(backend: Backend, kind: str, state: str | None = None) -> list[dict[str, Any]]:
    return [a for a in backend.readings("alarm")
            if a.get("kind") == kind and (state is None or a.get("state") == state)]


@pytest.fixture(scope="module", params=["json", "compact"])
def published(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Published:
    """One run per encoding; compact over MQTT 5, so its content type is checked too."""
    encoding = request.param
    mqtt_extra = {"encoding": "compact", "protocol": "5"} if encoding == "compact" else {}
    tmp = tmp_path_factory.mktemp("contract")
    sections = run_sections(tmp)
    state = tmp / "state"
    state.mkdir()
    (state / "buffer.db").write_bytes(b"this is not an SQLite database\n" * 64)  # → store_damaged
    broker = Mosquitto(tmp / "broker").start()
    backend: Backend | None = None
    try:
        # A persistent subscriber, then the broker goes away: the agent starts in a dead zone,
        # so its backlog goes out in batches (JSON arrays) once the broker is back.
        Backend(broker.port, client_id="backend-contract", mqtt5=True).close()
        broker.stop()
        cfg = agent_config(tmp, broker.port, mqtt_extra=mqtt_extra, **sections)
        with AgentProcess(cfg) as agent:
            wait_until(lambda: depth(state / "buffer.db") >= 100, 20, "a backlog in the store")
            broker.start()
            backend = Backend(broker.port, client_id="backend-contract", mqtt5=True)
            wait_until(lambda: alarms(backend, "sensor_lost", "active"), 15, "sensor_lost (no DS18B20 yet)")
            set_sensor(tmp / "w1", 25_000)
            wait_until(lambda: alarms(backend, "temperature", "active"), 10, "a cold-chain excursion")
            set_sensor(tmp / "w1", 4_000)
            wait_until(lambda: alarms(backend, "temperature", "cleared"), 10, "the excursion's end")
            wait_until(lambda: len(backend.readings("seal")) >= 5 and alarms(backend, "seal_battery_low")
                       and alarms(backend, "store_damaged") and alarms(backend, "dtc", "cleared")
                       and alarms(backend, "geofence", "exit") and backend.readings("ignition")
                       and backend.readings("can") and len(backend.readings("health")) >= 2
                       and len(backend.readings("position")) >= 30, 20, "every stream")
            retained_online = retained_messages(broker.port, f"{PREFIX}/+/status")

            # The device's trusted time is GPS time carried on by the monotonic clock: the
            # newest health reading says what it is (within a second or two).
            newest = max(backend.readings("health"), key=lambda r: r["seq"])
            device_now = int(dt.datetime.fromisoformat(newest["ts"].replace("Z", "+00:00")).timestamp() * 1000)
            op = Operator(broker.port)
            try:
                ids = [op.send("ping", device_now), op.send("position", device_now),
                       op.send("set_profile", device_now, profile="parked"), op.send("flush", device_now),
                       op.send("ping", device_now - 3_600_000)]  # refused: outside the time window
                wait_until(lambda: {r.get("id") for r in backend.readings("cmd/reply")} >= set(ids), 15, "every reply")
                wait_until(lambda: any(p.get("event") == "requested" for p in backend.readings("position")), 10,
                           "the requested position")
            finally:
                op.close()
            assert agent.terminate() == 0, agent.log()[-4000:]
        wait_until(lambda: any(p == b"offline" for t, p, _r in backend.messages if t.endswith("/status")), 10,
                   "offline")
        retained_after = retained_messages(broker.port, f"{PREFIX}/#")

        # The Last Will: an agent that dies without a goodbye (SIGKILL) is announced offline
        # by the broker.
        will_cfg = agent_config(tmp, broker.port, name="will.toml",
                                store_extra={"path": str(tmp / "will" / "buffer.db")})
        seen = len(backend.messages)
        with AgentProcess(will_cfg) as agent:
            wait_until(lambda: any(p == b"online" for t, p, _r in backend.messages[seen:]), 15, "online again")
            agent.kill()
        wait_until(lambda: any(p == b"offline" for t, p, _r in backend.messages[seen:]), 15, "the Last Will")
        will = [m for m in backend.messages[seen:] if m[0].endswith("/status")]
        with backend._lock:
            messages = list(backend.messages)
            content_types = dict(backend.content_types)
    finally:
        if backend is not None:
            backend.close()
        broker.stop()
    return Published(messages, retained_online, retained_after, will, encoding, content_types)


def test_readings_go_in_the_configured_encoding(published: Published) -> None:
    """JSON by default; with ``encoding = "compact"`` every reading message is compact and,
    over MQTT 5, says so in its content type."""
    readings = [(t, p) for t, p, _r in published.messages
                if t.rsplit("/", 1)[1] in ("position", "ignition", "seal", "alarm", "temperature", "can", "health")]
    assert readings
    for topic, payload in readings:
        if published.encoding == "compact":
            assert compact.is_compact(payload), topic
            assert published.content_types.get(payload) == compact.CONTENT_TYPE, topic
        else:
            assert payload[:1] in (b"{", b"["), topic


def test_every_channel_of_the_document_was_published(published: Published, contract: Contract) -> None:
    seen = {contract.channel_of(topic)[0] for topic, _p, _r in published.all()}
    assert seen == set(contract.doc["channels"]), f"never seen: {set(contract.doc['channels']) - seen}"


def test_every_published_message_matches_the_document(published: Published, contract: Contract) -> None:
    failures = []
    for topic, payload, _retain in published.all():
        channel, params = contract.channel_of(topic)
        assert params == {"prefix": PREFIX, "device": DEVICE}, topic
        problems = contract.problems(channel, payload)
        if problems:
            failures.append(f"{topic}: {payload[:300]!r}\n    " + "\n    ".join(problems))
    assert not failures, f"{len(failures)} messages do not match docs/asyncapi.yaml:\n" + "\n".join(failures[:10])


def test_every_published_field_is_documented(published: Published, closed: Contract) -> None:
    """The closed variant: a field the agent sends that the document does not declare fails."""
    failures = []
    for topic, payload, _retain in published.all():
        channel, _params = closed.channel_of(topic)
        problems = closed.problems(channel, payload)
        if problems:
            failures.append(f"{topic}: {payload[:300]!r}\n    " + "\n    ".join(problems))
    assert not failures, f"{len(failures)} messages carry undocumented fields:\n" + "\n".join(failures[:10])


def test_readings_belong_to_their_topic_and_come_single_and_batched(published: Published, contract: Contract) -> None:
    forms = set()
    for topic, payload, _retain in published.messages:
        channel, params = contract.channel_of(topic)
        if channel in ("status", "cmd", "cmdReply"):
            continue
        obj = as_readings(payload)
        forms.add("batch" if isinstance(obj, list) and len(obj) > 1 or payload[:1] == b"[" else "single")
        for r in obj if isinstance(obj, list) else [obj]:
            assert r["device"] == params["device"] and r["stream"] == topic.rsplit("/", 1)[1], (topic, r)
        if isinstance(obj, list):
            assert [r["seq"] for r in obj] == sorted(r["seq"] for r in obj), "a batch is in seq order"
    assert forms == {"single", "batch"}


def test_alarm_kinds_and_states_seen(published: Published, doc: dict[str, Any]) -> None:
    seen = {(a["kind"], a["state"]) for a in published.readings("alarm")}
    assert {k for k, _s in seen} == alarm_kinds(doc) - {"data_dropped"}  # in process, at the end
    for both in ("dtc", "temperature", "sensor_lost"):
        assert {s for k, s in seen if k == both} == {"active", "cleared"}, both
    assert {s for k, s in seen if k == "geofence"} == {"enter", "exit"}
    severities = {(a["kind"], a.get("severity")) for a in published.readings("alarm") if "severity" in a}
    assert {("seal_opened", "info"), ("seal_cut", "critical"), ("seal_battery_low", "warning"),
            ("store_damaged", "critical")} <= severities
    chained = sorted({e["chain_seq"] for s in ("seal", "alarm") for e in published.readings(s)})
    assert chained == list(range(1, len(chained) + 1)) and all(
        "hmac" in e for s in ("seal", "alarm") for e in published.readings(s)), "chained, with the key's HMAC"


def test_command_replies_answer_every_command(published: Published) -> None:
    commands = list({c["id"]: c for c in published.readings("cmd")}.values())  # QoS 1 may repeat one
    replies = {r["id"]: r for r in published.readings("cmd/reply")}
    assert len(commands) == 5 and {c["id"] for c in commands} <= set(replies)
    by_cmd = [(c["cmd"], replies[c["id"]]["ok"]) for c in commands]
    assert by_cmd == [("ping", True), ("position", True), ("set_profile", True), ("flush", True), ("ping", False)]
    for r in replies.values():
        assert sign_command(COMMAND_KEY, r) == r, "the reply's HMAC is right"


def test_status_is_retained_and_the_last_will_says_offline(published: Published, doc: dict[str, Any],
                                                           contract: Contract) -> None:
    status_topic = f"{PREFIX}/{DEVICE}/status"
    assert published.retained_online == [(status_topic, b"online", True)]
    # After a clean stop only the status is retained, and it says offline: every other channel
    # is published with retain false, as the operations' bindings say.
    assert published.retained_after == [(status_topic, b"offline", True)]
    retained_channels = {op["channel"]["$ref"].rsplit("/", 1)[1] for op in doc["operations"].values()
                         if op["bindings"]["mqtt"].get("retain")}
    assert {contract.channel_of(t)[0] for t, _p, _r in published.retained_after} == retained_channels
    assert [p for _t, p, _r in published.will] == [b"online", b"offline"], "online, then the broker's Last Will"
    assert not any(retain for topic, _p, retain in published.messages if not topic.endswith("/status"))


# -- in process: paths the run does not reach ---------------------------------------------------------


def _agent(tmp: Path, **sections: Any) -> Any:
    from agent.config import load
    from agent.daemon.runner import Agent

    return Agent(load(agent_config(tmp, 1883, **sections)))


def _published_payloads(store: Any) -> list[tuple[str, bytes]]:
    """What the uplink would publish from this store right now: (stream, payload)."""
    from agent.uplink.outbox import Outbox

    outbox = Outbox(store, max_batch=200, max_bytes=131_072)
    out = []
    while (batch := outbox.next_batch()) is not None:
        out.append((batch.stream, batch.json()))
    return out


def test_a_reading_without_trusted_time_matches_the_document(tmp_path: Path, contract: Contract,
                                                             closed: Contract) -> None:
    """No GPS, an untrusted system clock: the reading is held, then sent with ``ts_trusted: false``."""
    agent = _agent(tmp_path, time={"trust_system_clock": "never", "max_hold_s": 0.001})
    agent.store.start()
    try:
        agent.emit(Reading("temperature", None, {"sensor": "reefer_front", "c": 4.5, "error": None},
                           meta={"mono_ns": time.monotonic_ns()}))
        assert agent.store.flush()
        time.sleep(0.01)
        agent.store.release_held(agent.pipeline.resolve_held)
        assert agent.store.flush()
        payloads = _published_payloads(agent.store)
    finally:
        agent.store.close()
    assert [s for s, _p in payloads] == ["temperature"]
    [(_s, payload)] = payloads
    assert json.loads(payload)["ts_trusted"] is False
    assert contract.problems("temperature", payload) == [] and closed.problems("temperature", payload) == []


def test_data_dropped_alarms_match_the_document(tmp_path: Path, contract: Contract, closed: Contract) -> None:
    """The store gives readings up (agent/store/retention.py: too old, over max_mb; agent/store/buffer.py:
    unwritable): the runner's alarms, as the uplink would publish them."""
    from agent.store.retention import Dropped

    agent = _agent(tmp_path, time={"trust_system_clock": "always"}, store_extra={"max_mb": 0.05, "max_age_days": 1})
    agent.store.start()
    try:
        t0 = 1_795_000_000_000
        for i in range(600):  # 50 hours, a fix every 5 minutes
            agent.store.append(Reading("position", t0 + i * 300_000, {
                "lat": 22.0 + i / 1e4, "lon": 106.7, "speed_kmh": 60.0, "course": 180.0, "alt_m": None, "sats": 9,
                "hdop": 0.9, "fix": "gps"}))
        assert agent.store.flush()
        assert agent.store.maintain()  # over max_mb: store_full
        later = agent.clock.stamp().ts_ms + 2 * 86_400_000
        agent.store.now_ms = lambda: later  # two days on: everything has waited past max_age_days
        assert agent.store.maintain()  # what it does every 10 s: too_old
        agent._dropped([Dropped("can", 3, 0, 0, "unwritable")])  # a failing disk: never numbered
        assert agent.store.flush()
        payloads = _published_payloads(agent.store)
    finally:
        agent.store.close()
    assert agent.pipeline.rejected == 0, "every alarm could be encoded"
    dropped = []
    for stream, payload in payloads:
        assert contract.problems(stream, payload) == [], payload[:300]
        assert closed.problems(stream, payload) == [], payload[:300]
        if stream == "alarm":
            obj = json.loads(payload)
            dropped += obj if isinstance(obj, list) else [obj]
    assert {(a["kind"], a["dropped_stream"], a["reason"], "first_seq" in a) for a in dropped} == {
        ("data_dropped", "position", "too_old", True), ("data_dropped", "position", "store_full", True),
        ("data_dropped", "can", "unwritable", False)}


def test_a_health_reading_after_driver_crashes_matches_the_document(tmp_path: Path, contract: Contract,
                                                                    closed: Contract) -> None:
    """`restarts` and `dead_sources` appear only after a crash, so the published run above
    never shows them: checked here on the runner's own health reading."""
    from agent.daemon.health import health_reading

    agent = _agent(tmp_path, time={"trust_system_clock": "always"})
    agent.store.start()
    try:
        agent.emit(health_reading(
            started_mono=agent.started_mono, clock=agent.clock, drivers=agent.drivers,
            pipeline_status=agent.pipeline.snapshot(), pending=0, time_pending=0,
            sources={"gps": {"restarts": 2, "crashes": 2, "dead": False},
                     "seals:rear_door": {"restarts": 0, "crashes": 1, "dead": True}}))
        assert agent.store.flush()
        payloads = _published_payloads(agent.store)
    finally:
        agent.store.close()
    [(stream, payload)] = payloads
    body = json.loads(payload)
    assert body["restarts"] == {"gps": 2, "seals:rear_door": 0} and body["dead_sources"] == ["seals:rear_door"]
    assert contract.problems(stream, payload) == [] and closed.problems(stream, payload) == []
