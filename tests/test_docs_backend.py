"""The backend engineer's documents, checked by doing what they say (issue 11, item 12).

A backend engineer works from docs/ alone, in any language; here in Node.js, as one did. So:

1. the JavaScript decoder printed in docs/compact.md is run with ``node`` and cbor-x (pinned in
   .ci/setup --tests, installed into the git-ignored .ci/node) on the doc's worked example and on
   messages the agent's own encoder (agent/compact/__init__.py) produced, and must give the readings'
   JSON form;
2. the HMAC worked examples of docs/chain.md and docs/commands.md (a key file, a body, its
   HMAC) are recomputed with Python's hmac, with the agent's own code (``read_key``, ``Chain``,
   ``CommandHandler``) and with the Node.js lines the docs print;
3. every default the documents state (docs/contract.md's table, "(default X)" in the prose,
   the commented-out defaults of config/agent.example.toml) is the default of agent/config/__init__.py;
4. every refusal the command channel can give is in docs/commands.md;
5. the MQTT 5 content type of each kind of message the agent publishes is the one
   docs/asyncapi.yaml's ``mqtt`` message binding declares (none for status and replies).
"""

from __future__ import annotations

import ast
import base64
import datetime as dt
import hashlib
import hmac
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import types
import typing
import uuid
from pathlib import Path
from typing import Any

import cbor2
import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from pydantic import BaseModel

from agent import compact
from agent.compact.decoder import decode
from agent.config import Config
from agent.demo import trip
from agent.demo.broker import Mosquitto
from agent.model.chain import CHAIN_FIELDS, Chain, canonical, read_key
from agent.model.reading import Reading, encode_parts, resolved_body
from agent.tools.verify import verify
from agent.uplink.commands import CommandHandler, sign_command
from drivers.gps.nmea import NmeaAssembler
from support import REPO, AgentProcess, Backend, agent_config, wait_until

DOCS = REPO / "docs"
EXAMPLE = REPO / "config" / "agent.example.toml"
SETUP = REPO / ".ci" / "setup"
NODE_MODULES = REPO / ".ci" / "node" / "node_modules"
DEVICE = "CQ-HN-0042"

NO_NODE = ("NODE.JS IS NOT INSTALLED: the JavaScript of the backend docs (docs/compact.md, "
           "docs/chain.md, docs/commands.md) was NOT checked. Run .ci/setup (Debian: apt-get install nodejs npm).")


# -- reading the documents ------------------------------------------------------------------------


def doc(name: str) -> str:
    return (DOCS / name).read_text(encoding="utf-8")


def section(text: str, heading: str) -> str:
    """From the heading line (any level) to the next heading of the same or a higher level."""
    m = re.search(rf"^(#+) {re.escape(heading)}\s*$", text, re.M)
    assert m, f"no heading {heading!r}"
    level = len(m[1])
    end = re.search(rf"^#{{1,{level}}} ", text[m.end():], re.M)
    return text[m.end(): m.end() + end.start() if end else None]


def fenced(text: str, lang: str) -> list[str]:
    """The bodies of the fenced code blocks of one language, in order."""
    return [body for tag, body in re.findall(r"^```(\S*)\n(.*?)^```", text, re.S | re.M) if tag == lang]


def code_spans(text: str) -> list[str]:
    """Markdown `code spans` (which may wrap lines) outside fenced blocks, whitespace runs as one space."""
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return [re.sub(r"\s+", " ", s) for s in re.findall(r"`([^`]+)`", prose)]


# -- 1. the JavaScript decoder of docs/compact.md -------------------------------------------------


def pinned_cbor_x() -> str:
    m = re.search(r"^CBOR_X_VERSION=(\S+)$", SETUP.read_text(), re.M)
    assert m, ".ci/setup pins cbor-x (CBOR_X_VERSION=…)"
    return m[1]


@pytest.fixture(scope="module")
def node() -> str:
    exe = shutil.which("node")
    if exe is None:
        pytest.skip(NO_NODE)
    return exe


@pytest.fixture(scope="module")
def cbor_x(node: str) -> Path:
    """.ci/node/node_modules with the pinned cbor-x (installed by .ci/setup)."""
    package = NODE_MODULES / "cbor-x" / "package.json"
    want = pinned_cbor_x()
    if not package.is_file():
        pytest.fail(f"cbor-x is not installed in {NODE_MODULES}: run .ci/setup (it runs npm install)")
    got = json.loads(package.read_text())["version"]
    if got != want:
        pytest.fail(f"{NODE_MODULES} has cbor-x {got}, .ci/setup pins {want}: run .ci/setup")
    return NODE_MODULES


