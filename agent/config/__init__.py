"""The agent's configuration: one TOML file, validated by pydantic models.

Every section is a model with ``extra="forbid"``, so a misspelt key is an error rather than a
silently ignored setting. Errors are reported as ``FILE: [section] key: problem`` lines that a
technician can act on without reading code.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
import tempfile
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

from agent.config.cargo import (
    NAME,
    Baudrate,
    ChainConfig,
    Delay,
    Distance,
    GeofenceConfig,
    LineOffset,
    Period,
    ReplaySpeed,
    Retry,
    Role,
    SealConfig,
    Section,
    Speed,
    TemperatureConfig,
)
from agent.config.regions import UplinkProfileConfig
from pydantic import (
    AfterValidator,
    BaseModel,
    Field,
    ValidationError,
    model_validator,
)

DEFAULT_PATH = Path("/etc/lorry-agent/agent.toml")
SOURCE_SECTIONS = ("gps", "can", "ignition")

# Topic levels must not contain MQTT wildcards or separators.
TOPIC_SAFE = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
MAX_CONFIG_BYTES = 1 << 20
"""A config is a few KiB; a file larger than 1 MiB is not one."""
MAX_DEPTH = 16
"""Deepest nesting of tables and arrays any key takes ([[geofences]] polygon: 4)."""
MAX_STORE_MB = 4 * 1024 * 1024
"""4 TiB: what SQLite can hold at its default page size (4096 B x 2^30 pages)."""
_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


def _host(value: str) -> str:
    """A host name (RFC 1123 labels; '_' allowed, as container names have it) or an IP address."""
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    if len(value) > 253 or not all(_LABEL.fullmatch(label) for label in value.removesuffix(".").split(".")):
        raise ValueError("must be a host name (letters, digits, '-', '.') or an IP address")
    return value


Host = Annotated[str, AfterValidator(_host)]


def _host_port(value: str) -> str:
    host, _, port = value.rpartition(":")
    _host(host)
    if not 1 <= int(port) <= 65535:
        raise ValueError("the port must be 1..65535")
    return value


class ConfigError(Exception):
    """A configuration file that cannot be used, with one line per problem."""

    def __init__(self, path: Path | str, problems: list[str]):
        self.path = str(path)
        self.problems = problems
        super().__init__("\n".join(f"{self.path}: {p}" for p in problems))


class DeviceConfig(Section):
    id: Annotated[str, Field(pattern=TOPIC_SAFE, max_length=64)]
    """Device identity, used in topics and in every payload."""


class TlsConfig(Section):
    ca_file: Annotated[Path, Role("input", "the broker's CA certificate")]
    """CA certificate(s) the broker's certificate must chain to (pinning)."""
    cert_file: Annotated[Path | None, Role("input", "the client certificate")] = None
    """Client certificate for mutual TLS."""
    key_file: Annotated[Path | None, Role("secret", "the client certificate's key")] = None
    insecure_skip_hostname: bool = False
    """Skip the broker hostname check (only for brokers reached by IP)."""

    @model_validator(mode="after")
    def _cert_and_key_together(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be given together")
        return self


class MqttConfig(Section):
    host: Host = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 1883
    topic_prefix: Annotated[str, Field(pattern=TOPIC_SAFE, max_length=64)] = "lorry"
    client_id: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    """Defaults to the device id."""
    protocol: Literal["3.1.1", "5"] = "3.1.1"
    keepalive_s: Annotated[int, Field(ge=5, le=3600)] = 60
    username: Annotated[str, Field(max_length=256)] | None = None
    password_file: Annotated[Path | None, Role("secret", "the broker password")] = None
    """File holding the password (its first line); keeps secrets out of the config."""
    tls: TlsConfig | None = None
    max_inflight: Annotated[int, Field(ge=1, le=100)] = 8
    """Messages handed to paho and not yet acknowledged; the store holds the rest."""
    max_batch: Annotated[int, Field(ge=1, le=10_000)] = 2000
    """Most readings per message while draining a backlog (messages are sized in bytes to the
    link: see `adaptive`)."""
    max_message_bytes: Annotated[int, Field(ge=1024, le=268_435_455)] = 131_072
    """Largest message (encoded payload) sent; an MQTT 5 broker's Maximum Packet Size lowers it."""
    encoding: Literal["json", "compact"] = "json"
    """`compact`: batches as columnar, delta-encoded CBOR (docs/compact.md), about 15 times
    smaller than JSON; announced with MQTT 5 content type `application/cbor`."""
    adaptive: bool = True
    """Size messages and the bytes in flight to the measured link (rate × round trip), so a
    slow link carries full messages and a new alarm never waits behind seconds of backlog."""
    reconnect_min_s: Retry = 1.0
    reconnect_max_s: Retry = 120.0

    @model_validator(mode="after")
    def _checks(self) -> MqttConfig:
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be >= reconnect_min_s")
        if self.password_file is not None and self.username is None:
            raise ValueError("password_file needs username")
        return self


class StoreConfig(Section):
    path: Annotated[Path, Role("store", "the buffer database")] = Path("/var/lib/lorry-agent/buffer.db")
    max_mb: Annotated[float, Field(ge=0, le=MAX_STORE_MB)] = 256
    """Past this, old readings are shed (health, CAN, every other position…; never seal
    events or alarms) and reported as `data_dropped` alarms. 0: no limit. At most what SQLite
    can hold; a smaller disk is fine (a full disk is handled: agent/store/capacity.py)."""
    max_age_days: Annotated[float, Field(ge=0, le=3650)] = 30
    """Unsent readings older than this (seal events and alarms excepted) are shed. 0: none."""
    sync_interval_s: Annotated[float, Field(ge=0, le=60)] = 1.0
    """How often buffered readings are made power-cut safe (fsync). Readings are committed
    (crash safe) at once; only durable ones are sent, so a power cut never makes a seq
    number that the backend has seen come back with another reading."""


class GpsConfig(Section):
    port: Annotated[str, Field(min_length=1), Role("serial", "the GPS receiver's serial device")] | None = None
    """Serial device or pyserial URL (``loop://``); a glob such as
    ``/dev/serial/by-id/usb-u-blox*`` picks whichever matching device is plugged in."""
    baudrate: Baudrate = 9600
    replay: Annotated[Path | None, Role("input", "a NMEA capture")] = None
    """A capture file (optionally .gz) replayed instead of a serial port."""
    replay_speed: ReplaySpeed = 1.0
    """1 = real time (by the fixes' own timestamps), 0 = as fast as possible."""
    gpsd: Annotated[str, Field(pattern=r"^[^\s:]+:\d{1,5}$"), AfterValidator(_host_port)] | None = None
    """``host:port`` of a gpsd to read TPV reports from, instead of a serial port."""
    reopen_min_s: Retry = 1.0
    reopen_max_s: Retry = 30.0
    min_sats: Annotated[int, Field(ge=0, le=64)] = 4
    """Fixes from fewer satellites are not positions (0: no check; unknown counts passes)."""
    max_hdop: Annotated[float, Field(ge=0, le=100)] = 10.0
    """Fixes with a worse HDOP are not positions (0: no check)."""
    min_mode: Literal["2d", "3d"] = "2d"
    """Weakest fix mode reported (from GSA, or gpsd's TPV mode)."""
    max_speed_kmh: Speed = 200.0
    """Jump filter: a fix that implies a faster move from the last good one is rejected
    (0: no check). No lorry does 200 km/h; multipath jumps of kilometres in a second do."""

    @model_validator(mode="after")
    def _one_source(self) -> GpsConfig:
        given = [k for k in ("port", "replay", "gpsd") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of port (a serial device), replay (a file) or gpsd (host:port)"
                + (f"; got {', '.join(given)}" if given else "")
            )
        return self


class ProfileConfig(Section):
    """When to report a fix: on any enabled threshold (0 disables one)."""

    min_period_s: Period
    min_distance_m: Distance
    min_heading_deg: Annotated[float, Field(ge=0, le=180)]


class ReportingConfig(Section):
    """The moving profile (its keys sit directly in [reporting]) and the parked one.

    A fix is reported when any enabled threshold is met since the last reported fix; with
    all three at 0 every fix is reported. The defaults and why: docs/reporting.md.
    """

    min_period_s: Period = 120
    min_distance_m: Distance = 1000
    min_heading_deg: Annotated[float, Field(ge=0, le=180)] = 8
    heading_min_speed_kmh: Speed = 10
    """The angle rule applies only above this speed: a crawling lorry's course is noise."""
    max_deviation_m: Distance = 20
    """While moving, no fix in between may lie farther than this from the line joining two
    reported fixes: where the road bends, the fix before the bend is reported (0: off)."""
    stop_speed_kmh: Speed = 5
    """Below this speed for stop_after_s the lorry is stopped (one fix reported then)."""
    stop_after_s: Period = 60
    start_speed_kmh: Speed = 10
    """At or above this speed a stopped lorry is moving again (one fix reported at once)."""
    stopped_period_s: Period = 1800
    """While stopped (ignition on or unknown): one fix this often (0: none)."""
    parked: ProfileConfig = ProfileConfig(min_period_s=3600, min_distance_m=500, min_heading_deg=0)
    """Ignition off: a fix an hour, or when it moves anyway (towed, on a ferry)."""

    @model_validator(mode="after")
    def _hysteresis(self) -> ReportingConfig:
        if self.start_speed_kmh < self.stop_speed_kmh:
            raise ValueError("start_speed_kmh must be >= stop_speed_kmh")
        return self

    @property
    def moving(self) -> ProfileConfig:
        return ProfileConfig(
            min_period_s=self.min_period_s,
            min_distance_m=self.min_distance_m,
            min_heading_deg=self.min_heading_deg,
        )


class SignalConfig(Section):
    """Sampling of one CAN signal: the backend wants a few values a minute, not 100 a second."""

    min_interval_s: Period | None = None
    """Never more often than this (default: [can] min_interval_s)."""
    deadband: Annotated[float, Field(ge=0, le=1e12)] | None = None
    """Sent when it changed by at least this since the last value sent (default: the signal's own)."""
    max_interval_s: Period | None = None
    """Sent at least this often even without change (default: [can] max_interval_s; 0: only on change)."""
    enabled: bool = True


class CanConfig(Section):
    interface: Literal["socketcan", "virtual", "replay"] = "socketcan"
    channel: Annotated[str, Field(min_length=1, max_length=64)] = "can0"
    replay: Annotated[Path | None, Role("input", "a CAN capture")] = None
    """With interface = "replay": a capture (candump .log, .asc, .blf, .csv… anything
    can.LogReader reads); readings keep the capture's times."""
    replay_speed: ReplaySpeed = 0.0
    """1 = real time, 0 = as fast as possible."""
    dbc: Annotated[list[Path], Field(max_length=64), Role("input", "a DBC file")] = []
    """The fleet's own DBC files (decoded with cantools); their messages take precedence over
    the built-in J1939 table for the same PGN."""
    min_interval_s: Period = 30.0
    max_interval_s: Period = 300.0
    signals: dict[str, SignalConfig] = {}
    """Per signal name (built-in: docs/can.md, or a DBC signal name)."""
    requests: list[Literal["vin", "hours", "fuel"]] = []
    """PGNs to request (PGN 59904) every request_interval_s. Empty: the agent never transmits."""
    request_interval_s: Delay = 3600.0
    source_address: Annotated[int, Field(ge=0, le=253)] = 249
    """Our address for requests (0xF9: off-board diagnostic tool #1), only used with requests."""
    ignition: bool = False
    """Derive the ignition from the bus: frames arriving = on, silent for ignition_silence_s = off."""
    ignition_silence_s: Delay = 10.0
    reopen_min_s: Retry = 1.0
    reopen_max_s: Retry = 30.0

    @model_validator(mode="after")
    def _replay_needs_file(self) -> CanConfig:
        if (self.interface == "replay") != (self.replay is not None):
            raise ValueError('interface = "replay" and replay = "file" go together')
        return self


class IgnitionConfig(Section):
    """Where the ignition state comes from; it switches the reporting policy to `parked`."""

    source: Literal["gpio"] = "gpio"
    chip: Annotated[str, Field(min_length=1), Role("gpiochip", "a GPIO chip")] = "pinctrl-bcm2711"
    """The GPIO chip's label (``gpioinfo`` shows it) or its path (``/dev/gpiochip0``)."""
    line: LineOffset | Annotated[str, Field(min_length=1)] = 17
    """Line offset on the chip, or the line's name."""
    active_low: bool = False
    """True when the input reads low with the ignition on (an opto-coupler pulling down)."""
    bias: Literal["as-is", "pull-up", "pull-down", "disabled"] = "as-is"
    debounce_ms: Annotated[int, Field(ge=0, le=60_000)] = 300
    """A level must hold this long to count: cranking the engine makes the line bounce."""


class TimeConfig(Section):
    """Where reading times come from when the GPS has none to give (see agent/model/clock.py)."""

    trust_system_clock: Literal["auto", "always", "never"] = "auto"
    """auto: when the kernel says the clock is NTP-synchronised. A Pi has no real-time clock:
    until then its clock can be days off, so readings wait for GPS time instead."""
    max_hold_s: Delay = 900
    """A reading taken before any trusted time waits this long for one, then is sent with
    the system clock's time and ``ts_trusted: false``."""


class CommandsConfig(Section):
    """The remote command channel ({prefix}/{id}/cmd → .../cmd/reply); docs/commands.md."""

    key_file: Annotated[Path | None, Role("secret", "the command channel's HMAC key")] = None
    """The per-device HMAC key every command must be signed with. Without it the agent does
    not even subscribe: no commands."""
    window_s: Annotated[float, Field(gt=0, le=3600)] = 300
    """A command's `ts` must be this close to the device's trusted time; replays inside the
    window are caught by their nonce."""


class HealthConfig(Section):
    interval_s: Period = 300
    """A `health` reading this often (satellites per constellation, counters, clock); 0: none."""


class LogConfig(Section):
    level: Literal["debug", "info", "warning", "error"] = "info"


class Config(Section):
    device: DeviceConfig
    mqtt: MqttConfig = MqttConfig()
    store: StoreConfig = StoreConfig()
    gps: GpsConfig | None = None
    can: CanConfig | None = None
    ignition: IgnitionConfig | None = None
    seals: Annotated[list[SealConfig], Field(max_length=64)] = []
    temperature: Annotated[list[TemperatureConfig], Field(max_length=64)] = []
    geofences: Annotated[list[GeofenceConfig], Field(max_length=1000)] = []
    profiles: Annotated[list[UplinkProfileConfig], Field(max_length=64)] = []
    chain: ChainConfig = ChainConfig()
    commands: CommandsConfig = CommandsConfig()
    reporting: ReportingConfig = ReportingConfig()
    health: HealthConfig = HealthConfig()
    time: TimeConfig = TimeConfig()
    log: LogConfig = LogConfig()

    @property
    def client_id(self) -> str:
        return self.mqtt.client_id or self.device.id

    @model_validator(mode="after")
    def _unique_names(self) -> Config:
        zones = {g.name for g in self.geofences}
        for p in self.profiles:
            if unknown := [z for z in p.zones if z not in zones]:
                raise ValueError(f"[[profiles]] {p.name}: zones {', '.join(unknown)} are not [[geofences]] names")
        if len([p for p in self.profiles if not p.zones]) > 1:
            raise ValueError("[[profiles]]: only one profile may be without zones (the default)")
        for kind in ("seals", "temperature", "geofences", "profiles"):
            names = [x.name for x in getattr(self, kind)]
            if dup := sorted({n for n in names if names.count(n) > 1}):
                raise ValueError(f"[[{kind}]] names must be unique; repeated: {', '.join(dup)}")
        return self

    @property
    def sources(self) -> list[str]:
        """The configured source sections, for messages to a technician."""
        names = [name for name in SOURCE_SECTIONS if getattr(self, name) is not None]
        names += [f"{kind}:{s.name}" for kind in ("seals", "temperature") for s in getattr(self, kind)]
        return names

    def topic(self, stream: str) -> str:
        return f"{self.mqtt.topic_prefix}/{self.device.id}/{stream}"


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
        raise ConfigError(path, [f"cannot read: {_reason(e)}"]) from None
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
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(path, [_describe(err, raw) for err in _errors(e)]) from None
    except RecursionError:
        raise ConfigError(path, ["not a usable config: nested too deeply"]) from None
    except Exception as e:  # noqa: BLE001 - a validator tripping over a value is still a config error
        raise ConfigError(path, [f"not a usable config: {type(e).__name__}: {e}"]) from None
    return _resolve_paths(cfg, Path(path).resolve().parent)


def _errors(e: ValidationError) -> list[dict[str, Any]]:
    try:
        return e.errors()
    except Exception:  # noqa: BLE001 - an input pydantic cannot render (deeply nested): its own text
        return [{"loc": (), "type": "value_error", "msg": str(e)[:500]}]


# -- keys that name files and devices, by role (agent/config/cargo.py Role) ------------------------


def _role(field: Any) -> Role | None:
    """The key's role, given on the key (``Annotated[Path | None, Role(...)]``) or on the
    type of an optional key (``Annotated[str, Role(...)] | None``)."""
    found = [m for m in field.metadata if isinstance(m, Role)]
    for arg in get_args(field.annotation):
        if get_origin(arg) is Annotated:
            found += [m for m in get_args(arg)[1:] if isinstance(m, Role)]
    return found[0] if found else None


def role_keys(model: BaseModel, labels: tuple[str, ...] = ()) -> list[tuple[str, Role, Any]]:
    """Every key with a role, as (where, role, value), where is ``[mqtt.tls] ca_file`` or
    ``[seals #2 (rear_door)] port``; the value is None when the key is not set."""
    out: list[tuple[str, Role, Any]] = []
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if (role := _role(field)) is not None:
            out.append((f"[{'.'.join(labels)}] {name}" if labels else name, role, value))
        elif isinstance(value, BaseModel):
            out += role_keys(value, (*labels, name))
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    label = f"{name} #{i + 1}" + (f" ({item.name})" if isinstance(getattr(item, "name", None), str) else "")
                    out += role_keys(item, (*labels, label))
        elif isinstance(value, dict):
            for key, item in value.items():
                if isinstance(item, BaseModel):
                    out += role_keys(item, (*labels, f"{name}.{key}"))
    return out


def _resolve_paths(cfg: Config, base: Path) -> Config:
    """Every relative path a key gives (any key with a file role) is relative to ``base``."""

    def absolute(value: Any) -> Any:
        if isinstance(value, list):
            return [absolute(v) for v in value]
        if isinstance(value, Path) and not value.is_absolute() and str(value) != ":memory:":
            return base / value
        return value

    def rebase(model: BaseModel) -> BaseModel:
        updates: dict[str, Any] = {}
        for name, field in type(model).model_fields.items():
            value = getattr(model, name)
            if _role(field) is not None:
                new = absolute(value)
            elif isinstance(value, BaseModel):
                new = rebase(value)
            elif isinstance(value, list) and any(isinstance(v, BaseModel) for v in value):
                new = [rebase(v) if isinstance(v, BaseModel) else v for v in value]
            else:
                continue
            if new != value:
                updates[name] = new
        return model.model_copy(update=updates) if updates else model

    return rebase(cfg)  # type: ignore[return-value]


def path_problems(cfg: Config) -> list[str]:
    """Every key that names a file or a device, checked by its role: one line per problem,
    ``[section] key: problem; what is allowed``."""
    problems = []
    for where, role, value in role_keys(cfg):
        for item in value if isinstance(value, list) else [value]:
            if item is None:
                continue
            try:
                problem = _ROLE_CHECKS[role.role](item, role)
            except Exception as e:  # noqa: BLE001 - a path the OS chokes on is a problem to show
                problem = f"cannot use {item}: {_reason(e)}"
            if problem is not None:
                problems.append(f"{where}: {problem}")
    return problems


def usable_problems(cfg: Config) -> list[str]:
    """What ``run`` would trip over later, checked now: every file and device key by its role,
    then what is in the files (certificates, keys, the password). ``check-config`` and ``run``
    ask this (with each source driver's own ``check``)."""
    problems = path_problems(cfg)
    bad = {p.split(": ", 1)[0] for p in problems}
    problems += _content_problems(cfg, bad)
    return problems


def _reason(e: BaseException) -> str:
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


def _stat(p: Path) -> os.stat_result | None:
    """The file's status (following links), None if there is nothing at ``p``."""
    try:
        return p.stat()
    except (FileNotFoundError, NotADirectoryError):  # ENOTDIR: a file where a folder should be
        return None


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISFIFO(mode):
        return "a pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a regular file" if stat.S_ISREG(mode) else "not a regular file"


def _check_input(p: Path, role: Role) -> str | None:
    allowed = f"must be a readable file ({role.what})"
    try:
        st = _stat(p)
        if st is None:
            return f"{p}: no such file; {allowed}"
        if not stat.S_ISREG(st.st_mode):
            return f"{p} is {_kind(st.st_mode)}; {allowed}"
        with open(p, "rb"):
            pass
    except (OSError, ValueError) as e:
        return f"cannot read {p}: {_reason(e)}; {allowed}"
    if role.role == "secret":
        from agent.model.secrets import secret_problem

        return secret_problem(p)
    return None


def _check_store(p: Path, role: Role) -> str | None:
    if str(p) == ":memory:":
        return None
    try:
        st = _stat(p)
        if st is not None and not stat.S_ISREG(st.st_mode):
            hint = f", e.g. {p / 'buffer.db'}" if stat.S_ISDIR(st.st_mode) else ""
            return f"{p} is {_kind(st.st_mode)}; must be the database file itself{hint}"
        for side in (p.with_name(p.name + s) for s in ("-wal", "-shm", ".ledger", ".lock")):
            if (sst := _stat(side)) is not None and not stat.S_ISREG(sst.st_mode):
                return f"{side} (kept beside the store) is {_kind(sst.st_mode)}; move it away"
        if st is not None and not os.access(p, os.R_OK | os.W_OK):
            return f"cannot write {p}: permission denied; the store must be writable by the agent's user"
        return _check_folder(p.parent)
    except (OSError, ValueError) as e:
        return f"cannot use {p}: {_reason(e)}"


def _check_folder(folder: Path) -> str | None:
    """A folder that exists or can be created, and that this user can write in: proven by
    making (and removing) an empty folder in it, or in the nearest folder that exists."""
    existing = folder
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"the folder {folder} cannot be created: {existing} is not a folder"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".lorry-agent-check-", dir=existing))
    except OSError as e:
        if existing == folder:
            return f"cannot write in the folder {folder}: {_reason(e)}; it must be writable by the agent's user"
        return f"the folder {folder} cannot be created in {existing}: {_reason(e)}"
    return None


