"""`check-config` says OK only for what `run` can use, and never raises.

Each case of issue 11 item 9 (check-config said OK, then run failed or did harm) is reproduced
through the real command line; then the rules behind the fixes are checked for every key of
the schema (every number bounded, every file key given a role), and hypothesis throws absurd
values at every key: check-config always answers 0 or 1 with lines naming the key, and when it
says OK, `run --dry-run` on the same file runs without a traceback.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import gzip
import io
import json
import math
import os
import signal
import subprocess
import sys
import types
import typing
from pathlib import Path
from typing import Annotated, Any, get_args, get_origin

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from agent import cli
from agent.config import Config
from agent.demo import trip
from agent.demo.broker import free_port
from agent.model.settings import Role
from support import REPO

UTC = dt.UTC
HEADER = "configuration error in "


# -- running the command line -------------------------------------------------------------------


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout)


def check(path: Path) -> tuple[int, str, str]:
    """``lorry-agent check-config path`` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(["check-config", str(path)])
    return rc, out.getvalue(), err.getvalue()


def problems_of(path: Path) -> list[str]:
    rc, out, err = check(path)
    assert rc == 1, f"check-config said OK: {out}"
    assert err.startswith(f"{HEADER}{path}:"), err
    return [line.strip() for line in err.splitlines()[1:]]


def write(tmp: Path, text: str, name: str = "agent.toml") -> Path:
    p = tmp / name
    p.write_text(text)
    return p


def base(tmp: Path) -> str:
    return f'[device]\nid = "CQ-HN-0042"\n[mqtt]\nport = {free_port()}\n[store]\npath = "{tmp}/state/buffer.db"\n'


def capture(tmp: Path, name: str = "trip.nmea") -> Path:
    path = tmp / name
    trip.write(path, interval_s=60, max_hours=0.5)
    return path


def refused_by_run_too(cfg: Path, *where: str, dry_run: bool = True) -> subprocess.CompletedProcess[str]:
    """`run` refuses the config up front: exit 1, the same problem lines, no traceback."""
    r = run_cli("run", "--config", str(cfg), *(["--dry-run"] if dry_run else []))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith(f"{HEADER}{cfg}:"), r.stderr
    for w in where:
        assert w in r.stderr
    return r


# -- the cases of the issue ----------------------------------------------------------------------


def test_a_store_path_that_is_a_folder_is_refused_and_never_renamed(tmp_path: Path) -> None:
    folder = tmp_path / "state"
    folder.mkdir()
    (folder / "keep.txt").write_text("someone's files")
    cfg = write(tmp_path, base(tmp_path).replace(f"{tmp_path}/state/buffer.db", str(folder)))
    [p] = problems_of(cfg)
    assert p.startswith("[store] path: ") and "is a folder" in p and "must be the database file" in p
    refused_by_run_too(cfg, "[store] path:", dry_run=False)
    assert (folder / "keep.txt").read_text() == "someone's files"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["agent.toml", "state"], "nothing renamed"


@pytest.mark.parametrize("special", ["/dev/null", "."])
def test_a_store_path_that_is_a_device_or_the_config_folder_is_refused(tmp_path: Path, special: str) -> None:
    cfg = write(tmp_path, base(tmp_path).replace(f"{tmp_path}/state/buffer.db", special))
    [p] = problems_of(cfg)
    assert p.startswith("[store] path: ") and ("a device" in p or "a folder" in p)


@pytest.mark.parametrize("value", ["1e308", "inf", "nan", "-1", "4194305"])
def test_absurd_store_sizes_are_refused_with_what_is_allowed(tmp_path: Path, value: str) -> None:
    cfg = write(tmp_path, base(tmp_path) + f"max_mb = {value}\n")
    [p] = problems_of(cfg)
    assert p.startswith("[store] max_mb: ")
    assert "4194304" in p or "finite" in p or "greater than or equal to 0" in p
    refused_by_run_too(cfg, "[store] max_mb:")