def js_sketch() -> str:
    blocks = fenced(doc("compact.md"), "js")
    assert len(blocks) == 1, f"docs/compact.md has {len(blocks)} ```js blocks; the test runs exactly one"
    return blocks[0]


HARNESS = """
import { decodeCompact } from "./sketch.mjs";
let input = "";
process.stdin.setEncoding("utf8");
for await (const chunk of process.stdin) input += chunk;
const out = JSON.parse(input).map(hex => decodeCompact(Buffer.from(hex, "hex")));
process.stdout.write(JSON.stringify(out));
"""


def run_js_decoder(node: str, modules: Path, folder: Path, payloads: list[bytes], sketch: str | None = None) -> Any:
    """The readings of each payload, as the documented JavaScript gives them (JSON)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sketch.mjs").write_text(js_sketch() if sketch is None else sketch)
    (folder / "harness.mjs").write_text(HARNESS)
    link = folder / "node_modules"
    if not link.exists():
        link.symlink_to(modules, target_is_directory=True)  # how ESM finds "cbor-x" from the sketch
    proc = subprocess.run([node, "harness.mjs"], input=json.dumps([p.hex() for p in payloads]), cwd=folder,
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise AssertionError(f"the JavaScript of docs/compact.md failed (exit {proc.returncode}):\n"
                             f"{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


def as_js(value: Any) -> Any:
    """What JavaScript can tell apart: one Number type (212 and 212.0 are the same), booleans
    apart from numbers, key order kept."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, float)):
        return ("number", float(value))
    if isinstance(value, list):
        return [as_js(v) for v in value]
    if isinstance(value, dict):
        return [(k, as_js(v)) for k, v in value.items()]
    raise TypeError(type(value))


def worked_example() -> tuple[list[str], bytes, list[dict[str, Any]]]:
    """docs/compact.md's worked example: the bodies, the message's bytes, the decoded readings."""
    part = section(doc("compact.md"), "Worked example")
    jsons = fenced(part, "json")
    bodies = jsons[0].strip().splitlines()
    payload = bytes.fromhex(re.sub(r"\s", "", fenced(part, "hex")[0]))
    return bodies, payload, json.loads(jsons[1])


def test_the_js_decoder_decodes_the_worked_example(node: str, cbor_x: Path, tmp_path: Path) -> None:
    bodies, payload, decoded = worked_example()
    [got] = run_js_decoder(node, cbor_x, tmp_path, [payload])
    assert as_js(got) == as_js(decoded) == as_js([json.loads(b) for b in bodies])


def test_the_bigint_pitfall_the_doc_warns_about_is_real(node: str, cbor_x: Path, tmp_path: Path) -> None:
    """With cbor-x's default decode (what the doc printed before), the worked example throws:
    the doc's Decoder options are needed, not decoration."""
    sketch = js_sketch()
    options = re.search(r"new Decoder\(\{[^}]*\}\)", sketch)
    assert options and "int64AsNumber: true" in options[0]
    naive = sketch.replace(options[0], "new Decoder({ useRecords: false })")
    with pytest.raises(AssertionError, match="TypeError"):  # a BigInt where a number was due
        run_js_decoder(node, cbor_x, tmp_path, [worked_example()[1]], sketch=naive)


def bodies_of(stream: str, datas: list[dict[str, Any]], start_ms: int, *, step_ms: int = 1000, start_seq: int = 1,
              held: set[int] = frozenset()) -> list[str]:
    """Bodies exactly as the store writes and the uplink sends them (agent/model/reading.py); the
    ``held`` ones waited for a trusted time and went with the system clock's (``ts_trusted``)."""
    out = []
    for i, data in enumerate(datas):
        ts = start_ms + i * step_ms
        head, tail = encode_parts(DEVICE, Reading(stream, None if i in held else ts, data))
        body = head + str(start_seq + i) + tail
        out.append(resolved_body(body, ts, trusted=False) if i in held else body)
    return out


def trip_bodies(tmp: Path) -> list[str]:
    """The demo trip at 1 Hz through the real NMEA path: what a lorry's backlog holds."""
    capture = tmp / "trip.nmea"
    trip.write(capture, interval_s=1, max_hours=0.7)
    asm = NmeaAssembler()
    fixes = [f for line in capture.read_bytes().splitlines(keepends=True) for f in asm.feed(line)]
    fixes += list(asm.finish())
    out = []
    for i, f in enumerate(fixes):
        head, tail = encode_parts(DEVICE, Reading("position", f.ts_ms, f.as_data()))
        out.append(head + str(1000 + i) + tail)
    return out


