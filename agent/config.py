"""The agent's configuration: one TOML file, validated by pydantic models.

Every section is a model with ``extra="forbid"``, so a misspelt key is an error rather than a
silently ignored setting. Errors are reported as ``FILE: [section] key: problem`` lines that a
technician can act on without reading code.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

from agent.cargo_config import NAME, ChainConfig, GeofenceConfig, SealConfig, TemperatureConfig
from agent.profile_config import UplinkProfileConfig
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

DEFAULT_PATH = Path("/etc/lorry-agent/agent.toml")
SOURCE_SECTIONS = ("gps", "can", "ignition")

# Topic levels must not contain MQTT wildcards or separators.
TOPIC_SAFE = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


class ConfigError(Exception):
    """A configuration file that cannot be used, with one line per problem."""

    def __init__(self, path: Path | str, problems: list[str]):
        self.path = str(path)
        self.problems = problems
        super().__init__("\n".join(f"{self.path}: {p}" for p in problems))


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DeviceConfig(Section):
    id: Annotated[str, Field(pattern=TOPIC_SAFE, max_length=64)]
    """Device identity, used in topics and in every payload."""


class TlsConfig(Section):
    ca_file: Path
    """CA certificate(s) the broker's certificate must chain to (pinning)."""
    cert_file: Path | None = None
    """Client certificate for mutual TLS."""
    key_file: Path | None = None
    insecure_skip_hostname: bool = False
    """Skip the broker hostname check (only for brokers reached by IP)."""

    @model_validator(mode="after")
    def _cert_and_key_together(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be given together")
        return self


class MqttConfig(Section):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 1883
    topic_prefix: Annotated[str, Field(pattern=TOPIC_SAFE)] = "lorry"
    client_id: str | None = None
    """Defaults to the device id."""
    protocol: Literal["3.1.1", "5"] = "3.1.1"
    keepalive_s: Annotated[int, Field(ge=5, le=3600)] = 60
    username: str | None = None
    password_file: Path | None = None
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
    reconnect_min_s: Annotated[float, Field(gt=0)] = 1.0
    reconnect_max_s: Annotated[float, Field(gt=0)] = 120.0

    @model_validator(mode="after")
    def _checks(self) -> MqttConfig:
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be >= reconnect_min_s")
        if self.password_file is not None and self.username is None:
            raise ValueError("password_file needs username")
        return self


class StoreConfig(Section):
    path: Path = Path("/var/lib/lorry-agent/buffer.db")
    max_mb: Annotated[float, Field(ge=0)] = 256
    """Past this, old readings are shed (health, CAN, every other position…; never seal
    events or alarms) and reported as `data_dropped` alarms. 0: no limit."""
    max_age_days: Annotated[float, Field(ge=0)] = 30
    """Unsent readings older than this (seal events and alarms excepted) are shed. 0: none."""
    sync_interval_s: Annotated[float, Field(ge=0, le=60)] = 1.0
    """How often buffered readings are made power-cut safe (fsync). Readings are committed
    (crash safe) at once; only durable ones are sent, so a power cut never makes a seq
    number that the backend has seen come back with another reading."""


class GpsConfig(Section):
    port: str | None = None
    """Serial device or pyserial URL (``loop://``); a glob such as
    ``/dev/serial/by-id/usb-u-blox*`` picks whichever matching device is plugged in."""
    baudrate: Annotated[int, Field(gt=0)] = 9600
    replay: Path | None = None
    """A capture file (optionally .gz) replayed instead of a serial port."""
    replay_speed: Annotated[float, Field(ge=0)] = 1.0
    """1 = real time (by the fixes' own timestamps), 0 = as fast as possible."""
    gpsd: Annotated[str | None, Field(pattern=r"^[^\s:]+:\d{1,5}$")] = None
    """``host:port`` of a gpsd to read TPV reports from, instead of a serial port."""
    reopen_min_s: Annotated[float, Field(gt=0)] = 1.0
    reopen_max_s: Annotated[float, Field(gt=0)] = 30.0
    min_sats: Annotated[int, Field(ge=0, le=64)] = 4
    """Fixes from fewer satellites are not positions (0: no check; unknown counts passes)."""
    max_hdop: Annotated[float, Field(ge=0)] = 10.0
    """Fixes with a worse HDOP are not positions (0: no check)."""
    min_mode: Literal["2d", "3d"] = "2d"
    """Weakest fix mode reported (from GSA, or gpsd's TPV mode)."""
    max_speed_kmh: Annotated[float, Field(ge=0)] = 200.0
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

    min_period_s: Annotated[float, Field(ge=0)]
    min_distance_m: Annotated[float, Field(ge=0)]
    min_heading_deg: Annotated[float, Field(ge=0, le=180)]


class ReportingConfig(Section):
    """The moving profile (its keys sit directly in [reporting]) and the parked one.

    A fix is reported when any enabled threshold is met since the last reported fix; with
    all three at 0 every fix is reported. The defaults and why: docs/reporting.md.
    """

    min_period_s: Annotated[float, Field(ge=0)] = 120
    min_distance_m: Annotated[float, Field(ge=0)] = 1000
    min_heading_deg: Annotated[float, Field(ge=0, le=180)] = 8
    heading_min_speed_kmh: Annotated[float, Field(ge=0)] = 10
    """The angle rule applies only above this speed: a crawling lorry's course is noise."""
    max_deviation_m: Annotated[float, Field(ge=0)] = 20
    """While moving, no fix in between may lie farther than this from the line joining two
    reported fixes: where the road bends, the fix before the bend is reported (0: off)."""
    stop_speed_kmh: Annotated[float, Field(ge=0)] = 5
    """Below this speed for stop_after_s the lorry is stopped (one fix reported then)."""
    stop_after_s: Annotated[float, Field(ge=0)] = 60
    start_speed_kmh: Annotated[float, Field(ge=0)] = 10
    """At or above this speed a stopped lorry is moving again (one fix reported at once)."""
    stopped_period_s: Annotated[float, Field(ge=0)] = 1800
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

    min_interval_s: Annotated[float, Field(ge=0)] | None = None
    """Never more often than this (default: [can] min_interval_s)."""
    deadband: Annotated[float, Field(ge=0)] | None = None
    """Sent when it changed by at least this since the last value sent (default: the signal's own)."""
    max_interval_s: Annotated[float, Field(ge=0)] | None = None
    """Sent at least this often even without change (default: [can] max_interval_s; 0: only on change)."""
    enabled: bool = True


class CanConfig(Section):
    interface: Literal["socketcan", "virtual", "replay"] = "socketcan"
    channel: str = "can0"
    replay: Path | None = None
    """With interface = "replay": a capture (candump .log, .asc, .blf, .csv… anything
    can.LogReader reads); readings keep the capture's times."""
    replay_speed: Annotated[float, Field(ge=0)] = 0.0
    """1 = real time, 0 = as fast as possible."""
    dbc: list[Path] = []
    """The fleet's own DBC files (decoded with cantools); their messages take precedence over
    the built-in J1939 table for the same PGN."""
    min_interval_s: Annotated[float, Field(ge=0)] = 30.0
    max_interval_s: Annotated[float, Field(ge=0)] = 300.0
    signals: dict[str, SignalConfig] = {}
    """Per signal name (built-in: docs/can.md, or a DBC signal name)."""
    requests: list[Literal["vin", "hours", "fuel"]] = []
    """PGNs to request (PGN 59904) every request_interval_s. Empty: the agent never transmits."""
    request_interval_s: Annotated[float, Field(gt=0)] = 3600.0
    source_address: Annotated[int, Field(ge=0, le=253)] = 249
    """Our address for requests (0xF9: off-board diagnostic tool #1), only used with requests."""
    ignition: bool = False
    """Derive the ignition from the bus: frames arriving = on, silent for ignition_silence_s = off."""
    ignition_silence_s: Annotated[float, Field(gt=0)] = 10.0
    reopen_min_s: Annotated[float, Field(gt=0)] = 1.0
    reopen_max_s: Annotated[float, Field(gt=0)] = 30.0

    @model_validator(mode="after")
    def _replay_needs_file(self) -> CanConfig:
        if (self.interface == "replay") != (self.replay is not None):
            raise ValueError('interface = "replay" and replay = "file" go together')
        return self


class IgnitionConfig(Section):
    """Where the ignition state comes from; it switches the reporting policy to `parked`."""

    source: Literal["gpio"] = "gpio"
    chip: str = "pinctrl-bcm2711"
    """The GPIO chip's label (``gpioinfo`` shows it) or its path (``/dev/gpiochip0``)."""
    line: int | str = 17
    """Line offset on the chip, or the line's name."""
    active_low: bool = False
    """True when the input reads low with the ignition on (an opto-coupler pulling down)."""
    bias: Literal["as-is", "pull-up", "pull-down", "disabled"] = "as-is"
    debounce_ms: Annotated[int, Field(ge=0, le=60_000)] = 300
    """A level must hold this long to count: cranking the engine makes the line bounce."""


class TimeConfig(Section):
    """Where reading times come from when the GPS has none to give (see agent/clock.py)."""

    trust_system_clock: Literal["auto", "always", "never"] = "auto"
    """auto: when the kernel says the clock is NTP-synchronised. A Pi has no real-time clock:
    until then its clock can be days off, so readings wait for GPS time instead."""
    max_hold_s: Annotated[float, Field(gt=0)] = 900
    """A reading taken before any trusted time waits this long for one, then is sent with
    the system clock's time and ``ts_trusted: false``."""


class CommandsConfig(Section):
    """The remote command channel ({prefix}/{id}/cmd → .../cmd/reply); docs/commands.md."""

    key_file: Path | None = None
    """The per-device HMAC key every command must be signed with. Without it the agent does
    not even subscribe: no commands."""
    window_s: Annotated[float, Field(gt=0, le=3600)] = 300
    """A command's `ts` must be this close to the device's trusted time; replays inside the
    window are caught by their nonce."""


class HealthConfig(Section):
    interval_s: Annotated[float, Field(ge=0)] = 300
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
    seals: list[SealConfig] = []
    temperature: list[TemperatureConfig] = []
    geofences: list[GeofenceConfig] = []
    profiles: list[UplinkProfileConfig] = []
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
    """Read and validate a config file; relative file paths are resolved against its folder."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(path, ["file not found"]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(path, [f"cannot read: {e}"]) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, [f"not valid TOML: {e}"]) from None
    return parse(raw, path)


def parse(raw: dict[str, Any], path: Path | str = "<config>") -> Config:
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(path, [_describe(err, raw) for err in e.errors()]) from None
    return _resolve_paths(cfg, Path(path).resolve().parent)


def _resolve_paths(cfg: Config, base: Path) -> Config:
    def rel(p: Path | None) -> Path | None:
        return None if p is None or p.is_absolute() else base / p

    updates: dict[str, Any] = {}
    if cfg.gps and cfg.gps.replay and (r := rel(cfg.gps.replay)):
        updates["gps"] = cfg.gps.model_copy(update={"replay": r})
    if cfg.can is not None:
        can_updates: dict[str, Any] = {"dbc": [rel(p) or p for p in cfg.can.dbc]}
        if cfg.can.replay is not None:
            can_updates["replay"] = rel(cfg.can.replay) or cfg.can.replay
        updates["can"] = cfg.can.model_copy(update=can_updates)
    if str(cfg.store.path) != ":memory:" and (r := rel(cfg.store.path)):
        updates["store"] = cfg.store.model_copy(update={"path": r})
    mqtt_updates: dict[str, Any] = {}
    if (r := rel(cfg.mqtt.password_file)):
        mqtt_updates["password_file"] = r
    if cfg.mqtt.tls:
        tls = {k: r for k in ("ca_file", "cert_file", "key_file") if (r := rel(getattr(cfg.mqtt.tls, k)))}
        if tls:
            mqtt_updates["tls"] = cfg.mqtt.tls.model_copy(update=tls)
    if mqtt_updates:
        updates["mqtt"] = cfg.mqtt.model_copy(update=mqtt_updates)
    if (r := rel(cfg.chain.hmac_key_file)):
        updates["chain"] = cfg.chain.model_copy(update={"hmac_key_file": r})
    if (r := rel(cfg.commands.key_file)):
        updates["commands"] = cfg.commands.model_copy(update={"key_file": r})
    return cfg.model_copy(update=updates) if updates else cfg


def _describe(err: dict[str, Any], raw: dict[str, Any]) -> str:
    """One validation error as ``[section] key: problem`` with what is allowed."""
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
        msg += f" (got {given!r})"
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
