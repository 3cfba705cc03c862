"""The config file's schema: the agent's own sections, and `Config`, the whole file.

The sources' sections (``[gps]``, ``[can]``, ``[ignition]``, ``[[seals]]``, ``[[temperature]]``)
are not listed here: each driver package owns its section's model (drivers/*/config.py) and
the driver registry (drivers/__init__.py) names them, so a ``driver =`` a technician may write is
exactly a registered name. `refresh` rebuilds them when a driver is registered at run time.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Optional, Union

from pydantic import Field, model_validator

import drivers
from agent.config.cargo import ChainConfig, GeofenceConfig
from agent.config.regions import UplinkProfileConfig
from agent.model.settings import Delay, Distance, Host, Period, Retry, Role, Section, Speed

# Topic levels must not contain MQTT wildcards or separators.
TOPIC_SAFE = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
MAX_STORE_MB = 4 * 1024 * 1024
"""4 TiB: what SQLite can hold at its default page size (4096 B x 2^30 pages)."""

SOURCE_SECTIONS = ("gps", "can", "ignition")
"""Sources with one section each: ``[gps]``."""
SOURCE_LISTS = ("seals", "temperature")
"""Sources with any number of entries: ``[[seals]]``."""
SOURCE_KINDS = {"gps": "gps", "can": "can", "ignition": "ignition", "seals": "seal", "temperature": "temperature"}
"""Each source section's kind in the driver registry (drivers/__init__.py REGISTRY)."""


def section_model(kind: str) -> Any:
    """The model of a source section of ``kind``: the registered config model, or, when the
    kind's drivers have several, their union told apart by each entry's ``driver`` key."""
    models = drivers.config_classes(kind)
    if not models:
        raise LookupError(f"no driver registered for {kind!r} (drivers/__init__.py)")
    if len(models) == 1:
        return models[0]
    return Annotated[Union[tuple(models)], Field(discriminator="driver")]  # noqa: UP007 - built at run time


if TYPE_CHECKING:  # what a type checker sees; at run time the registry decides
    from drivers.can.config import CanConfig as CanSection
    from drivers.gps.config import GpsConfig as GpsSection
    from drivers.ignition.config import IgnitionConfig as IgnitionSection

    SealSection = Any
    TemperatureSection = Any
else:
    GpsSection = section_model("gps")
    CanSection = section_model("can")
    IgnitionSection = section_model("ignition")
    SealSection = section_model("seal")
    TemperatureSection = section_model("temperature")


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
    sync_interval_s: Annotated[float, Field(ge=0, le=300)] = 40.0
    """How often new readings are written and made power-cut safe, in one group (one write and
    one fsync of the journal for all of them), and so the most a power cut or a crash can lose
    of ordinary readings. Only durable readings are sent: this is also how late a position can
    reach the backend. Seal events and alarms are made durable at once. The trade-off:
    docs/reporting.md."""
    lazy_sync_s: Annotated[float, Field(ge=0, le=3600)] = 600.0
    """How long the agent's own health readings may wait for that fsync (they usually ride
    along with the others): a parked lorry's health reading every 5 min must not cost an fsync
    each. Never shorter than sync_interval_s."""


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
    # The sources: each section's model comes from the driver registry (SOURCE_KINDS).
    gps: GpsSection | None = None
    can: CanSection | None = None
    ignition: IgnitionSection | None = None
    seals: Annotated[list[SealSection], Field(max_length=64)] = []
    temperature: Annotated[list[TemperatureSection], Field(max_length=64)] = []
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
        for kind in (*SOURCE_LISTS, "geofences", "profiles"):
            names = [x.name for x in getattr(self, kind)]
            if dup := sorted({n for n in names if names.count(n) > 1}):
                raise ValueError(f"[[{kind}]] names must be unique; repeated: {', '.join(dup)}")
        return self

    @property
    def sources(self) -> list[str]:
        """The configured source sections, for messages to a technician."""
        names = [name for name in SOURCE_SECTIONS if getattr(self, name) is not None]
        names += [f"{kind}:{s.name}" for kind in SOURCE_LISTS for s in getattr(self, kind)]
        return names

    def topic(self, stream: str) -> str:
        return f"{self.mqtt.topic_prefix}/{self.device.id}/{stream}"


def _registered() -> tuple[Any, ...]:
    return tuple((kind, tuple((name, e.config) for name, e in drivers.REGISTRY.get(kind, {}).items()))
                 for kind in SOURCE_KINDS.values())


_built_for = _registered()


def refresh() -> None:
    """Rebuild the source sections of `Config` if the registry's config models changed since
    they were built (``drivers.register`` at run time); agent/config `parse` asks first."""
    global _built_for
    now = _registered()
    if now == _built_for:
        return
    for section, kind in SOURCE_KINDS.items():
        model = section_model(kind)
        # The field keeps its default and bounds (max_length); only its model changes.
        field = Config.model_fields[section]
        field.annotation = list[model] if section in SOURCE_LISTS else Optional[model]  # type: ignore[valid-type]  # noqa: UP045
    Config.model_rebuild(force=True)
    _built_for = now