def asyncapi_examples() -> dict[str, list[str]]:
    """Every reading example of docs/asyncapi.yaml, as JSON bodies, by stream."""
    messages = yaml.safe_load(doc("asyncapi.yaml"))["components"]["messages"]
    out: dict[str, list[str]] = {}
    for message in messages.values():
        for example in message.get("examples", []):
            payload = example["payload"]
            for r in payload if isinstance(payload, list) else [payload]:
                if isinstance(r, dict) and "stream" in r and "seq" in r:
                    out.setdefault(r["stream"], []).append(json.dumps(r, separators=(",", ":"), ensure_ascii=False))
    return out


def agent_batches(tmp: Path) -> list[list[str]]:
    """Batches as the uplink sends them, chosen so the encoder uses every form docs/compact.md
    describes (checked below): constant, plain, integer, decimal, time and patched columns;
    CBOR integers, typed arrays and sparse maps; undefined; a reading's own key order."""
    trip_all = trip_bodies(tmp)
    assert len(trip_all) >= 2000
    start = 1_795_213_361_000
    odd = [json.loads(b) for b in trip_all[300:420]]
    datas = [{k: v for k, v in r.items() if k not in ("device", "stream", "seq", "ts")} for r in odd]
    for i in (5, 6, 7):  # an RMC-only stretch
        datas[i] |= {"alt_m": None, "sats": None, "hdop": None}
    datas[20]["course"] = None
    datas[30]["event"] = "stop"
    datas[31]["event"] = "start"
    datas[40]["fix"] = "dgps"
    datas[50] = {"fix": datas[50].pop("fix"), **datas[50]}  # a key order of its own
    odd_bodies = (bodies_of("position", datas[:60], start, held={3, 4})  # "ts_trusted": false
                  + bodies_of("position", datas[60:], start + 3_600_000, start_seq=70))  # a tunnel, a seq gap
    batches = [trip_all[:300], trip_all[:2000], odd_bodies]  # 2000: the default max_batch
    batches += list(asyncapi_examples().values())
    return batches


def forms(payload: bytes) -> set[str]:
    """Which of the documented forms a compact message uses."""
    found: set[str] = set()

    def data(d: Any) -> None:
        if isinstance(d, dict):
            found.add("sparse")
        for item in d if isinstance(d, list) else []:
            if isinstance(item, cbor2.CBORTag):
                found.add(f"typed {item.tag}")

    def column(c: list[Any]) -> None:
        found.add(f"kind {c[0]}")
        if c[0] == 5:
            column(c[2])
        elif c[0] in (2, 4):
            data(c[2])
        elif c[0] == 3:
            data(c[3])
        if c[0] == 0 and c[1] is cbor2.undefined or c[0] == 1 and cbor2.undefined in c[1]:
            found.add("undefined")

    msg = cbor2.loads(payload[3:])
    for c in msg["cols"].values():
        column(c)
    if "order" in msg:
        found.add("order")
    return found


def test_the_js_decoder_decodes_what_the_agent_encodes(node: str, cbor_x: Path, tmp_path: Path) -> None:
    batches = agent_batches(tmp_path)
    payloads = [compact.encode(b) for b in batches]
    used = set().union(*map(forms, payloads))
    assert {f"kind {k}" for k in range(6)} | {"sparse", "undefined", "order"} <= used, used
    assert any('"ts_trusted":false' in b for batch in batches for b in batch)
    assert any(f.startswith("typed ") for f in used), used
    got = run_js_decoder(node, cbor_x, tmp_path / "js", payloads)
    assert len(got) == len(batches)
    for bodies, payload, readings in zip(batches, payloads, got):
        want = [json.loads(b) for b in bodies]
        assert decode(payload) == want  # the reference decoder agrees
        for i, (g, w) in enumerate(zip(readings, want, strict=True)):
            assert as_js(g) == as_js(w), f"{w['stream']} reading {i}:\n  JS:   {g}\n  JSON: {w}"


def test_the_doc_names_the_pinned_cbor_x() -> None:
    assert f"cbor-x {pinned_cbor_x()}" in doc("compact.md"), "docs/compact.md says which cbor-x the test runs"


# -- 2. the HMAC key and its worked examples ------------------------------------------------------


