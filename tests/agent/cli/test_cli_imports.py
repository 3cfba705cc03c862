"""Each command imports what it needs only when it runs: the daemon's commands (``run``,
``check-config``, ``status``, ``unit-dropin``) never load the backend tools (``agent.tools``:
``watch``, ``verify-chain``), and the top-level help loads no command at all."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agent.demo import trip
from agent.demo.broker import free_port
from support import REPO, agent_config

PROBE = """
import contextlib, io, json, sys
from agent.cli import main
result_file, argv = sys.argv[1], sys.argv[2:]
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
with open(result_file, "w") as f:
    json.dump({"rc": rc, "modules": sorted(sys.modules)}, f)
"""
"""``lorry-agent ARGS`` in a fresh interpreter; writes its exit code and every module it imported."""


def command(tmp: Path, *args: str) -> dict[str, Any]:
    result = tmp / "probe.json"
    r = subprocess.run([sys.executable, "-c", PROBE, str(result), *args], capture_output=True, text=True,
                       cwd=REPO, timeout=120)
    assert r.returncode == 0 and result.exists(), r.stderr
    return json.loads(result.read_text())


def under(modules: list[str], package: str) -> list[str]:
    return [m for m in modules if m == package or m.startswith(package + ".")]


@pytest.fixture
def config(tmp_path: Path) -> Path:
    capture = tmp_path / "t.nmea"
    trip.write(capture, interval_s=5, max_hours=0.05)
    return agent_config(tmp_path, free_port(), gps={"replay": str(capture), "replay_speed": 0})


@pytest.mark.parametrize("args,rc", [
    (("run", "--dry-run"), 0),
    (("check-config",), 0),
    (("status",), 1),  # no store yet: it says so, having imported all it needs to read one
    (("unit-dropin",), 0),
])
def test_the_daemons_commands_never_import_the_backend_tools(tmp_path: Path, config: Path, args: tuple[str, ...],
                                                             rc: int) -> None:
    r = command(tmp_path, *args, "--config", str(config))
    assert r["rc"] == rc
    assert "agent.config" in r["modules"], "the probe sees what the command imported"
    assert under(r["modules"], "agent.tools") == []
    assert "agent.compact.decoder" not in r["modules"], "the device encodes; only the backend decodes"


def test_the_backend_tools_load_only_for_their_own_commands(tmp_path: Path) -> None:
    verify = command(tmp_path, "verify-chain", str(tmp_path / "none.jsonl"))
    assert verify["rc"] == 2
    assert "agent.tools.verify" in verify["modules"]
    assert under(verify["modules"], "agent.tools.watch") == []
    assert under(verify["modules"], "agent.config") == [], "a backend machine checks a record without the schema"

    help_only = command(tmp_path, "--help")
    assert help_only["rc"] == 0
    assert under(help_only["modules"], "agent") == ["agent", "agent.cli"]