def _serial_schemes() -> list[str]:
    import pkgutil

    import serial.urlhandler

    return sorted(m.name.removeprefix("protocol_") for m in pkgutil.iter_modules(serial.urlhandler.__path__)
                  if m.name.startswith("protocol_"))


def _check_device(value: str, role: Role) -> str | None:
    """A device that may be absent (plugged in later); one that exists must be a device."""
    if role.role == "serial" and "://" in value:
        scheme = value.split("://", 1)[0].lower()
        if scheme not in (known := _serial_schemes()):
            return f"unknown pyserial URL scheme {scheme!r}; known: {', '.join(known)} (or a device path)"
        return None
    if role.role == "gpiochip" and "/" not in value:
        return None  # a chip's label, looked up when the line is opened
    if any(c in value for c in "*?["):
        return None  # a glob: whichever matching device is plugged in
    p = Path(value)
    try:
        st = _stat(p)
    except (OSError, ValueError) as e:
        return f"cannot use {value}: {_reason(e)}"
    if st is None or stat.S_ISCHR(st.st_mode):
        return None
    return f"{value} is {_kind(st.st_mode)}, not {role.what} (a missing device is fine: it may be plugged in later)"


def _check_device_folder(p: Path, role: Role) -> str | None:
    try:
        st = _stat(p)
    except (OSError, ValueError) as e:
        return f"cannot use {p}: {_reason(e)}"
    if st is None or stat.S_ISDIR(st.st_mode):
        return None
    return f"{p} is {_kind(st.st_mode)}; must be {role.what} (absent is fine until the driver is loaded)"