def write_key(folder: Path, name: str, text: str) -> Path:
    """A key file as docs/install.md makes it: the base64 line and a newline, mode 0640."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text + "\n")
    path.chmod(0o640)
    return path


def mac(key: bytes, text: str) -> str:
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


def chain_example() -> dict[str, Any]:
    part = section(doc("chain.md"), "The key")
    texts = fenced(part, "text")
    return {"part": part, "key": texts[0].strip(), "event_text": fenced(part, "json")[0].strip(),
            "canonical": texts[1].strip(), "js": fenced(part, "js")}


def test_chain_hmac_worked_example(tmp_path: Path) -> None:
    ex = chain_example()
    key_text, event = ex["key"], json.loads(ex["event_text"])
    assert len(key_text) == 44 and len(base64.b64decode(key_text, validate=True)) == 32, "a key as install.md makes"
    body = {k: v for k, v in event.items() if k not in CHAIN_FIELDS}
    assert canonical(body) == ex["canonical"]
    # Python's own hashlib and hmac, with the key as the doc says: the text itself.
    assert hashlib.sha256(ex["canonical"].encode()).hexdigest() == event["hash"]
    assert mac(key_text.encode(), ex["canonical"]) == event["hmac"]
    # The agent's own code: read_key on the file, the chain, verify-chain.
    key = read_key(write_key(tmp_path, "chain.key", key_text))
    assert key == key_text.encode()
    unchained = {k: v for k, v in event.items() if k not in ("chain_seq", "prev_hash", *CHAIN_FIELDS)}
    linked = Chain(DEVICE, key).link(json.dumps(unchained, separators=(",", ":")))
    assert linked == ex["event_text"], "the example is what the agent publishes"
    [report] = verify([event], key)
    assert report.ok
    # The misreadings the doc warns about give the other HMACs it prints, and fail.
    decoded = mac(base64.b64decode(key_text), ex["canonical"])
    with_newline = mac((key_text + "\n").encode(), ex["canonical"])
    assert decoded in ex["part"] and with_newline in ex["part"]
    assert event["hmac"] not in (decoded, with_newline)
    assert not verify([event], base64.b64decode(key_text))[0].ok


class StubClock:
    """The device's trusted time, standing still (agent/model/clock.py ``TimeKeeper``'s interface)."""

    def __init__(self, iso: str | None):
        self.ts_ms = (None if iso is None
                      else int(dt.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000))

    def mono_now(self) -> int:
        return 1_000_000_000

    def stamp(self, mono_ns: int | None = None) -> Any:
        return types.SimpleNamespace(ts_ms=self.ts_ms, trusted=self.ts_ms is not None)


def command_example() -> dict[str, Any]:
    part = section(doc("commands.md"), "The key, and a worked example")
    texts, jsons = fenced(part, "text"), fenced(part, "json")
    return {"part": part, "key": texts[0].strip(), "canonical": texts[1].strip(), "command": json.loads(jsons[0]),
            "signed": json.loads(jsons[1]), "reply": json.loads(jsons[2]), "js": fenced(part, "js")}


def test_command_hmac_worked_example(tmp_path: Path) -> None:
    ex = command_example()
    key_text, command, signed, reply = ex["key"], ex["command"], ex["signed"], ex["reply"]
    assert len(key_text) == 44 and len(base64.b64decode(key_text, validate=True)) == 32, "a key as install.md makes"
    assert "hmac" not in command and {k: v for k, v in signed.items() if k != "hmac"} == command
    assert canonical(command) == ex["canonical"]
    assert mac(key_text.encode(), ex["canonical"]) == signed["hmac"]
    assert mac(key_text.encode(), canonical({k: v for k, v in reply.items() if k != "hmac"})) == reply["hmac"]
    # The agent's own code: the key file through read_key, signing, and the handler's answer.
    key = read_key(write_key(tmp_path, "command.key", key_text))
    assert key == key_text.encode()
    assert sign_command(key, command) == signed
    actions = {"set_profile": lambda args: {"profile": args["profile"], "state": "parked"}}
    handler = CommandHandler(DEVICE, key, StubClock(reply["ts"]), actions)
    assert handler.handle(json.dumps(signed).encode()) == reply, "the documented reply is the agent's"
    # Both misreadings of the key file are refused, with the HMACs the doc prints.
    for wrong in (base64.b64decode(key_text), (key_text + "\n").encode()):
        assert mac(wrong, ex["canonical"]) in ex["part"]
        refused = CommandHandler(DEVICE, wrong, StubClock(reply["ts"]), actions).handle(json.dumps(signed).encode())
        assert refused["ok"] is False and refused["error"] == "authentication failed"


def run_js_file(node: str, folder: Path, source: str) -> list[str]:
    (folder / "snippet.mjs").write_text(source)
    proc = subprocess.run([node, "snippet.mjs"], cwd=folder, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.split()


def test_the_nodejs_hmac_lines_of_the_docs(node: str, tmp_path: Path) -> None:
    """The Node.js lines of docs/chain.md and docs/commands.md, run in a folder holding the key
    file as docs/install.md writes it (with its newline)."""
    chain, command = chain_example(), command_example()
    assert len(chain["js"]) == 1 and len(command["js"]) == 1
    write_key(tmp_path / "chain", "chain.key", chain["key"])
    event = json.loads(chain["event_text"])
    assert run_js_file(node, tmp_path / "chain", chain["js"][0]) == [event["hash"], event["hmac"]]
    write_key(tmp_path / "command", "command.key", command["key"])
    assert run_js_file(node, tmp_path / "command", command["js"][0]) == [command["signed"]["hmac"]]


def test_the_key_rule_is_stated_where_a_backend_looks() -> None:
    """The HMAC key is the key file's text: said in docs/chain.md, docs/commands.md and the
    example config, next to the settings."""
    for name in ("chain.md", "commands.md"):
        text = re.sub(r"\s+", " ", doc(name)).replace("*", "")
        assert "The HMAC key is the file's text itself" in text, name
        assert "not the 32 bytes they decode to" in text, name
    example = EXAMPLE.read_text()
    for key in ("hmac_key_file", "key_file = \"/etc/lorry-agent/command.key\""):
        line = next(ln for ln in example.splitlines() if key in ln)
        assert "not base64-decoded" in example[example.index(line):example.index(line) + 300], key


# -- 3. defaults ----------------------------------------------------------------------------------


def model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside ``X | None``, ``list[X]``, ``Annotated[X, …]``…"""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        if (found := model_of(arg)) is not None:
            return found
    return None