def test_a_store_larger_than_its_disk_is_allowed(tmp_path: Path) -> None:
    # A full disk is handled at run time (agent/store/capacity.py): a small card is no config error.
    fs = os.statvfs(tmp_path)
    disk_mb = fs.f_blocks * fs.f_frsize / 2**20
    if disk_mb * 2 > 4 * 2**20:
        pytest.skip("this disk is larger than SQLite's own limit")
    rc, out, err = check(write(tmp_path, base(tmp_path) + f"max_mb = {math.ceil(disk_mb * 2)}\n"))
    assert rc == 0, err


def test_a_store_folder_that_cannot_be_created_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    cfg = write(tmp_path, base(tmp_path).replace(f"{tmp_path}/state", f"{tmp_path}/a-file/state"))
    [p] = problems_of(cfg)
    assert p.startswith("[store] path: the folder ") and "cannot be created" in p and "a-file is not a folder" in p
    refused_by_run_too(cfg, "[store] path:")
    cfg = write(tmp_path, base(tmp_path).replace(f"{tmp_path}/state", "/proc/lorry-agent/state"))
    [p] = problems_of(cfg)
    assert p.startswith("[store] path: the folder /proc/lorry-agent/state cannot be created in /proc")


def test_a_store_folder_that_exists_is_used_as_it_is(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    rc, out, err = check(write(tmp_path, base(tmp_path)))
    assert rc == 0 and "OK" in out, err
    assert os.listdir(tmp_path / "state") == [], "checking leaves nothing behind"


@pytest.mark.parametrize("kind", ["missing", "folder", "truncated gzip", "not gzip"])
def test_a_gps_replay_that_cannot_be_read_is_refused(tmp_path: Path, kind: str) -> None:
    replay = tmp_path / "trip.nmea.gz"
    if kind == "folder":
        replay.mkdir()
    elif kind == "truncated gzip":
        data = gzip.compress(capture(tmp_path).read_bytes())
        replay.write_bytes(data[: len(data) // 2])
    elif kind == "not gzip":
        capture(tmp_path, replay.name)
        replay.write_bytes(replay.read_bytes()[:100])
    cfg = write(tmp_path, base(tmp_path) + f'[gps]\nreplay = "{replay.name}"\nreplay_speed = 0\n')
    [p] = problems_of(cfg)
    assert p.startswith("[gps] replay: ") and str(replay) in p
    assert {"missing": "no such file", "folder": "is a folder"}.get(kind, "cannot read") in p
    # Before: a traceback in the driver thread and `--dry-run` exited 0.
    refused_by_run_too(cfg, "[gps] replay:")


def test_tls_files_are_checked_for_existence_and_content(tmp_path: Path) -> None:
    cfg = write(tmp_path, base(tmp_path) + '[mqtt.tls]\nca_file = "ca.pem"\n')
    [p] = problems_of(cfg)
    assert p == (f"[mqtt.tls] ca_file: {tmp_path}/ca.pem: no such file; "
                 "must be a readable file (the broker's CA certificate)")
    refused_by_run_too(cfg, str(tmp_path / "ca.pem"), dry_run=False)
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    [p] = problems_of(cfg)
    assert p.startswith(f"[mqtt.tls] ca_file: {tmp_path}/ca.pem holds no usable CA certificate")

    from certs import authority  # a real CA and a client certificate

    ca = authority(tmp_path / "pki")
    client = ca.client(tmp_path / "pki")
    tls = f'[mqtt.tls]\nca_file = "{ca.cert}"\ncert_file = "{{cert}}"\nkey_file = "{client.key}"\n'
    cfg = write(tmp_path, base(tmp_path) + tls.format(cert=client.cert))
    rc, out, err = check(cfg)
    assert rc == 0, err
    client.key.chmod(0o644)
    [p] = problems_of(cfg)
    assert p.startswith("[mqtt.tls] key_file: ") and "readable by everyone" in p
    client.key.chmod(0o600)
    cfg = write(tmp_path, base(tmp_path) + tls.format(cert=ca.cert))  # not the key's certificate
    [p] = problems_of(cfg)
    assert p.startswith("[mqtt.tls] cert_file: ") and "is not a certificate and its unencrypted key" in p


def test_a_password_file_must_be_text(tmp_path: Path) -> None:
    pw = tmp_path / "password"
    pw.write_bytes(b"\xff\xfe\x00secret\n")
    pw.chmod(0o600)
    cfg = write(tmp_path,
                base(tmp_path).replace("[mqtt]\n", '[mqtt]\nusername = "lorry"\npassword_file = "password"\n'))
    [p] = problems_of(cfg)
    assert p.startswith("[mqtt] password_file: ") and "UTF-8" in p
    pw.write_text("secret\n")
    pw.chmod(0o600)
    rc, out, err = check(cfg)
    assert rc == 0, err


def test_toml_nested_thousands_deep_is_a_config_error(tmp_path: Path) -> None:
    for text in ("x = " + "[" * 3000 + "]" * 3000 + "\n",
                 "x = " + "{a = " * 3000 + "1" + "}" * 3000 + "\n",
                 base(tmp_path) + "[can]\ndbc = " + "[" * 400 + "]" * 400 + "\n"):
        cfg = write(tmp_path, text)
        rc, out, err = check(cfg)
        assert rc == 1 and err.startswith(f"{HEADER}{cfg}:") and "Traceback" not in err, err
    r = run_cli("check-config", str(write(tmp_path, "x = " + "[" * 3000 + "]" * 3000 + "\n")))
    assert r.returncode == 1 and "nested too deeply" in r.stderr and "Traceback" not in r.stderr


def test_a_huge_or_binary_config_file_is_a_config_error(tmp_path: Path) -> None:
    big = tmp_path / "big.toml"
    big.write_text(base(tmp_path) + "# " + "x" * (2 << 20) + "\n")
    assert problems_of(big) == ["larger than 1024 KiB: not a config file"]
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00\x01")
    [p] = problems_of(binary)
    assert p.startswith("not UTF-8 text")
    [p] = problems_of(tmp_path)
    assert p.startswith("cannot read: ")


def test_control_characters_in_text_are_refused(tmp_path: Path) -> None:
    cfg = write(tmp_path, base(tmp_path) + '[gps]\nreplay = "trip\\u0000.nmea"\n')
    [p] = problems_of(cfg)
    assert p.startswith("[gps] replay: must not contain control characters")


def test_gpsd_address_must_be_a_host_and_a_port(tmp_path: Path) -> None:
    for bad in ("localhost:99999", "localhost:0", "-bad-:2947", "a..b:2947"):
        [p] = problems_of(write(tmp_path, base(tmp_path) + f'[gps]\ngpsd = "{bad}"\n'))
        assert p.startswith("[gps] gpsd: "), p
    rc, _out, err = check(write(tmp_path, base(tmp_path) + '[gps]\ngpsd = "127.0.0.1:2947"\n'))
    assert rc == 0, err


def test_mqtt_host_must_be_a_host_name_or_address(tmp_path: Path) -> None:
    for bad in ("", "a b", "x" * 300, "bad_label-.example"):
        [p] = problems_of(write(tmp_path, base(tmp_path).replace("[mqtt]\n", f'[mqtt]\nhost = "{bad}"\n')))
        assert p.startswith("[mqtt] host: ")
    for good in ("broker.example.com", "10.8.0.1", "::1", "mosquitto_1"):
        rc, _out, err = check(write(tmp_path, base(tmp_path).replace("[mqtt]\n", f'[mqtt]\nhost = "{good}"\n')))
        assert rc == 0, err


def test_serial_ports_may_be_absent_but_must_be_devices(tmp_path: Path) -> None:
    absent = "/dev/ttyUSB-lorry-agent-test"
    rc, out, err = check(write(tmp_path, base(tmp_path) + f'[gps]\nport = "{absent}"\n'))
    assert rc == 0, err  # a USB receiver may be plugged in later
    rc, out, err = check(write(tmp_path, base(tmp_path) + '[gps]\nport = "/dev/serial/by-id/usb-u-blox*"\n'))
    assert rc == 0, err
    rc, out, err = check(write(tmp_path, base(tmp_path) + '[gps]\nport = "loop://"\n'))
    assert rc == 0, err
    [p] = problems_of(write(tmp_path, base(tmp_path) + '[gps]\nport = "lorry://x"\n'))
    assert p.startswith("[gps] port: unknown pyserial URL scheme 'lorry'; known: ") and "loop" in p
    [p] = problems_of(write(tmp_path, base(tmp_path) + f'[gps]\nport = "{tmp_path}"\n'))
    assert p.startswith(f"[gps] port: {tmp_path} is a folder, not the GPS receiver's serial device")
    seal = '[[seals]]\nname = "lock"\ndriver = "serial"\nport = "{}"\n'
    rc, out, err = check(write(tmp_path, base(tmp_path) + seal.format(absent)))
    assert rc == 0, err
    (tmp_path / "ttyS9").write_text("")
    [p] = problems_of(write(tmp_path, base(tmp_path) + seal.format(tmp_path / "ttyS9")))
    assert p.startswith(f"[seals #1 (lock)] port: {tmp_path}/ttyS9 is a regular file, not a serial device")


def test_gpio_chips_and_the_1wire_folder_are_checked_by_role(tmp_path: Path) -> None:
    (tmp_path / "gpiochip9").write_text("")
    [p] = problems_of(write(tmp_path, base(tmp_path) + f'[ignition]\nchip = "{tmp_path}/gpiochip9"\n'))
    assert p.startswith(f"[ignition] chip: {tmp_path}/gpiochip9 is a regular file, not a GPIO chip")
    rc, out, err = check(write(tmp_path, base(tmp_path) + '[ignition]\nchip = "/dev/gpiochip-absent"\n'))
    assert rc == 0, err
    probe = '[[temperature]]\nname = "reefer"\ndriver = "ds18b20"\nsensor_id = "28-0316a2795dff"\nw1_root = "{}"\n'
    rc, out, err = check(write(tmp_path, base(tmp_path) + probe.format(tmp_path / "no-w1-yet")))
    assert rc == 0, err
    [p] = problems_of(write(tmp_path, base(tmp_path) + probe.format(tmp_path / "gpiochip9")))
    assert p.startswith(f"[temperature #1 (reefer)] w1_root: {tmp_path}/gpiochip9 is a regular file; must be")
    seal = '[[seals]]\nname = "door"\ndriver = "gpio"\nline = 70000\n'
    ps = problems_of(write(tmp_path, base(tmp_path) + seal))
    assert ps and all(p.startswith("[seals #1 (door)] line: ") for p in ps)
    assert any("65535" in p for p in ps)


def test_key_files_by_role(tmp_path: Path) -> None:
    key = tmp_path / "hmac.key"
    key.write_text("k" * 32)
    key.chmod(0o600)
    for section, name in (("chain", "hmac_key_file"), ("commands", "key_file")):
        rc, out, err = check(write(tmp_path, base(tmp_path) + f'[{section}]\n{name} = "hmac.key"\n'))
        assert rc == 0, err
        [p] = problems_of(write(tmp_path, base(tmp_path) + f'[{section}]\n{name} = "nope.key"\n'))
        assert p.startswith(f"[{section}] {name}: {tmp_path}/nope.key: no such file")
        [p] = problems_of(write(tmp_path, base(tmp_path) + f'[{section}]\n{name} = "{tmp_path}"\n'))
        assert p.startswith(f"[{section}] {name}: {tmp_path} is a folder")


def test_a_geofence_the_runtime_would_refuse_is_refused_by_check_config(tmp_path: Path) -> None:
    # Three corners, one place: pydantic said OK, the agent raised ValueError at start.
    fence = '[[geofences]]\nname = "yard"\npolygon = [[21.9, 106.7], [21.9, 106.7], [21.9, 106.7]]\n'
    cfg = write(tmp_path, base(tmp_path) + fence)
    [p] = problems_of(cfg)
    assert p.startswith("[geofences #1 (yard)]: ") and "3 distinct corners" in p
    refused_by_run_too(cfg, "[geofences #1 (yard)]")


def test_scripted_times_are_bounded(tmp_path: Path) -> None:
    seal = '[[seals]]\nname = "door"\ndriver = "sim"\nevents = [{{at = {}, event = "opened"}}]\n'
    [p] = problems_of(write(tmp_path, base(tmp_path) + seal.format("0001-01-01T00:00:00Z")))
    assert p.startswith("[seals #1 (door).events #1] at: must be a time between 2000-01-01 and 2099-12-31")
    rc, out, err = check(write(tmp_path, base(tmp_path) + seal.format("2026-11-21T16:40:00")))
    assert rc == 0, err


# -- the rules, for every key ---------------------------------------------------------------------


def _flatten(meta: list[Any]) -> list[Any]:
    out = []
    for m in meta:
        out += _flatten(list(m.metadata)) if hasattr(m, "metadata") and not isinstance(m, Role) else [m]
    return out


def _leaves(tp: Any, meta: list[Any]) -> list[tuple[Any, list[Any]]]:
    """(leaf type, constraints) of every scalar an annotation admits."""
    origin = get_origin(tp)
    if origin is Annotated:
        inner, *extra = get_args(tp)
        return _leaves(inner, meta + _flatten(extra))
    if origin in (typing.Union, types.UnionType):
        return [leaf for arg in get_args(tp) for leaf in _leaves(arg, meta)]
    if origin is dict:
        return _leaves(get_args(tp)[1], [])
    if origin in (list, tuple):
        return [leaf for arg in get_args(tp) if arg is not Ellipsis for leaf in _leaves(arg, [])]
    return [(tp, meta)]


def _models(model: type[BaseModel] = Config, seen: set[type[BaseModel]] | None = None) -> list[type[BaseModel]]:
    seen = set() if seen is None else seen
    if model in seen:
        return []
    seen.add(model)
    out = [model]
    for field in model.model_fields.values():
        for tp, _meta in _leaves(field.annotation, []):
            if isinstance(tp, type) and issubclass(tp, BaseModel):
                out += _models(tp, seen)
    return out


def _fields() -> list[tuple[type[BaseModel], str, Any, list[Any]]]:
    """(model, key, leaf type, constraints) for every scalar of every key of the schema."""
    out = []
    for model in _models():
        for name, field in model.model_fields.items():
            for tp, meta in _leaves(field.annotation, _flatten(list(field.metadata))):
                out.append((model, name, tp, meta))
    return out


def test_every_number_in_the_schema_has_both_bounds() -> None:
    unbounded = []
    for model, name, tp, meta in _fields():
        if tp in (int, float):
            low = any(hasattr(m, "ge") or hasattr(m, "gt") for m in meta)
            high = any(hasattr(m, "le") or hasattr(m, "lt") for m in meta)
            if not (low and high):
                unbounded.append(f"{model.__name__}.{name}")
    assert unbounded == [], "numbers without a lower and an upper bound"


def test_every_file_key_has_a_role() -> None:
    roleless = []
    for model in _models():
        for name, field in model.model_fields.items():
            paths = [tp for tp, _m in _leaves(field.annotation, []) if tp is Path]
            if paths and not any(isinstance(m, Role) for m in field.metadata):
                roleless.append(f"{model.__name__}.{name}")
    assert roleless == []
    assert len(_models()) > 20


def test_every_key_naming_a_file_or_a_device_is_checked_by_its_role(tmp_path: Path) -> None:
    from agent.config import parse, role_keys

    cfg = parse({
        "device": {"id": "x"}, "gps": {"port": "/dev/ttyUSB0"}, "ignition": {},
        "can": {"interface": "replay", "replay": "c.log", "dbc": ["a.dbc"]},
        "mqtt": {"username": "u", "password_file": "p", "tls": {"ca_file": "ca", "cert_file": "c", "key_file": "k"}},
        "chain": {"hmac_key_file": "h"}, "commands": {"key_file": "k2"},
        "seals": [ITEMS[("seals", "gpio")], ITEMS[("seals", "serial")]],
        "temperature": [ITEMS[("temperature", "ds18b20")]],
    }, tmp_path / "agent.toml")
    roles = {where: role.role for where, role, value in role_keys(cfg) if value not in (None, [])}
    assert roles == {
        "[mqtt] password_file": "secret", "[mqtt.tls] ca_file": "input", "[mqtt.tls] cert_file": "input",
        "[mqtt.tls] key_file": "secret", "[store] path": "store", "[gps] port": "serial", "[can] replay": "input",
        "[can] dbc": "input", "[ignition] chip": "gpiochip", "[seals #1 (rear)] chip": "gpiochip",
        "[seals #2 (lock)] port": "serial", "[temperature #1 (probe)] w1_root": "device_folder",
        "[chain] hmac_key_file": "secret", "[commands] key_file": "secret",
    }


# -- hypothesis: absurd values at every key -------------------------------------------------------


class Raw(str):
    """TOML text put in as it is (nesting a thousand deep)."""


def toml_value(v: Any) -> str:
    if isinstance(v, Raw):
        return str(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, dt.datetime):
        return v.isoformat()
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {toml_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return json.dumps(str(v), ensure_ascii=False).replace("\x7f", "\\u007f")


def toml_text(doc: dict[str, Any]) -> str:
    """Top-level values first, then sections as tables, then arrays of tables."""
    def is_table_array(v: Any) -> bool:
        return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)

    def key(k: Any) -> str:
        return json.dumps(str(k), ensure_ascii=False)

    lines = [f"{key(n)} = {toml_value(v)}" for n, v in doc.items() if not isinstance(v, dict) and not is_table_array(v)]
    for n, v in doc.items():
        if isinstance(v, dict):
            lines.append(f"[{key(n)}]")
            lines += [f"{key(k)} = {toml_value(x)}" for k, x in v.items()]
    for n, v in doc.items():
        if is_table_array(v):
            for item in v:
                lines.append(f"[[{key(n)}]]")
                lines += [f"{key(k)} = {toml_value(x)}" for k, x in item.items()]
    return "\n".join(lines) + "\n"


T0 = dt.datetime(2026, 11, 20, 22, 0, tzinfo=UTC)
ITEMS: dict[tuple[str, str], dict[str, Any]] = {
    ("seals", "sim"): {"name": "door", "driver": "sim",
                       "events": [{"at": T0 + dt.timedelta(minutes=5), "event": "opened"}]},
    ("seals", "gpio"): {"name": "rear", "driver": "gpio", "line": 5},
    ("seals", "serial"): {"name": "lock", "driver": "serial", "port": "/dev/ttyUSB-lorry-agent-test"},
    ("temperature", "sim"): {"name": "reefer", "driver": "sim", "interval_s": 60,
                             "profile": [{"at": T0, "c": 4.0}, {"at": T0 + dt.timedelta(hours=1), "c": 9.0}]},
    ("temperature", "ds18b20"): {"name": "probe", "driver": "ds18b20", "sensor_id": "28-0316a2795dff",
                                 "w1_root": "w1"},
    ("geofences", ""): {"name": "yard", "kind": "customs", "circle": {"lat": 22.0, "lon": 106.7, "radius_m": 500}},
    ("profiles", ""): {"name": "home", "live": ["position", "alarm"]},
}


def base_doc(folder: Path) -> dict[str, Any]:
    """A usable config with a source of every kind that runs here, to be spoilt key by key."""
    return {
        "device": {"id": "CQ-HN-0042"},
        "mqtt": {"host": "127.0.0.1", "port": 1883},
        "store": {"path": str(folder / "state" / "buffer.db")},
        "gps": {"replay": "trip.nmea", "replay_speed": 0},
        "reporting": {"min_period_s": 0, "min_distance_m": 0, "min_heading_deg": 0},
        "time": {"trust_system_clock": "always"},
        "seals": [copy.deepcopy(ITEMS[("seals", "sim")])],
        "temperature": [copy.deepcopy(ITEMS[("temperature", "sim")])],
        "geofences": [copy.deepcopy(ITEMS[("geofences", "")])],
        "profiles": [copy.deepcopy(ITEMS[("profiles", "")])],
    }


def _key_catalog() -> list[tuple[tuple[str, ...], str, list[Any]]]:
    """(where in the document, key, constraints) for every key of the schema."""
    out: list[tuple[tuple[str, ...], str, list[Any]]] = []

    def walk(model: type[BaseModel], where: tuple[str, ...]) -> None:
        for name, field in model.model_fields.items():
            leaves = _leaves(field.annotation, _flatten(list(field.metadata)))
            subs = [tp for tp, _m in leaves if isinstance(tp, type) and issubclass(tp, BaseModel)]
            listed = get_origin(field.annotation) is list
            if (subs and len(where) < 3 and not (model is Config and listed)
                    and get_origin(field.annotation) is not dict):
                for sub in subs:
                    walk(sub, (*where, name))
            meta = next((m for tp, m in leaves if tp in (int, float)), [])
            out.append((where, name, meta))
        if model is Config:
            for (kind, driver) in ITEMS:
                sub = next(m for m in _models() if m.__name__ in _ITEM_MODEL[(kind, driver)])
                for name in sub.model_fields:
                    out.append(((kind, driver), name, next(
                        (m for tp, m in _leaves(sub.model_fields[name].annotation,
                                                _flatten(list(sub.model_fields[name].metadata)))
                         if tp in (int, float)), [])))

    walk(Config, ())
    return out


def _leaves_of(where: tuple[str, ...], key: str) -> list[tuple[Any, list[Any]]]:
    if where and (where[0], where[1] if len(where) > 1 else "") in _ITEM_MODEL and where[0] in (
            "seals", "temperature", "geofences", "profiles"):
        name = _ITEM_MODEL[(where[0], where[1] if len(where) > 1 else "")][0]
        model = next(m for m in _models() if m.__name__ == name)
    else:
        model = Config
        for part in where:
            field = model.model_fields[part]
            model = next(tp for tp, _m in _leaves(field.annotation, [])
                         if isinstance(tp, type) and issubclass(tp, BaseModel))
    field = model.model_fields[key]
    return _leaves(field.annotation, _flatten(list(field.metadata)))


_ITEM_MODEL = {
    ("seals", "sim"): ("SimSealConfig",), ("seals", "gpio"): ("GpioSealConfig",),
    ("seals", "serial"): ("SerialSealConfig",), ("temperature", "sim"): ("SimTemperatureConfig",),
    ("temperature", "ds18b20"): ("Ds18b20Config",), ("geofences", ""): ("GeofenceConfig",),
    ("profiles", ""): ("UplinkProfileConfig",),
}
KEYS = _key_catalog()


def _bound_values(meta: list[Any]) -> list[Any]:
    """The edges of a number's bounds, and just past them."""
    out: list[Any] = []
    for m in meta:
        for attr in ("ge", "gt", "le", "lt"):
            if (v := getattr(m, attr, None)) is not None:
                out += [v, v * 1.5 + 1, -v - 1, v / 2]
                if attr in ("gt", "lt"):
                    out.append(v + (1e-9 if attr == "gt" else -1e-9))
    return out


scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.sampled_from([0, -1, 1, 2, 60, 65535, 65536, 99999, 2**31, 2**53, 10**18]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e308, -1e308, 1e-300, 5e-324, 0.001, 0.5, 604800.0, 604801.0, 1e9, 1e12]),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30),
    st.sampled_from(["", " ", "/", ".", "..", "/dev/null", "/dev/zero", "/proc", "/proc/self/mem", "/etc/passwd",
                     "loop://", "socket://localhost:1", "lorry://x", "x" * 5000, "a\x00b", "localhost:99999",
                     "localhost:2947", "*", "/dev/tty*", "/dev/ttyUSB-absent", "trip.nmea", "state", "w1",
                     "default", "position", "gpio", "sim", "serial", "ds18b20", "2026-11-21T16:40:00Z"]),
    st.datetimes(min_value=dt.datetime(1, 1, 2), max_value=dt.datetime(9999, 12, 30),
                 timezones=st.sampled_from([None, UTC, dt.timezone(dt.timedelta(hours=14))])),
)
junk = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=10), inner, max_size=3), max_leaves=8)
deep = st.integers(min_value=100, max_value=4000).map(lambda n: Raw("[" * n + "]" * n))


