"""The daemon: drivers → reporting policy → store → uplink, supervised and stoppable."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from agent import __version__
from agent.config import SOURCE_KINDS, Config
from agent.daemon.health import driver_status, health_reading
from agent.daemon.snapshot import LIVE_FILE_KEY, SNAPSHOT_KEY, LiveSnapshot, runtime_file
from agent.daemon.systemd import Notifier
from agent.model.backoff import backoff_delay
from agent.model.chain import Chain, read_key
from agent.model.clock import TimeKeeper
from agent.model.reading import Reading, iso_ms
from agent.pipeline.alarms import alarm
from agent.pipeline.pipeline import Pipeline
from agent.store.buffer import Store
from agent.uplink.commands import CommandError, CommandHandler
from agent.uplink.mqtt import ConsoleUplink, MqttUplink, Uplink
from agent.uplink.regions import STATE_KEY as USAGE_KEY
from agent.uplink.regions import UplinkPlan
from drivers import driver_class
from drivers.base import Driver

log = logging.getLogger(__name__)

TICK_S = 1.0
SNAPSHOT_WITHIN_S = 5.0
"""Without a RAM file (not under systemd) the snapshot goes to the store, this fresh: one small journal
write and fsync per 5 s when nothing else is written. Under systemd it stays in RAM."""
RESTART_BACKOFF_S = (1.0, 60.0)
"""A crashed driver is restarted after this capped, jittered backoff (first, longest)."""
STEADY_S = 60.0
"""A driver that ran this long before crashing starts its backoff from the first step again."""
DRIVER_STOP_S = 5.0
"""How long a driver may take to notice it is told to stop."""


@dataclass
class SourceHealth:
    """How a source's driver thread has fared: restarts are counted, never silent."""

    finite: bool
    crashes: int = 0
    restarts: int = 0
    last_crash: str | None = None
    """The last exception out of the driver's run(), as ``Type: message``."""
    dead: bool = False
    """A finite source (a replay) that crashed: it is not restarted (it would replay again
    from the start), its data ends early."""

    def snapshot(self) -> dict[str, Any]:
        return {"restarts": self.restarts, "crashes": self.crashes, "last_crash": self.last_crash, "dead": self.dead}


def driver_for(config: Config, source: str) -> tuple[type[Driver], Any]:
    """The driver class a configured source selects, and its section (``Config.sources``
    names list entries as ``seals:rear_door``): the registry's entry for the section's kind and
    the ``driver`` its config names."""
    section, _, item = source.partition(":")
    cfg = next(x for x in getattr(config, section) if x.name == item) if item else getattr(config, section)
    return driver_class(SOURCE_KINDS[section], cfg.driver), cfg


def build_drivers(config: Config, emit: Any, clock: TimeKeeper) -> list[Driver]:
    """One driver per configured source; each may read the agent's trusted clock."""
    drivers = []
    for source in config.sources:
        cls, cfg = driver_for(config, source)
        driver = cls(cfg, emit)
        driver.clock = clock
        drivers.append(driver)
    return drivers