def default_of(section_name: str, key: str) -> Any:
    """The default of ``[section] key`` in agent/config/__init__.py (a KeyError when there is no such key)."""
    model: type[BaseModel] = Config
    value: Any = None
    for part in section_name.split("."):
        field = model.model_fields[part]
        if isinstance(field.default, BaseModel):
            value = field.default
        else:
            value = None
        sub = model_of(field.annotation)
        if sub is None:
            raise KeyError(section_name)
        model = sub
    field = model.model_fields[key]
    if value is not None and isinstance(value, BaseModel):
        return getattr(value, key)  # a nested table's own default (e.g. [reporting.parked])
    if field.is_required():
        raise KeyError(f"[{section_name}] {key} has no default")
    return field.get_default(call_default_factory=True)


UNITS = {"s": 1, "min": 60, "h": 3600, "B": 1, "KiB": 1024, "MiB": 1024 ** 2, "MB": 1, "m": 1, "km": 1000, "days": 1}


def parse_value(text: str) -> Any:
    """A documented value: `lorry`, 2000, 300 s, 128 KiB, 15 min, true…"""
    text = text.strip().strip("`").strip()
    if text in ("true", "false"):
        return text == "true"
    m = re.fullmatch(r"(-?\d[\d_ ]*(?:\.\d+)?)\s*([A-Za-z]+)?", text)
    if m and (m[2] is None or m[2] in UNITS):
        return float(m[1].replace("_", "").replace(" ", "")) * UNITS.get(m[2] or "s", 1)
    return text.strip('"')


def same_default(documented: Any, real: Any) -> bool:
    if isinstance(real, bool) or isinstance(documented, bool):
        return documented is real
    if isinstance(real, (int, float)):
        return isinstance(documented, float) and documented == float(real)
    return str(documented) == str(real)


def defaults_table() -> list[tuple[str, str, str]]:
    part = section(doc("contract.md"), "Defaults: the settings that shape what arrives")
    rows = re.findall(r"^\| `\[([\w.]+)\] (\w+)` \| ([^|]+) \|", part, re.M)
    assert len(rows) >= 10, "docs/contract.md has a defaults table"
    return rows


def test_the_contract_defaults_table_is_agent_config() -> None:
    rows = defaults_table()
    assert ("mqtt", "max_batch") in {(s, k) for s, k, _v in rows}
    wrong = [f"[{s}] {k}: the doc says {v.strip()}, agent/config/__init__.py {default_of(s, k)!r}"
             for s, k, v in rows if not same_default(parse_value(v), default_of(s, k))]
    assert not wrong, "docs/contract.md's defaults drifted:\n" + "\n".join(wrong)


# `[section] key` … (default X): in the prose of every document.
PROSE_DEFAULT = re.compile(r"`\[([\w.]+)\] (\w+)`[^`\n]{0,40}?\(default:? (`[^`]+`|[^),;]+)[),;]")