_ROLE_CHECKS: dict[str, Any] = {
    "input": _check_input,
    "secret": _check_input,
    "store": _check_store,
    "serial": _check_device,
    "gpiochip": _check_device,
    "device_folder": _check_device_folder,
}


def _content_problems(cfg: Config, bad: set[str]) -> list[str]:
    """What is inside the files, where the agent would only find out when it uses them."""
    import ssl

    from agent.model.chain import read_key
    from agent.model.secrets import read_secret

    problems = []
    tls = cfg.mqtt.tls
    if tls is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if "[mqtt.tls] ca_file" not in bad:
            try:
                context.load_verify_locations(cafile=str(tls.ca_file))
            except (ssl.SSLError, OSError, ValueError) as e:
                problems.append(f"[mqtt.tls] ca_file: {tls.ca_file} holds no usable CA certificate "
                                f"(PEM expected): {_reason(e)}")
        if tls.cert_file and tls.key_file and not bad & {"[mqtt.tls] cert_file", "[mqtt.tls] key_file"}:
            try:  # an encrypted key cannot be used unattended: no passphrase is ever given
                context.load_cert_chain(str(tls.cert_file), str(tls.key_file), password=lambda: b"")
            except (ssl.SSLError, OSError, ValueError) as e:
                problems.append(f"[mqtt.tls] cert_file: {tls.cert_file} with key_file {tls.key_file} is not a "
                                f"certificate and its unencrypted key (PEM): {_reason(e)}")
    password = cfg.mqtt.password_file
    if password is not None and "[mqtt] password_file" not in bad:
        try:
            read_secret(password).decode("utf-8")
        except (OSError, ValueError) as e:
            problems.append(f"[mqtt] password_file: {password} must be UTF-8 text (the password on its first line): {e}")
    for where, path in (("[chain] hmac_key_file", cfg.chain.hmac_key_file), ("[commands] key_file", cfg.commands.key_file)):
        if path is not None and where not in bad:
            try:
                read_key(path)
            except (OSError, ValueError) as e:
                problems.append(f"{where}: {e}")
    return problems


