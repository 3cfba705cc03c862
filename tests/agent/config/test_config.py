"""Configuration: the documented keys work, and every mistake is named precisely."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent import config
from agent.config import ConfigError

REPO = Path(__file__).resolve().parents[3]

MINIMAL = '[device]\nid = "CQ-HN-0042"\n'


def load_text(tmp_path: Path, text: str) -> config.Config:
    p = tmp_path / "agent.toml"
    p.write_text(text)
    return config.load(p)


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_text(tmp_path, text)
    assert e.value.path.endswith("agent.toml")
    return e.value.problems


@pytest.mark.parametrize("name", ["config/agent.example.toml", "agent/demo/data/demo.toml"])
def test_shipped_configs_are_valid(name: str) -> None:
    cfg = config.load(REPO / name)
    assert cfg.device.id == "CQ-HN-0042"
    assert cfg.topic("position") == "lorry/CQ-HN-0042/position"


def test_the_issue_keys_work_as_written(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, """
[device]
id = "CQ-HN-0042"
[mqtt]
host = "10.8.0.1"
port = 1884
topic_prefix = "fleet"
[store]
path = "/var/lib/lorry-agent/buffer.db"
[gps]
port = "/dev/serial0"
baudrate = 9600
[reporting]
min_period_s = 30
min_distance_m = 200
min_heading_deg = 15
""")
    assert (cfg.mqtt.host, cfg.mqtt.port, cfg.mqtt.topic_prefix) == ("10.8.0.1", 1884, "fleet")
    assert cfg.store.path == Path("/var/lib/lorry-agent/buffer.db")
    assert cfg.gps is not None and (cfg.gps.port, cfg.gps.baudrate) == ("/dev/serial0", 9600)
    assert (cfg.reporting.min_period_s, cfg.reporting.min_distance_m, cfg.reporting.min_heading_deg) == (30, 200, 15)
    assert cfg.topic("status") == "fleet/CQ-HN-0042/status"


def test_replay_and_relative_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, MINIMAL + '[store]\npath = "state/b.db"\n[gps]\nreplay = "trip.nmea"\nreplay_speed = 0\n')
    assert cfg.gps is not None and cfg.gps.replay == tmp_path / "trip.nmea"
    assert cfg.gps.replay_speed == 0
    assert cfg.store.path == tmp_path / "state" / "b.db"


def test_sources_are_optional(tmp_path: Path) -> None:
    assert load_text(tmp_path, MINIMAL).gps is None


def test_missing_key_is_named(tmp_path: Path) -> None:
    assert problems(tmp_path, "[device]\n") == ["[device] id: required key is missing"]
    assert problems(tmp_path, "[mqtt]\nport = 1883\n") == ["[device]: required section is missing"]


def test_wrong_type_is_named_with_the_value(tmp_path: Path) -> None:
    (p,) = problems(tmp_path, MINIMAL + '[mqtt]\nport = "eighteen"\n')
    assert p.startswith("[mqtt] port: ") and "integer" in p and "'eighteen'" in p
    (p,) = problems(tmp_path, MINIMAL + "[mqtt]\nport = 70000\n")
    assert p.startswith("[mqtt] port: ") and "65535" in p


def test_unknown_key_is_named_with_the_allowed_ones(tmp_path: Path) -> None:
    (p,) = problems(tmp_path, MINIMAL + '[mqtt]\nhots = "x"\n')
    assert p.startswith("[mqtt] hots: unknown key; allowed: host, port, topic_prefix")
    (p,) = problems(tmp_path, MINIMAL + "[gpss]\nport = 1\n")
    assert p.startswith("gpss: unknown key; allowed: device, mqtt, store, gps")


def test_several_problems_are_all_reported(tmp_path: Path) -> None:
    ps = problems(tmp_path, '[device]\nid = "bad/id"\n[mqtt]\nport = -1\n[gps]\nbaudrate = 9600\n')
    assert len(ps) == 3
    assert ps[0].startswith("[device] id: must be letters, digits")
    assert ps[1].startswith("[mqtt] port:")
    assert ps[2] == "[gps]: give exactly one of port (a serial device), replay (a file) or gpsd (host:port)"


def test_tls_cert_without_key_is_refused(tmp_path: Path) -> None:
    (p,) = problems(tmp_path, MINIMAL + '[mqtt.tls]\nca_file = "ca.pem"\ncert_file = "c.pem"\n')
    assert p == "[mqtt.tls]: cert_file and key_file must be given together"


def test_syntax_errors_and_missing_files(tmp_path: Path) -> None:
    (p,) = problems(tmp_path, "[device\nid=1")
    assert p.startswith("not valid TOML")
    with pytest.raises(ConfigError, match="file not found"):
        config.load(tmp_path / "nope.toml")


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, cwd=REPO, timeout=60)


def test_check_config_exit_codes(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(MINIMAL)
    r = run_cli("check-config", str(good))
    assert r.returncode == 0 and "OK" in r.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text(MINIMAL + "[mqtt]\nport = 'x'\nhots = 1\n")
    r = run_cli("check-config", str(bad))
    assert r.returncode == 1
    assert str(bad) in r.stderr
    assert "[mqtt] port:" in r.stderr and "[mqtt] hots: unknown key" in r.stderr
    assert run_cli("check-config", "--config", str(good)).returncode == 0


def test_can_signal_names_and_dbc_files_are_checked(tmp_path: Path) -> None:
    cfg = tmp_path / "can.toml"
    cfg.write_text(MINIMAL + '[can]\ninterface = "virtual"\n[can.signals.engine_sped]\nmin_interval_s = 5\n')
    r = run_cli("check-config", str(cfg))
    assert r.returncode == 1
    assert "[can.signals.engine_sped]: unknown signal; built-in: engine_speed" in r.stderr
    bad_dbc = tmp_path / "broken.dbc"
    bad_dbc.write_text("BO_ this is not a DBC\n")
    cfg.write_text(MINIMAL + f'[can]\ninterface = "virtual"\ndbc = ["{bad_dbc}"]\n')
    r = run_cli("check-config", str(cfg))
    assert r.returncode == 1 and "[can] dbc: cannot use" in r.stderr
    r = run_cli("run", "--config", str(cfg))
    assert r.returncode == 1 and "[can] dbc: cannot use" in r.stderr, "the daemon refuses it too"
    cfg.write_text(MINIMAL + '[can]\ninterface = "replay"\n')
    r = run_cli("check-config", str(cfg))
    assert r.returncode == 1 and 'interface = "replay" and replay = "file" go together' in r.stderr


def test_no_number_may_be_infinite_or_not_a_number(tmp_path: Path) -> None:
    for key, section in (("max_hdop", "gps"), ("min_period_s", "reporting"), ("interval_s", "health")):
        for value in ("inf", "-inf", "nan"):
            extra = '\nport = "/dev/ttyUSB0"' if section == "gps" else ""
            ps = problems(tmp_path, MINIMAL + f"[{section}]\n{key} = {value}{extra}\n")
            assert ps == [f"[{section}] {key}: Input should be a finite number (got {float(value)!r})"]


def test_every_period_is_bounded_by_a_week_and_every_retry_by_a_day(tmp_path: Path) -> None:
    (p,) = problems(tmp_path, MINIMAL + "[health]\ninterval_s = 604801\n")
    assert p == "[health] interval_s: Input should be less than or equal to 604800 (got 604801)"
    (p,) = problems(tmp_path, MINIMAL + "[mqtt]\nreconnect_max_s = 86401\n")
    assert p == "[mqtt] reconnect_max_s: Input should be less than or equal to 86400 (got 86401)"
    (p,) = problems(tmp_path, MINIMAL + "[gps]\nport = \"/dev/ttyUSB0\"\nreplay_speed = 1e-9\n")
    assert p == "[gps] replay_speed: must be 0 or at least 0.001 (got 1e-09)"
    assert load_text(tmp_path, MINIMAL + "[health]\ninterval_s = 604800\n").health.interval_s == 604800


def test_a_boolean_is_not_a_number(tmp_path: Path) -> None:
    (p,) = problems(tmp_path, MINIMAL + "[mqtt]\nport = true\n")
    assert p == "[mqtt]: port must not be true (a boolean) here"


def test_every_file_key_is_relative_to_the_config_folder(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, MINIMAL + """
[chain]
hmac_key_file = "keys/chain.key"
[[temperature]]
name = "reefer"
driver = "ds18b20"
sensor_id = "28-0316a2795dff"
w1_root = "fake-sys/w1"
[gps]
port = "ttyUSB0"
""")
    assert cfg.chain.hmac_key_file == tmp_path / "keys" / "chain.key"
    assert cfg.temperature[0].w1_root == tmp_path / "fake-sys" / "w1"
    assert cfg.gps is not None and cfg.gps.port == "ttyUSB0", "a device name is not a file path"


def test_config_errors_never_escape_as_other_exceptions(tmp_path: Path) -> None:
    for text in ("a = " + "[" * 5000 + "]" * 5000, "[device]\nid = \"" + "x" * 100_000 + "\"\n", "\x00\x01"):
        with pytest.raises(ConfigError):
            load_text(tmp_path, text)
    (p,) = problems(tmp_path, "[device]\nid = \"" + "x" * 100 + "/\"\n")
    assert len(p) < 300, "a long value is shortened in the message"
