"""The layout's rules, checked on the source (issue 13): drivers depend on the reading model
only, the import graph has no cycles, driver modules stay small, and a new sensor kind is its
package and one registry line, with nothing to change in agent/.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

import drivers
from agent import cli
from agent.config import schema
from support import REPO

DRIVER_KINDS = {target.split(":")[0].split(".")[1] for kind in drivers.REGISTRY.values()
                for entry in kind.values() for target in entry}
"""The driver packages (drivers/gps, drivers/can…); the rest of drivers/ is what they share
(drivers/base.py, drivers/gpio/, drivers/devices.py, drivers/simtime.py)."""
MAX_LINES = 400


def modules(*tops: str) -> dict[str, Path]:
    out = {}
    for top in tops:
        for path in sorted((REPO / top).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(path: Path, known: dict[str, Path]) -> Iterator[tuple[int, str]]:
    """Every module an import statement in ``path`` names (at any depth: a lazy import in a
    function is a dependency too), with its line; ``from pkg import sub`` names ``pkg.sub``.
    Imports under ``if TYPE_CHECKING:`` are for the type checker only and are skipped."""
    own = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")

    def walk(node: ast.AST) -> Iterator[tuple[int, str]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and isinstance(child.test, ast.Name) and child.test.id == "TYPE_CHECKING":
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield child.lineno, alias.name
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                if child.module != own:
                    yield child.lineno, child.module
                for alias in child.names:
                    if f"{child.module}.{alias.name}" in known:
                        yield child.lineno, f"{child.module}.{alias.name}"
            yield from walk(child)

    yield from walk(ast.parse(path.read_text(encoding="utf-8"), str(path)))


def test_drivers_import_no_agent_internals_but_the_model_nor_each_other() -> None:
    known = modules("agent", "drivers")
    wrong = []
    for name, path in modules("drivers").items():
        parts = name.split(".")
        own_kind = parts[1] if len(parts) > 1 and parts[1] in DRIVER_KINDS else None
        for line, target in imports(path, known):
            where = f"{path.relative_to(REPO)}:{line}: imports {target}"
            if (target == "agent" or target.startswith("agent.")) and not target.startswith("agent.model"):
                wrong.append(f"{where} (drivers may import agent.model only)")
            t = target.split(".")
            if t[0] == "drivers" and len(t) > 1 and t[1] in DRIVER_KINDS and t[1] != own_kind:
                wrong.append(f"{where} (another driver's package; share through drivers/ or agent.model)")
    assert not wrong, "\n".join(wrong)


# A lazy import that closes a loop: agent/config/cargo.py's geofence validator asks the runtime
# (agent/pipeline/geofence.py `Zone`) so that check-config refuses what `run` would; geofence.py
# imports GeofenceConfig for its annotations only. Gone once that import moves under
# `if TYPE_CHECKING:` in agent/pipeline/geofence.py.
KNOWN_LAZY_CYCLES = [{"agent.config.cargo", "agent.pipeline.geofence"}]


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(component)
    return found


def test_no_import_cycles_among_agent_and_drivers() -> None:
    known = modules("agent", "drivers")
    graph = {name: {t for _, t in imports(path, known) if t in known and t != name} for name, path in known.items()}
    found = [c for c in cycles(graph) if c not in KNOWN_LAZY_CYCLES]
    assert not found, "import cycles: " + "; ".join(" <-> ".join(sorted(c)) for c in found)


def test_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
    assert cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("top", ["agent", "drivers"])
def test_modules_are_small(top: str) -> None:
    big = [f"{p.relative_to(REPO)}: {n} lines" for p in sorted((REPO / top).rglob("*.py"))
           if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES]
    assert not big, f"over {MAX_LINES} lines: " + ", ".join(big)


def test_the_config_schema_imports_no_driver_dependencies() -> None:
    """Building the schema imports every registered config model, never a driver's module nor
    what it needs (serial, gpiod, python-can, cantools): those come when a config uses them."""
    code = ("import sys, agent.config, agent.config.schema as s; s.section_model('seal'); "
            "print([m for m in sys.modules if m.split('.')[0] in ('serial', 'gpiod', 'can', 'cantools')"
            " or m in ('drivers.gps.receiver', 'drivers.can.bus', 'drivers.seal.serial', 'drivers.gpio.lines')])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


# -- a new temperature sensor kind -----------------------------------------------------------------
# What adding one touches, shown with a throwaway one: its package (config model and driver),
# one registry line (here `drivers.register`, as the line in drivers/__init__.py REGISTRY would
# be), and a config stanza. Nothing in agent/: check-config, run and unit-dropin take it as is.

PROBE_CONFIG = '''
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from agent.model.settings import NAME, Delay, Role
from drivers.temperature.config import TemperatureLimits


class ProbeConfig(TemperatureLimits):
    name: Annotated[str, Field(pattern=NAME, max_length=64)]
    driver: Literal["probe"]
    file: Annotated[Path, Role("input", "the probe's reading")]
    device: str = "/dev/probe0"
    interval_s: Delay = 60
'''

PROBE_DRIVER = '''
import threading
import time
from typing import Any

from agent.model.reading import Reading
from drivers.base import Driver


class Probe(Driver):
    kind = "temperature"

    def __init__(self, config, emit):
        super().__init__(config, emit)
        self.reads = 0

    @classmethod
    def check(cls, config) -> list[str]:
        text = config.file.read_text().strip()
        if text.replace(".", "", 1).lstrip("-").isdigit():
            return []
        return [f"[temperature ({config.name})] file: not a number"]

    @classmethod
    def devices(cls, config) -> list[str]:
        return [f"{config.device} r"]

    def run(self, stop: threading.Event) -> None:
        while True:
            self.reads += 1
            data = {"sensor": self.config.name, "c": float(self.config.file.read_text()), "error": None}
            self.emit(Reading("temperature", None, data, meta={"mono_ns": time.monotonic_ns()}))
            if stop.wait(self.config.interval_s):
                return

    def snapshot(self) -> dict[str, Any]:
        return {"reads": self.reads}
'''

PROBE_ENTRY = {"config": "probe_sensor.config:ProbeConfig", "driver": "probe_sensor.driver:Probe"}


@pytest.fixture
def probe_kind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The throwaway kind's package, importable and registered; unregistered afterwards."""
    plugins = tmp_path / "plugins"
    package = plugins / "probe_sensor"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('"""A temperature probe that reads a number from a file."""\n')
    (package / "config.py").write_text(PROBE_CONFIG)
    (package / "driver.py").write_text(PROBE_DRIVER)
    monkeypatch.syspath_prepend(str(plugins))
    drivers.register("temperature", "probe", **PROBE_ENTRY)
    try:
        yield plugins
    finally:
        drivers.unregister("temperature", "probe")
        schema.refresh()
        for name in [m for m in sys.modules if m.split(".")[0] == "probe_sensor"]:
            del sys.modules[name]