def test_defaults_stated_in_the_prose_are_agent_config() -> None:
    seen, wrong = [], []
    for path in sorted(DOCS.glob("*.md")) + [DOCS / "asyncapi.yaml"]:
        text = re.sub(r"\s+", " ", path.read_text(encoding="utf-8"))
        for m in PROSE_DEFAULT.finditer(text):
            try:
                real = default_of(m[1], m[2])
            except KeyError:
                continue
            seen.append(f"{path.name}: [{m[1]}] {m[2]}")
            if not same_default(parse_value(m[3]), real):
                wrong.append(f"{path.name}: [{m[1]}] {m[2]} (default {m[3]}), agent/config/__init__.py {real!r}")
    assert any("max_batch" in s for s in seen), seen  # the check sees what it is meant to see
    assert not wrong, "defaults in the docs' prose drifted:\n" + "\n".join(wrong)


def example_defaults() -> list[tuple[str, str, Any, int]]:
    """(section, key, value, line) of each commented-out `# key = value` of the example config:
    the example's way of showing a default."""
    out = []
    table = ""
    for n, line in enumerate(EXAMPLE.read_text().splitlines(), 1):
        header = re.match(r"^#?\s*\[([\w.]+)\]", line)
        if header:
            table = header[1]
            continue
        if re.match(r"^#?\s*\[\[", line):
            table = ""  # arrays of tables ([[seals]]…): examples, not defaults
            continue
        m = re.match(r"^# ?(\w+) = (.+?)(?:\s+#.*)?$", line)
        if m and table:
            try:
                value = tomllib.loads(f"v = {m[2]}")["v"]
            except tomllib.TOMLDecodeError:
                continue
            out.append((table, m[1], value, n))
    return out


def test_the_example_configs_commented_defaults_are_agent_config() -> None:
    checked, wrong = [], []
    for table, key, value, n in example_defaults():
        try:
            real = default_of(table, key)
        except KeyError:
            continue
        if real is None or isinstance(real, (list, dict)) and not real and value:
            continue  # an example of an optional setting (or of a list empty by default), not a default
        if hasattr(real, "__fspath__"):
            real = str(real)
        checked.append(f"[{table}] {key}")
        if isinstance(real, (list, dict)):
            if value != real:
                wrong.append(f"line {n}: [{table}] {key} = {value!r}, agent/config/__init__.py {real!r}")
        elif not same_default(float(value) if isinstance(value, (int, float)) and not isinstance(value, bool)
                              else value, real):
            wrong.append(f"line {n}: [{table}] {key} = {value!r}, agent/config/__init__.py {real!r}")
    assert {"[mqtt] max_batch", "[commands] window_s", "[store] max_mb"} <= set(checked), checked
    assert not wrong, "config/agent.example.toml shows defaults that are not:\n" + "\n".join(wrong)


def commands_block(text: str | None = None) -> str:
    """The example config's [commands] section, uncommented."""
    lines = (EXAMPLE.read_text() if text is None else text).splitlines()
    start = next(i for i, ln in enumerate(lines) if re.match(r"^# \[commands\]", ln))
    block = []
    for ln in lines[start:]:
        if not ln.startswith("#"):
            break
        block.append(ln[2:] if ln.startswith("# ") else ln[1:])
    return "\n".join(block) + "\n"


def test_the_example_config_documents_every_commands_key() -> None:
    block = tomllib.loads(commands_block())["commands"]
    assert set(block) == set(Config.model_fields["commands"].annotation.model_fields), "every [commands] key"
    assert "commands" not in tomllib.loads(EXAMPLE.read_text()), "commented out, like the other optional sections"