@st.composite
def mutation(draw: st.DrawFn) -> tuple[tuple[str, ...], str, Any]:
    where, key, meta = draw(st.sampled_from(KEYS))
    value = draw(st.one_of(junk, deep, st.sampled_from(_bound_values(meta) or [0]))) if meta else draw(
        st.one_of(junk, junk, deep))
    return where, key, value


def _in_bounds(meta: list[Any], integer: bool) -> st.SearchStrategy[Any]:
    lo = next((getattr(m, a) for m in meta for a in ("ge", "gt") if getattr(m, a, None) is not None), None)
    hi = next((getattr(m, a) for m in meta for a in ("le", "lt") if getattr(m, a, None) is not None), None)
    if lo is None or hi is None:
        return st.nothing()
    open_lo = any(getattr(m, "gt", None) is not None for m in meta)
    if integer:
        return st.integers(min_value=int(lo) + open_lo, max_value=int(hi))
    edges = [hi, max(lo, 0.001), lo + 1e-9 if open_lo else lo]
    return st.sampled_from(edges) | st.floats(min_value=lo, max_value=hi, exclude_min=open_lo)


NUMERIC_KEYS = [(where, key, meta, tp is int) for where, key, meta in KEYS
                for tp in [next((t for t, _m in _leaves_of(where, key) if t in (int, float)), None)]
                if tp is not None and key not in ("polygon", "every_s")]


