"""The agent's configuration: one TOML file, validated by pydantic models.

Every section is a model with ``extra="forbid"``, so a misspelt key is an error rather than a
silently ignored setting. Errors are reported as ``FILE: [section] key: problem`` lines that a
technician can act on without reading code.

- agent/config/schema.py: `Config`, the agent's own sections; the sources' sections come from
  the drivers (drivers/*/config.py, named by the registry in drivers/__init__.py);
- agent/config/cargo.py, agent/config/regions.py: geofences, the chain, uplink profiles;
- agent/config/paths.py: keys that name files and devices, checked by their role;
- agent/config/errors.py: validation errors said for a technician;
- here: reading a file (`load`, `parse`) and `ConfigError`.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from agent.config import schema
from agent.config.errors import describe, errors_of
from agent.config.paths import path_problems, reason, resolve_paths, role_keys, usable_problems
from agent.config.schema import (
    MAX_STORE_MB,
    SOURCE_KINDS,
    SOURCE_LISTS,
    SOURCE_SECTIONS,
    TOPIC_SAFE,
    CommandsConfig,
    Config,
    DeviceConfig,
    HealthConfig,
    LogConfig,
    MqttConfig,
    ProfileConfig,
    ReportingConfig,
    StoreConfig,
    TimeConfig,
    TlsConfig,
)

# The sources' own sections, by the names they had here before they moved to their drivers.
from drivers.can.config import CanConfig, SignalConfig
from drivers.gps.config import GpsConfig
from drivers.ignition.config import IgnitionConfig

__all__ = [
    "DEFAULT_PATH", "MAX_CONFIG_BYTES", "MAX_DEPTH", "MAX_STORE_MB", "SOURCE_KINDS", "SOURCE_LISTS",
    "SOURCE_SECTIONS", "TOPIC_SAFE", "CanConfig", "CommandsConfig", "Config", "ConfigError", "DeviceConfig",
    "GpsConfig", "HealthConfig", "IgnitionConfig", "LogConfig", "MqttConfig", "ProfileConfig", "ReportingConfig",
    "SignalConfig", "StoreConfig", "TimeConfig", "TlsConfig", "load", "parse", "path_problems", "role_keys",
    "usable_problems",
]

DEFAULT_PATH = Path("/etc/lorry-agent/agent.toml")
MAX_CONFIG_BYTES = 1 << 20
"""A config is a few KiB; a file larger than 1 MiB is not one."""
MAX_DEPTH = 16
"""Deepest nesting of tables and arrays any key takes ([[geofences]] polygon: 4)."""


class ConfigError(Exception):
    """A configuration file that cannot be used, with one line per problem."""

    def __init__(self, path: Path | str, problems: list[str]):
        self.path = str(path)
        self.problems = problems
        super().__init__("\n".join(f"{self.path}: {p}" for p in problems))


def load(path: Path | str) -> Config:
    """Read and validate a config file; relative file paths are resolved against its folder.

    Whatever the file holds, the answer is a Config or a ConfigError naming the file: never
    another exception (TOML nested thousands deep makes the parser recurse past Python's limit).
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(path, ["file not found"]) from None
    except (OSError, ValueError) as e:
        raise ConfigError(path, [f"cannot read: {reason(e)}"]) from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(path, [f"larger than {MAX_CONFIG_BYTES // 1024} KiB: not a config file"])
    try:
        raw = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(path, [f"not UTF-8 text: {e}"]) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, [f"not valid TOML: {e}"]) from None
    except RecursionError:
        raise ConfigError(path, [_deep_line(data)]) from None
    except Exception as e:  # noqa: BLE001 - whatever the parser trips on, the answer names the file
        raise ConfigError(path, [f"not valid TOML: {type(e).__name__}: {e}"]) from None
    return parse(raw, path)


def _deep_line(data: bytes) -> str:
    """Where TOML nests too deeply for the parser: the line, and its key when it has one."""
    for n, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        if line.count("[") + line.count("{") > MAX_DEPTH * 4:
            key = line.split("=", 1)[0].strip() if "=" in line else ""
            return (f"{key[:60]}: " if key and len(key) < len(line) else "") + (
                f"nested too deeply (line {n}); no key takes more than {MAX_DEPTH} levels")
    return "not a usable config: nested too deeply"


def _too_deep(raw: Any) -> list[str]:
    """Values nested deeper than any key takes, named by where they are (checked without
    recursion, before pydantic recurses into them)."""
    out = []
    stack: list[tuple[Any, tuple[str, ...], int]] = [(raw, (), 0)]
    while stack:
        node, where, depth = stack.pop()
        if depth > MAX_DEPTH:
            where = where[:2]  # the section and its key: deeper names are the nesting itself
            key = where[-1][:60] if where else "(top level)"
            section = f"[{where[0][:60]}] " if len(where) > 1 else ""
            out.append(f"{section}{key}: nested more than {MAX_DEPTH} levels deep; no key takes that")
            continue
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for k, v in items:
            if isinstance(v, (dict, list)):
                stack.append((v, (*where, str(k)) if isinstance(k, str) else where, depth + 1))
    return sorted(set(out))


def parse(raw: dict[str, Any], path: Path | str = "<config>") -> Config:
    if problems := _too_deep(raw):
        raise ConfigError(path, problems)
    schema.refresh()  # a driver registered since the schema was built (drivers.register)
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(path, [describe(err, raw) for err in errors_of(e)]) from None
    except RecursionError:
        raise ConfigError(path, ["not a usable config: nested too deeply"]) from None
    except Exception as e:  # noqa: BLE001 - a validator tripping over a value is still a config error
        raise ConfigError(path, [f"not a usable config: {type(e).__name__}: {e}"]) from None
    return resolve_paths(cfg, Path(path).resolve().parent)