def _describe(err: dict[str, Any], raw: dict[str, Any]) -> str:
    """One validation error as ``[section] key: problem`` with what is allowed."""
    try:
        return _describe_one(err, raw)
    except Exception:  # noqa: BLE001 - never lose the problem for want of a nice way to say it
        where = ".".join(str(part) for part in err.get("loc", ())) or "(top level)"
        return f"{where}: {str(err.get('msg', 'invalid'))[:300]}"


def _describe_one(err: dict[str, Any], raw: dict[str, Any]) -> str:
    where, model, key = _locate(list(err["loc"]), raw)
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"{where}: unknown key; " + _allowed(model)
    if kind == "missing":
        return f"{where}: required {'key' if key else 'section'} is missing"
    if kind == "union_tag_invalid" or kind == "union_tag_not_found":
        return f"{where}: driver must be one of {err.get('ctx', {}).get('expected_tags', '?')}"
    msg = err["msg"].removeprefix("Value error, ")
    given = err.get("input")
    if kind == "string_pattern_mismatch":
        pattern = err.get("ctx", {}).get("pattern")
        if pattern in (TOPIC_SAFE, NAME):
            msg = "must be letters, digits, '.', '_' or '-' (no spaces, '/', '+' or '#')"
        else:
            msg = f"does not have the expected form ({pattern})"
    if not isinstance(given, (dict, list)):
        shown = repr(given)
        msg += f" (got {shown if len(shown) <= 80 else shown[:60] + '…'})"
    return f"{where}: {msg}"