@st.composite
def allowed_number(draw: st.DrawFn) -> tuple[tuple[str, ...], str, Any]:
    """A number at a key, anywhere its bounds allow: the edges most of all."""
    where, key, meta, integer = draw(st.sampled_from(NUMERIC_KEYS))
    return where, key, draw(_in_bounds(meta, integer))


def apply(doc: dict[str, Any], where: tuple[str, ...], key: str, value: Any) -> None:
    if where and (where[0], where[1] if len(where) > 1 else "") in ITEMS and where[0] in ("seals", "temperature",
                                                                                          "geofences", "profiles"):
        kind = where[0]
        driver = where[1] if len(where) > 1 else ""
        item = copy.deepcopy(ITEMS[(kind, driver)])
        item[key] = value
        doc[kind] = [item]
        return
    node = doc
    for part in where:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[key] = value


def materialise(folder: Path, mutations: list[tuple[tuple[str, ...], str, Any]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "trip.nmea").exists():
        trip.write(folder / "trip.nmea", interval_s=60, max_hours=0.3)
    doc = base_doc(folder)
    for where, key, value in mutations:
        apply(doc, where, key, value)
    path = folder / "agent.toml"
    path.write_text(toml_text(doc), encoding="utf-8")
    return path


def _names(mutations: list[tuple[tuple[str, ...], str, Any]]) -> set[str]:
    return {key for _w, key, _v in mutations} | {w[0] for w, _k, _v in mutations if w}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutations=st.lists(mutation(), min_size=1, max_size=3))