class Agent:
    def __init__(
        self,
        config: Config,
        *,
        dry_run: bool = False,
        until_drained: bool = False,
        out: IO[str] = sys.stdout,
    ):
        self.config = config
        self.until_drained = until_drained or dry_run
        self._tmpdir: str | None = None
        store_path = config.store.path
        if dry_run:
            # Never touch the real buffer: a dry run must not consume the real backlog.
            self._tmpdir = tempfile.mkdtemp(prefix="lorry-agent-dry-run-")
            store_path = Path(self._tmpdir) / "buffer.db"
        self.clock = TimeKeeper(trust_system_clock=config.time.trust_system_clock)
        self.store = Store(store_path, device=config.device.id, sync_interval_s=config.store.sync_interval_s,
                           lazy_sync_s=config.store.lazy_sync_s,
                           chain=Chain(config.device.id, read_key(config.chain.hmac_key_file)),
                           max_bytes=int(config.store.max_mb * 1024 * 1024),
                           max_age_s=config.store.max_age_days * 86400, on_drop=self._dropped,
                           now_ms=lambda: self.clock.stamp().ts_ms)
        self.plan = UplinkPlan(config.profiles, zones=lambda: self.pipeline.geofences.inside,
                               saved_usage=self.store.get_state(USAGE_KEY)) if config.profiles else None
        self.uplink: Uplink = (ConsoleUplink(config, self.store, out) if dry_run
                               else MqttUplink(config, self.store, self.plan))
        self.pipeline = Pipeline(config, self.store, self.clock)
        self.emit = self.pipeline.emit
        self.drivers = build_drivers(config, self.emit, self.clock)
        if config.commands.key_file is not None and isinstance(self.uplink, MqttUplink):
            self.uplink.commands = CommandHandler(
                config.device.id, read_key(config.commands.key_file), self.clock, self._command_actions(),
                window_s=config.commands.window_s,
                state_path=self.store.path.with_name(self.store.path.name + ".commands"),
            )
        live = None if dry_run else runtime_file()
        self.live = LiveSnapshot(live) if live is not None else None
        """The running agent's snapshot in RAM (agent/daemon/snapshot.py); None: kept in the store."""
        self.store.set_state(LIVE_FILE_KEY, str(live or ""), within_s=0)  # where status finds it
        self.notifier = Notifier()
        self.started_wall = time.time()
        self.started_mono = time.monotonic()
        self._next_health = self.started_mono + min(60.0, config.health.interval_s)
        self.stopped_wall: float | None = None
        self._stop = threading.Event()
        self._driver_stop = threading.Event()
        self._driver_threads: list[threading.Thread] = []
        self._finished: set[int] = set()
        self.restart_backoff_s = RESTART_BACKOFF_S
        self._drivers_stopping = 0.0
        self.sources: dict[str, SourceHealth] = {
            source: SourceHealth(finite=d.finite) for source, d in zip(config.sources, self.drivers)}
        """Per configured source (``gps``, ``seals:rear_door``): its driver's crashes and restarts."""

    @property
    def last_fix(self) -> Any:
        return self.pipeline.last_fix

    @property
    def policy(self) -> Any:
        return self.pipeline.policy

    # -- lifecycle ----------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> int:
        self.store.start()
        for path in self.store.damaged_files:
            # Evidence may be in there: say so loudly, and where it was kept.
            self.emit(alarm(None, time.monotonic_ns(), {
                "kind": "store_damaged", "state": "raised", "severity": "critical", "moved_to": path,
                "detail": "the buffer failed its integrity check at start; a new one was started",
            }))
        self._save_snapshot(to_store=True)  # `status` after a reboot shows this run began
        self.uplink.start()  # sinks before sources
        for i, driver in enumerate(self.drivers):
            t = threading.Thread(target=self._drive, args=(i, driver), name=f"driver-{driver.kind}", daemon=True)
            t.start()
            self._driver_threads.append(t)
        self.notifier.ready()
        log.info("lorry-agent running as %s with %d source(s)", self.config.device.id, len(self.drivers))
        tick = min(TICK_S, self.notifier.watchdog_interval_s or TICK_S)
        try:
            while not self._stop.wait(tick):
                if self._healthy():
                    self.notifier.watchdog()
                self._save_snapshot()
                self.store.release_held(self.pipeline.resolve_held)
                self._maybe_health()
                if self.until_drained and self._drained():
                    break
        finally:
            self._shutdown()
        if self.until_drained and (died := self.died()):
            # A replay that ended early, or a source that crashed on the way: its data is
            # incomplete, and whoever waited for the drain must know.
            for line in died:
                print(f"lorry-agent: {line}", file=sys.stderr)
            return 1
        return 0

    def died(self) -> list[str]:
        """One line per source whose driver crashed during this run, naming it and the error."""
        out = []
        for source, h in self.sources.items():
            if h.crashes:
                what = ("it ended early (a replay is not restarted)" if h.dead
                        else f"crashed {h.crashes} time(s), restarted {h.restarts} time(s)")
                out.append(f"source {source} died: {h.last_crash}; {what}")
        return out

    def _drive(self, index: int, driver: Driver) -> None:
        """Run a driver; if it crashes (a bug, never bad input), count it and restart it with
        backoff, or, for a finite source (a replay), mark it dead: its data ends there."""
        source = list(self.sources)[index]
        health = self.sources[source]
        attempt = 0
        try:
            while not self._driver_stop.is_set():
                started = time.monotonic()
                try:
                    driver.run(self._driver_stop)
                except BaseException as e:  # noqa: BLE001 - a driver bug must not take the agent down
                    health.crashes += 1
                    health.last_crash = f"{type(e).__name__}: {e}"
                    log.error("source %s: driver crashed: %s", source, health.last_crash)
                    log.debug("source %s: the crash", source, exc_info=True)
                    if driver.finite:
                        health.dead = True
                        return
                else:
                    if driver.finite or self._driver_stop.is_set():
                        return
                    log.warning("source %s: driver stopped by itself; restarting it", source)
                attempt = 1 if time.monotonic() - started >= STEADY_S else attempt + 1
                if self._driver_stop.wait(backoff_delay(attempt, *self.restart_backoff_s)):
                    return
                health.restarts += 1
                log.info("source %s: restarting its driver (restart %d)", source, health.restarts)
        finally:
            self._finished.add(index)

    def _command_actions(self) -> dict[str, Any]:
        """What the backend may ask for (docs/commands.md)."""

        def ping(_args: dict[str, Any]) -> dict[str, Any]:
            return {"pong": True, "uptime_s": int(time.monotonic() - self.started_mono),
                    "version": __version__, "pending": self.store.pending()}

        def position(_args: dict[str, Any]) -> dict[str, Any]:
            fix = self.pipeline.last_fix
            if fix is None:
                raise CommandError("no fix yet")
            data = {**fix.data, "event": "requested"}
            self.store.append(Reading("position", fix.ts_ms, data))
            return {"ts": iso_ms(fix.ts_ms or 0), **data}

        def set_profile(args: dict[str, Any]) -> dict[str, Any]:
            profile = args.get("profile")
            if profile not in ("moving", "parked", "auto"):
                raise CommandError('args.profile must be "moving", "parked" or "auto"')
            self.pipeline.force_profile(profile)
            return {"profile": profile, "state": self.pipeline.policy.state}

        def flush(_args: dict[str, Any]) -> dict[str, Any]:
            done = self.store.flush()
            return {"durable": done, "pending": self.store.pending()}

        return {"ping": ping, "position": position, "set_profile": set_profile, "flush": flush}

    def _dropped(self, dropped: list[Any]) -> None:
        """The store gave readings up: say which, so a gap in seq is explained, never silent."""
        for d in dropped:
            data = {"kind": "data_dropped", "state": "raised", "dropped_stream": d.stream, "count": d.count,
                    "reason": d.reason}
            if d.first_seq:
                data |= {"first_seq": d.first_seq, "last_seq": d.last_seq}
            self.emit(alarm(None, time.monotonic_ns(), data))

    def _maybe_health(self) -> None:
        interval = self.config.health.interval_s
        now = time.monotonic()
        if not interval or now < self._next_health or (self.until_drained and self._sources_done()):
            return
        self._next_health = now + interval
        self.emit(health_reading(
            started_mono=self.started_mono, clock=self.clock, drivers=self.drivers,
            pipeline_status=self.pipeline.snapshot(), pending=self.store.pending(), time_pending=self.store.held,
            sources={source: h.snapshot() for source, h in self.sources.items()},
        ))

    def _healthy(self) -> bool:
        return self.uplink.alive and self.store.writer_alive

    def _sources_done(self) -> bool:
        """Every replayed source has ended (live and simulated ones run alongside them)."""
        return all(i in self._finished for i, d in enumerate(self.drivers) if d.finite)

    def _drained(self) -> bool:
        if not self._sources_done():
            return False
        # The replays ended: live and simulated sources stop with them, or one that reads
        # faster than the ticks (a sensor every 0.1 s) would never let the buffer run empty.
        if not self._driver_stop.is_set():
            self._driver_stop.set()
            self._drivers_stopping = time.monotonic()
        stopped = (all(not t.is_alive() for t in self._driver_threads)
                   or time.monotonic() - self._drivers_stopping > DRIVER_STOP_S)
        if stopped:
            self.store.sync_soon()  # nothing more comes: no reason to wait for the group commit
        return stopped and self.store.pending() == 0

    def _shutdown(self) -> None:
        self.notifier.stopping()
        self._driver_stop.set()
        for t in self._driver_threads:
            t.join(DRIVER_STOP_S)
        self.store.flush()
        self._save_snapshot(to_store=True)
        self.uplink.stop(timeout=10)
        self.stopped_wall = time.time()
        self._save_snapshot(to_store=True)
        self.store.close()
        if self.live is not None:
            self.live.remove()
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
        log.info("lorry-agent stopped")

    # -- status -------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        err = self.clock.system_clock_error_s()
        commands = self.uplink.commands
        return {
            "device": self.config.device.id,
            "pid": os.getpid(),
            "updated": time.time(),
            "started": self.started_wall,
            "stopped": self.stopped_wall,
            **self.pipeline.snapshot(),
            "clock": {
                "gps_time": self.clock.has_gps_time,
                "system_trusted": self.clock.system_trusted(),
                "system_error_s": None if err is None else round(err, 3),
            },
            "uplink": self.uplink.snapshot(),
            "commands": None if commands is None else {
                "accepted": commands.accepted, "rejected": commands.rejected,
                "nonce_record_unusable_at_start": commands.record.unusable,
                "nonce_record_write_errors": commands.record.write_errors},
            "drivers": {source: driver_status(d) | self.sources[source].snapshot()
                        for source, d in zip(self.sources, self.drivers)},
            "store": {
                "commits": self.store.commits,
                "durable_commits": self.store.durable_commits,
                "commit_errors": self.store.commit_errors,
                "last_error": self.store.last_error,
                "damaged_files": self.store.damaged_files,
                "dropped": dict(self.store.dropped),
                "disk_full_errors": self.store.full_errors,
                "time_pending": self.store.held,
            },
        }

    def _save_snapshot(self, *, to_store: bool = False) -> None:
        """Every tick to the live file when there is one (RAM), else, and at start and stop, to
        the store (written with its next commit)."""
        snapshot = self.snapshot()
        if not to_store and self.live is not None and self.live.write(snapshot):
            return
        # Without the RAM file, status reads it from the store: fresh within its STALE_S.
        self.store.set_state(SNAPSHOT_KEY, json.dumps(snapshot, default=str), within_s=SNAPSHOT_WITHIN_S)


def run(config: Config, *, dry_run: bool = False, until_drained: bool = False) -> int:
    agent = Agent(config, dry_run=dry_run, until_drained=until_drained)

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("signal %d: stopping", signum)
        agent.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return agent.run()
