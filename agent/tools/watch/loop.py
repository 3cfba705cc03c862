"""The ``watch`` loop: subscribe, then print state screens (or JSON lines) until done."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Any, TextIO

from agent.tools.watch.client import RECONNECT_MAX_S, RECONNECT_MIN_S, MqttWatch, Options
from agent.tools.watch.watcher import Watcher

SCREEN_INTERVAL_S = 2.0
NOTHING_YET_HINT = (
    " (not even a retained status): is the agent running and has it ever connected to this broker?"
    "\nThe broker's ACL may also hide the topics from these credentials: docs/mosquitto.acl lets a"
    "\ndevice read only its own cmd topic, so run watch with the backend's credentials."
)
"""Shown while a subscription brought nothing at all."""


def _silence(out: TextIO) -> None:
    """After a broken pipe on stdout, send what is left to /dev/null (no error at exit)."""
    if out is sys.stdout:
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass


def watch(opts: Options, *, as_json: bool = False, duration: float | None = None, once: bool = False,
          interval: float = SCREEN_INTERVAL_S, out: TextIO | None = None, err: TextIO | None = None,
          stop: threading.Event | None = None, watcher: Watcher | None = None,
          reconnect: tuple[float, float] = (RECONNECT_MIN_S, RECONNECT_MAX_S)) -> int:
    """Subscribe and print until ``duration`` passed, ``once`` printed its screen, ``stop`` is
    set or Ctrl-C. Returns 0, or 1 if it never managed to subscribe."""
    out = out or sys.stdout
    err = err or sys.stderr
    stop = stop or threading.Event()
    watcher = watcher or Watcher(opts.prefix)
    out_lock = threading.Lock()

    def note(line: str) -> None:
        try:
            print(f"watch: {line}", file=err, flush=True)
        except (OSError, ValueError):
            pass

    def print_json(readings: list[dict[str, Any]]) -> None:
        try:
            with out_lock:
                out.write("".join(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n" for r in readings))
                out.flush()
        except (OSError, ValueError):  # the reader went away (| head): stop quietly
            _silence(out)
            stop.set()

    malformed_seen = 0

    def report_malformed() -> None:
        """In --json mode stdout holds readings only: problems go to stderr as they come."""
        nonlocal malformed_seen
        total = watcher.malformed
        if total > malformed_seen:
            note(f"{total - malformed_seen} malformed message(s) or reading(s); latest: {watcher.last_problem}")
            malformed_seen = total

    session = MqttWatch(opts, watcher, on_readings=print_json if as_json else None, note=note, reconnect=reconnect)
    ever_subscribed = False
    printed: tuple[Any, ...] = ()
    screens = 0

    def shown() -> tuple[Any, ...]:
        """What a screen shows that can change: the messages taken in and the link."""
        return watcher.changes, session.connected, session.last_error

    def screen(final: bool = False) -> None:
        nonlocal printed, screens
        printed = shown()
        screens += 1
        link = "final" if final else "connected" if session.connected else \
            f"DISCONNECTED ({session.last_error or 'connecting'})"
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(watcher.clock()))
        body = watcher.render()
        if not watcher.state and session.connects:
            body += NOTHING_YET_HINT
        text = f"--- {stamp}Z  {opts.host}:{opts.port} {opts.topic}  {link} ---\n{body}\n"
        try:
            with out_lock:
                out.write(text + "\n")
                out.flush()
        except (OSError, ValueError):
            _silence(out)
            stop.set()

    started = time.monotonic()
    deadline = None if duration is None else started + duration
    next_screen: float | None = None
    try:
        session.start()
        while not stop.is_set():
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                break
            if session.subscribed.is_set():
                if not ever_subscribed:
                    ever_subscribed = True
                    next_screen = now + interval  # the retained status and first messages first
            if next_screen is not None and now >= next_screen:
                next_screen = now + interval
                if as_json:
                    report_malformed()
                elif shown() != printed or (once and not screens):
                    screen()
                if once:
                    break
            stop.wait(0.05)
    except KeyboardInterrupt:
        pass
    finally:
        try:
            session.stop()
        except Exception:  # noqa: BLE001 - already going away
            pass
    if as_json:
        report_malformed()
    elif ever_subscribed and not (once and screens):
        screen(final=True)  # the state as of the end (--for, Ctrl-C), even if unchanged
    if not ever_subscribed:
        note(f"never subscribed to {opts.topic} on {opts.host}:{opts.port}"
             + (f": {session.last_error}" if session.last_error else ""))
        return 1
    return 0