def probe_config(tmp_path: Path, driver: str = "probe", name: str = "agent.toml") -> Path:
    (tmp_path / "hold.txt").write_text("4.5\n")
    cfg = tmp_path / name
    cfg.write_text(textwrap.dedent(f"""
        [device]
        id = "CQ-HN-0042"

        [store]
        path = "{tmp_path / 'state' / 'buffer.db'}"
        sync_interval_s = 0.1

        [time]
        trust_system_clock = "always"

        [[temperature]]
        name = "hold"
        driver = "{driver}"
        file = "hold.txt"
        interval_s = 0.2
        high_c = 8
    """))
    return cfg


def test_a_new_temperature_sensor_kind_needs_nothing_in_agent(tmp_path: Path, probe_kind: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    cfg = probe_config(tmp_path)
    assert cli.main(["check-config", str(cfg)]) == 0, capsys.readouterr().err
    assert "sources: temperature:hold" in capsys.readouterr().out

    # Its driver's own check runs, as for a built-in one.
    (tmp_path / "hold.txt").write_text("warm\n")
    assert cli.main(["check-config", str(cfg)]) == 1
    assert "[temperature (hold)] file: not a number" in capsys.readouterr().err
    (tmp_path / "hold.txt").write_text("4.5\n")

    # The device it opens reaches the systemd drop-in through its driver's `devices`.
    assert cli.main(["unit-dropin", "--config", str(cfg)]) == 0
    assert "DeviceAllow=/dev/probe0 r\n" in capsys.readouterr().out

    # `driver =` accepts exactly the registered names, the new one among them.
    bad = probe_config(tmp_path, driver="probes", name="bad.toml")
    assert cli.main(["check-config", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "[temperature #1 (hold)]: driver must be one of 'ds18b20', 'sim', 'probe'" in err, err

    # And `run --dry-run` in a process of its own, where the registry line is the first thing.
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(probe_kind)!r})
        import drivers
        drivers.register("temperature", "probe", **{PROBE_ENTRY!r})
        from agent.cli import main
        sys.exit(main(["run", "--dry-run", "--config", {str(cfg)!r}]))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    published = [json.loads(line) for line in r.stdout.splitlines()]
    temps = [m["payload"] for m in published if m["topic"] == "lorry/CQ-HN-0042/temperature"]
    assert temps and temps[0]["sensor"] == "hold" and temps[0]["c"] == 4.5, published


def test_without_its_registry_line_the_kind_is_unknown(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check-config", str(probe_config(tmp_path))]) == 1
    assert "driver must be one of 'ds18b20', 'sim'\n" in capsys.readouterr().err
