"""Unattended operation: the locked-down systemd unit, bounded logs, hostile configs."""

from __future__ import annotations

import logging
import re
import shutil
import sys
import tomllib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import config
from agent.daemon.dropin import dropin
from agent.daemon.logs import RateLimit

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "lorry-agent.service"
INSTALLED = "/opt/lorry-agent/venv/bin/lorry-agent"


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.fail("systemd-analyze is missing: .ci/setup --tests installs systemd (apt-get install -y systemd)")
    return found


def unit_here(tmp_path: Path, extra: str = "") -> Path:
    """The unit with ExecStart pointing at this checkout's lorry-agent (verify wants it to exist)."""
    here = str(Path(sys.executable).parent / "lorry-agent")
    copy = tmp_path / "lorry-agent.service"
    copy.write_text(UNIT.read_text().replace(INSTALLED, here) + extra)
    return copy


def test_unit_verifies_clean(tmp_path: Path) -> None:
    import subprocess

    r = subprocess.run([systemd_analyze(), "verify", str(unit_here(tmp_path))], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "" and r.stderr.strip() == "", r.stdout + r.stderr


def test_unit_exposure_is_at_most_2(tmp_path: Path) -> None:
    import subprocess

    r = subprocess.run([systemd_analyze(), "security", "--offline=true", str(UNIT)], capture_output=True, text=True)
    found = re.search(r"Overall exposure level for lorry-agent.service: (\d+\.\d+)", r.stdout)
    assert found, r.stdout[-500:] + r.stderr
    assert float(found.group(1)) <= 2.0, r.stdout


def test_unit_never_gives_up_and_keeps_state_in_var_lib() -> None:
    text = UNIT.read_text()
    for line in ("Type=notify", "WatchdogSec=", "Restart=always", "StartLimitIntervalSec=0", "User=lorry-agent",
                 "StateDirectory=lorry-agent", "ProtectSystem=strict", "CapabilityBoundingSet=\n",
                 "SystemCallFilter=@system-service", "NoNewPrivileges=yes", "DevicePolicy=closed"):
        assert line in text, line
    assert re.search(r"RestrictAddressFamilies=.*AF_CAN", text)


def test_device_dropin_allows_only_configured_devices(tmp_path: Path) -> None:
    import subprocess

    cfg = config.parse({
        "device": {"id": "x"},
        "gps": {"port": "/dev/serial/by-id/usb-u-blox_GNSS*"},
        "seals": [{"name": "lock", "driver": "serial", "port": "/dev/ttyAMA2"},
                  {"name": "door", "driver": "gpio", "line": 22}],
    })
    text = dropin(cfg)
    allowed = [line.split("=", 1)[1] for line in text.splitlines() if line.startswith("DeviceAllow=")]
    assert allowed == ["", "char-ttyUSB rw", "char-ttyACM rw", "/dev/ttyAMA2 rw", "char-gpiochip rw"]
    r = subprocess.run([systemd_analyze(), "verify", str(unit_here(tmp_path, "\n" + text))],
                       capture_output=True, text=True)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr


def test_repeated_log_messages_are_bounded() -> None:
    now = [0.0]
    limit = RateLimit(burst=5, window_s=60, clock=lambda: now[0])
    passed = []
    for _ in range(10_000):
        rec = logging.LogRecord("agent.uplink.mqtt", logging.WARNING, __file__, 1, "MQTT: cannot connect to %s",
                                ("b",), None)
        if limit.filter(rec):
            passed.append(rec.getMessage())
        now[0] += 0.1  # a message every 100 ms for ~17 minutes
    assert len(passed) <= 5 * (1000 // 60 + 2)
    assert any("more like it" in p for p in passed), "suppression is said, not silent"
    other = logging.LogRecord("agent.store.buffer", logging.ERROR, __file__, 1, "store commit failed (%s)",
                              ("x",), None)
    assert limit.filter(other), "a different message is not held back by the first"


# Any TOML value: a config loader facing a technician's typo or a corrupted file.
toml_scalars = st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=False, allow_infinity=False),
                         st.text(max_size=20), st.booleans())
toml_values = st.recursive(toml_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)), max_leaves=20)
SECTIONS = ["device", "mqtt", "store", "gps", "can", "ignition", "reporting", "time", "health", "chain",
            "commands", "seals", "temperature", "geofences", "log", "bogus"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(SECTIONS), toml_values, max_size=6))
def test_config_loader_never_crashes(raw: dict) -> None:
    try:
        config.parse(raw, "fuzz.toml")
    except config.ConfigError as e:
        assert e.problems and all(isinstance(p, str) and p for p in e.problems)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_config_files_of_any_text_never_crash(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "agent.toml"
    path.write_text(text)
    try:
        config.load(path)
    except config.ConfigError as e:
        assert e.path == str(path) and e.problems


def test_example_config_has_tls_on() -> None:
    raw = tomllib.loads((REPO / "config" / "agent.example.toml").read_text())
    assert raw["mqtt"]["port"] == 8883
    tls = raw["mqtt"]["tls"]
    assert {"ca_file", "cert_file", "key_file"} <= set(tls)