def test_check_config_never_raises_and_names_the_key(tmp_path_factory: pytest.TempPathFactory,
                                                     mutations: list[Any]) -> None:
    cfg = materialise(tmp_path_factory.mktemp("fuzz"), mutations)
    rc, out, err = check(cfg)
    assert rc in (0, 1)
    if rc == 0:
        assert out.startswith(f"{cfg}: OK") and err == ""
        return
    assert err.startswith(f"{HEADER}{cfg}:\n")
    lines = err.splitlines()[1:]
    assert lines and all(line.startswith("  ") and line.strip() for line in lines), err
    whole_file = any(w in err for w in ("not valid TOML", "nested too deeply", "not UTF-8"))
    assert whole_file or any(name in err for name in _names(mutations)), (mutations, err)


DRY_RUN_S = 40


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutations=st.lists(allowed_number() | allowed_number() | mutation(), min_size=1, max_size=3))
def test_what_check_config_accepts_runs_without_a_traceback(tmp_path_factory: pytest.TempPathFactory,
                                                            mutations: list[Any]) -> None:
    cfg = materialise(tmp_path_factory.mktemp("fuzz-run"), mutations)
    rc, _out, _err = check(cfg)
    if rc != 0:
        return
    proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--dry-run", "--config", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        _o, err = proc.communicate(timeout=DRY_RUN_S)
    except subprocess.TimeoutExpired:  # a slow replay, a chatty simulation: stopping it must be clean too
        proc.send_signal(signal.SIGTERM)
        _o, err = proc.communicate(timeout=30)
    assert "Traceback" not in err, (mutations, err[-3000:])
    assert proc.returncode == 0, (mutations, err[-3000:])