def test_the_example_config_passes_check_config_with_commands_enabled(tmp_path: Path) -> None:
    """The example as a technician would use it (its /etc and /var paths made real, its files
    present), first as shipped, then with [commands] uncommented."""
    from certs import authority

    etc, var = tmp_path / "etc", tmp_path / "var"
    ca = authority(etc / "tls")
    device = ca.client(etc / "tls", "device")  # device.crt, device.key (0600)
    ca.cert.rename(etc / "tls" / "ca.pem")
    device.cert.rename(etc / "tls" / "device.pem")
    write_key(etc, "command.key", base64.b64encode(os.urandom(32)).decode())
    text = EXAMPLE.read_text().replace("/etc/lorry-agent/", f"{etc}/").replace("/var/lib/lorry-agent/", f"{var}/")
    for name, body in (("as-shipped.toml", text), ("with-commands.toml", text + "\n" + commands_block(text))):
        path = tmp_path / name
        path.write_text(body)
        proc = subprocess.run([sys.executable, "-m", "agent", "check-config", str(path)], cwd=REPO,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"{name}:\n{proc.stdout}{proc.stderr}"


# -- 4. every refusal of the command channel is documented ----------------------------------------


def literal_parts(node: ast.expr) -> list[str] | None:
    """The literal text of a str constant or an f-string (its fixed parts); None otherwise."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.JoinedStr):
        return [v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str)]
    return None


def refusals_in_code() -> tuple[dict[str, list[str]], list[str]]:
    """Every error text the code can put in a reply: each ``CommandError(…)`` anywhere in
    agent/ (the actions of agent/daemon/runner.py raise it too), and each ``"error": …`` the command
    module writes into a reply itself. → ({where: literal parts}, problems)."""
    found: dict[str, list[str]] = {}
    problems = []
    for path in sorted((REPO / "agent").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            texts: list[ast.expr] = []
            if (isinstance(node, ast.Call)
                    and getattr(node.func, "id", getattr(node.func, "attr", None)) == "CommandError"):
                texts = node.args[:1]
            elif isinstance(node, ast.Dict) and path.name == "commands.py":
                texts = [v for k, v in zip(node.keys, node.values)
                         if isinstance(k, ast.Constant) and k.value == "error" and not isinstance(v, ast.Name)]
            for text in texts:
                where = f"{path.relative_to(REPO)}:{text.lineno}"
                parts = literal_parts(text)
                if parts is None:
                    problems.append(f"{where}: an error reply that is not a literal (cannot be checked): "
                                    f"{ast.unparse(text)}")
                else:
                    found[where] = parts
    return found, problems


def documented_errors() -> str:
    return "\n".join(code_spans(doc("commands.md")))


def test_every_refusal_the_code_can_give_is_in_commands_md() -> None:
    found, problems = refusals_in_code()
    assert not problems, "\n".join(problems)
    texts = {" ".join(p for p in parts) for parts in found.values()}
    for needed in ("no fix yet", "args must be an object", "nonce must be", "malformed: ", "no trusted time"):
        assert any(needed in t for t in texts), f"the scan finds {needed!r}"
    spans = documented_errors()
    missing = []
    for where, parts in sorted(found.items()):
        for part in parts:
            fixed = re.sub(r"\s+", " ", part).strip()
            if len(fixed) >= 4 and fixed not in spans:
                missing.append(f"{where}: {''.join(parts)!r} (its text {fixed!r})")
    assert not missing, "refusals not in docs/commands.md (write them as `code`):\n" + "\n".join(missing)


def test_the_handlers_actual_refusals_are_documented() -> None:
    """The same from the outside: bad commands through the real handler; each error's fixed
    head (before any detail) is in docs/commands.md."""
    key = b"k" * 32
    now = "2026-11-24T10:00:00.000Z"
    actions = {"ping": lambda a: {"pong": True}}
    good = {"id": "c-1", "cmd": "ping", "ts": now, "nonce": "n" * 16}

    def signed(**change: Any) -> bytes:
        fields = {**good, "nonce": uuid.uuid4().hex, **change}  # a fresh nonce unless told
        return json.dumps(sign_command(key, {k: v for k, v in fields.items() if v is not ...})).encode()

    cases = {
        b"not json": "malformed: ",
        b"[1, 2]": "not a JSON object",
        json.dumps(good).encode(): "not signed",
        json.dumps({**good, "hmac": "0" * 64}).encode(): "authentication failed",
        signed(ts=...): "ts must be an ISO 8601 UTC time",
        signed(ts="yesterday"): "ts is not an ISO 8601 time: ",
        signed(ts="2026-11-24T10:00:00"): "ts must say its time zone (Z)",
        signed(ts="2026-11-24T11:00:00.000Z"): "outside the time window: ts is ",
        signed(nonce="short"): "nonce must be a string of 8 to 64 characters",
        signed(cmd="reboot"): "unknown command ",
        signed(args=[1]): "args must be an object",
    }
    spans = documented_errors()
    handler = CommandHandler(DEVICE, key, StubClock(now), actions)
    for payload, head in cases.items():
        reply = handler.handle(payload)
        assert reply["ok"] is False and reply["error"].startswith(head), (payload, reply)
        assert head.strip() in spans, f"{reply['error']!r} is not in docs/commands.md"
    replay = signed(nonce="r" * 16)
    assert handler.handle(replay)["ok"] is True
    assert handler.handle(replay)["error"] in spans
    untimed = CommandHandler(DEVICE, key, StubClock(None), actions).handle(signed())
    assert untimed["error"] in spans and untimed["ts"] is None


# -- 5. content types on the wire, against docs/asyncapi.yaml -------------------------------------


def asyncapi() -> dict[str, Any]:
    return yaml.safe_load(doc("asyncapi.yaml"))


MQTT_MESSAGE_BINDING_KEYS = {"payloadFormatIndicator", "correlationData", "contentType", "responseTopic",
                             "bindingVersion"}


def wire_content_type(message: dict[str, Any]) -> str | None:
    """The MQTT 5 content type a message's `mqtt` binding declares (None: no property sent)."""
    binding = message.get("bindings", {}).get("mqtt")
    assert binding is not None, f"{message['name']}: an mqtt binding says what goes on the wire"
    assert set(binding) <= MQTT_MESSAGE_BINDING_KEYS and binding["bindingVersion"] == "0.2.0", binding
    return binding.get("contentType")


def test_the_document_declares_a_wire_content_type_for_every_message_the_agent_sends() -> None:
    d = asyncapi()
    for op in d["operations"].values():
        if op["action"] != "send":
            continue
        for ref in op["messages"]:
            channel = ref["$ref"].split("/")[2]
            key = ref["$ref"].rsplit("/", 1)[1]
            message = d["components"]["messages"][d["channels"][channel]["messages"][key]["$ref"].rsplit("/", 1)[1]]
            ct = wire_content_type(message)
            assert ct is None or ct == message["contentType"], f"{message['name']}: binding and message disagree"


class Operator:
    """The backend side of the command channel: signs and sends commands (MQTT 5)."""

    def __init__(self, port: int, key: bytes):
        self.key = key
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                  client_id=f"op-{uuid.uuid4().hex[:6]}", protocol=MQTTProtocolVersion.MQTTv5)
        self.client.connect("127.0.0.1", port, keepalive=5)
        self.client.loop_start()

    def ping(self) -> str:
        now = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        cid = f"c-{uuid.uuid4().hex[:6]}"
        cmd = sign_command(self.key, {"id": cid, "cmd": "ping", "ts": now, "nonce": uuid.uuid4().hex})
        self.client.publish(f"lorry/{DEVICE}/cmd", json.dumps(cmd), qos=1).wait_for_publish(5)
        return cid

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.mark.parametrize("encoding", ["json", "compact"])
def test_mqtt5_content_types_are_what_the_document_declares(encoding: str, broker: Mosquitto, tmp_path: Path) -> None:
    """Under MQTT 5: stream messages, status (online, offline and the Last Will) and command
    replies, each with the content type its message's `mqtt` binding declares, or none."""
    d = asyncapi()
    messages = d["components"]["messages"]
    key_text = base64.b64encode(os.urandom(32)).decode()
    key_file = write_key(tmp_path, "command.key", key_text)
    backend = Backend(broker.port, mqtt5=True)
    operator = Operator(broker.port, key_text.encode())
    try:
        cfg = agent_config(tmp_path, broker.port, mqtt_extra={"protocol": "5", "encoding": encoding},
                           health={"interval_s": 1}, time={"trust_system_clock": "always"},
                           commands={"key_file": str(key_file)})
        with AgentProcess(cfg) as agent:
            wait_until(lambda: ("online", False) in backend.status_values() and backend.readings("health"),
                       20, "online and a health reading")
            cid = operator.ping()
            wait_until(lambda: any(t.endswith("/cmd/reply") for t, _p, _r in backend.messages), 10, "the reply")
            if encoding == "json":
                assert agent.terminate() == 0, agent.log()[-3000:]  # the agent's own offline
            else:
                agent.kill()  # the broker's Last Will
            wait_until(lambda: any(p == "offline" for p, _r in backend.status_values()), 15, "offline")
        with backend._lock:
            received = list(backend.messages)
            content_types = dict(backend.content_types)
    finally:
        operator.close()
        backend.close()
    kinds = set()
    for topic, payload, _retain in received:
        level = topic.split("/", 2)[2]
        if level == "cmd":
            continue  # ours
        if level == "status":
            message = messages["status"]
        elif level == "cmd/reply":
            message = messages["commandReply"]
            assert json.loads(payload)["id"] == cid
        else:
            message = messages["compactBatch" if compact.is_compact(payload) else level]
        kinds.add((message["name"], payload if level == "status" else b""))
        assert content_types.get(payload) == wire_content_type(message), (
            f"{topic} {payload[:40]!r}: sent with content type {content_types.get(payload)!r}, "
            f"docs/asyncapi.yaml's {message['name']} binding says {wire_content_type(message)!r}")
    stream = "compactBatch" if encoding == "compact" else "health"
    assert kinds >= {("status", b"online"), ("status", b"offline"), ("commandReply", b""), (stream, b"")}, kinds