def _locate(loc: list[Any], raw: Any) -> tuple[str, type[BaseModel] | None, str | None]:
    """Walk an error location through the models and the raw TOML together.

    Returns where it is for a technician (``[mqtt.tls]``, ``[seals #2 (rear_door)] line``,
    ``[can.signals.engine_speed] deadband``), the model there, and the key if it is one.
    """
    labels: list[str] = []
    model: type[BaseModel] | None = Config
    node: Any = raw
    i = 0
    while i < len(loc):
        part = loc[i]
        field = model.model_fields.get(part) if model is not None and isinstance(part, str) else None
        if field is None:
            key = str(part)
            return (f"[{'.'.join(labels)}] {key}" if labels else key), model, key
        node = node.get(part) if isinstance(node, dict) else None
        annotation = field.annotation
        origin = get_origin(annotation)
        i += 1
        if origin is list and i < len(loc) and isinstance(loc[i], int):
            index = loc[i]
            item = node[index] if isinstance(node, list) and index < len(node) else None
            name = item.get("name") if isinstance(item, dict) else None
            labels.append(f"{part} #{index + 1}" + (f" ({name})" if name else ""))
            i += 1
            members = _section_types(get_args(annotation)[0])
            if len(members) > 1 and i < len(loc) and isinstance(loc[i], str) and loc[i] not in members[0].model_fields:
                i += 1  # the discriminator's tag, e.g. 'gpio'
                tag = item.get("driver") if isinstance(item, dict) else None
                model = next((m for m in members if _tag(m) == tag), members[0])
            else:
                model = members[0] if members else None
            node = item
        elif origin is dict and i < len(loc):  # [can.signals.NAME]: the next part is a key
            labels.append(f"{part}.{loc[i]}")
            node = node.get(loc[i]) if isinstance(node, dict) else None
            i += 1
            model = _section_type(get_args(annotation)[1])
        else:
            sub = _section_type(annotation)
            if sub is None:
                return (f"[{'.'.join(labels)}] {part}" if labels else part), model, part
            labels.append(part)
            model = sub
    return f"[{'.'.join(labels)}]" if labels else "(top level)", model, None


def _tag(model: type[BaseModel]) -> Any:
    field = model.model_fields.get("driver")
    args = get_args(field.annotation) if field else ()
    return args[0] if args else None


def _section_type(annotation: Any) -> type[BaseModel] | None:
    found = _section_types(annotation)
    return found[0] if found else None


def _section_types(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    out: list[type[BaseModel]] = []
    for arg in get_args(annotation):
        out += _section_types(arg)
    return out


def _allowed(model: type[BaseModel] | None) -> str:
    if model is None:
        return "no keys are allowed here"
    return "allowed: " + ", ".join(model.model_fields)
