"""The state screen: one block of plain-text lines per device, and the time helpers it uses."""

from __future__ import annotations

import datetime as dt
import textwrap
import time
from collections import Counter
from typing import Any

from agent.tools.watch.state import DROPPED_STREAM_KEYS, DeviceState, lookup

LABEL = 10
_AUTHORISED: dict[Any, str] = {True: "authorised", False: "NOT AUTHORISED"}
"""A seal event's ``authorised``, as received (any JSON value)."""


def _line(label: str, text: str) -> str:
    return f"  {label:<{LABEL}}{text}"


def _wrapped(label: str, items: list[str], sep: str = ", ") -> list[str]:
    text = sep.join(items)
    lines = textwrap.wrap(text, 96, break_long_words=False, break_on_hyphens=False) or [""]
    return [_line(label if i == 0 else "", chunk) for i, chunk in enumerate(lines)]


def _f(x: Any, fmt: str = "", unit: str = "") -> str:
    """A value from a payload, whatever its type: numbers formatted, None as '-'."""
    if x is None:
        return "-"
    if isinstance(x, (int, float)) and not isinstance(x, bool) and fmt:
        return f"{x:{fmt}}{unit}"
    return f"{x}{unit}"


def _kib(n: int) -> str:
    return f"{n} B" if n < 1024 else f"{n / 1024:.1f} KiB" if n < 1024 * 1024 else f"{n / 1048576:.1f} MiB"


def duration(seconds: float) -> str:
    """``42 s``, ``3 min``, ``2 h 05 min``, ``3 d 04 h``."""
    s = int(abs(seconds))
    if s < 120:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 86400} d {s % 86400 // 3600:02d} h"


def parse_ts(ts: Any) -> float | None:
    """Unix time of a reading's ``ts`` (``2026-11-21T03:12:05.000Z``), or None."""
    if not isinstance(ts, str):
        return None
    try:
        t = dt.datetime.fromisoformat(ts.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (t if t.tzinfo else t.replace(tzinfo=dt.UTC)).timestamp()


def age(ts: Any, now: float) -> str:
    t = parse_ts(ts)
    if t is None:
        return "age ?"
    if t > now + 5:
        return f"{duration(t - now)} in the future (clock?)"
    return f"age {duration(now - t)}"


def _clock(t: float | None) -> str:
    return "-" if t is None else time.strftime("%H:%M:%S", time.gmtime(t)) + "Z"


def device_lines(dev: DeviceState, now: float) -> list[str]:
    status = dev.status or "status unknown"
    if dev.status is not None:
        status += " (retained)" if dev.status_retained else f" since {_clock(dev.status_at)}"
    seen = f"last message {duration(now - dev.last_message_at)} ago" if dev.last_message_at else "no messages"
    lines = [f"{dev.id}  {status}  {seen}  {dev.messages} msgs {_kib(dev.bytes)}"]

    if (p := dev.position) is not None:
        ev = f"  ({p['event']})" if p.get("event") else ""
        lines.append(_line("position", f"{p.get('ts')}  {_f(p.get('lat'), '.7f')}, {_f(p.get('lon'), '.7f')}  "
                                       f"{_f(p.get('speed_kmh'), '.1f', ' km/h')}  fix {_f(p.get('fix'))}  "
                                       f"{age(p.get('ts'), now)}  seq {p['seq']}{ev}"))
    ign = dev.streams.get("ignition")
    if ign and ign.latest:
        on = ign.latest.get("on")
        lines.append(_line("ignition", f"{'on' if on is True else 'off' if on is False else _f(on)}  "
                                       f"since {ign.latest.get('ts')}"))
    if (h := dev.health) is not None:
        in_view = lookup(h, "gps", "satellites_in_view")
        in_view_total = sum(v for v in in_view.values() if isinstance(v, int)) if isinstance(in_view, dict) else None
        parts = [f"buffer {_f(dev.buffer_pending)} pending"]
        if lookup(h, "buffer", "time_pending"):
            parts.append(f"{lookup(h, 'buffer', 'time_pending')} waiting for a trusted time")
        parts.append(f"sats {_f(lookup(h, 'gps', 'sats_used'))} used" +
                     (f" / {in_view_total} in view" if in_view_total is not None else ""))
        err = lookup(h, "clock", "system_error_s")
        parts.append(f"clock {_f(lookup(h, 'clock', 'source'))}" +
                     (f" (system {_f(err, '+.1f', ' s')})" if err is not None else ""))
        if dev.vin is not None or lookup(h, "vehicle") is not None:
            parts.append(f"VIN {_f(dev.vin)}")
        if h.get("reporting"):
            parts.append(str(h.get("reporting")))
        parts.append(f"at {h.get('ts')}")
        lines += _wrapped("health", parts)
    for name, s in sorted(dev.seals.items()):
        text = f"{name} {_f(s.get('event'))} at {s.get('ts')}"
        if s.get("event") in ("opened", "tampered"):
            text += "  " + _AUTHORISED.get(s.get("authorised"), "authorised ?")
        zones = s.get("zones")
        text += f"  zones: {', '.join(map(str, zones)) if isinstance(zones, list) and zones else '-'}"
        if s.get("seal_id") is not None:
            text += f"  id {s.get('seal_id')}"
        if s.get("battery_pct") is not None:
            text += f"  battery {_f(s.get('battery_pct'), 'd', '%')}"
        lines.append(_line("seal", text))
    for name, t in sorted(dev.temperatures.items()):
        value = f"{_f(t.get('c'), '.2f', ' C')}" if t.get("c") is not None else f"no value ({_f(t.get('error'))})"
        errors = dev.temperature_errors.get(name, 0)
        lines.append(_line("temp", f"{name} {value} at {t.get('ts')}" + (f"  errors {errors}" if errors else "")))
    if dev.can:
        names = Counter(name for name, _sa in dev.can)
        items = [f"{name}{f'[sa {sa}]' if names[name] > 1 else ''}={_f(v.get('value'))}"
                 f"{' ' + str(v['unit']) if v.get('unit') else ''}"
                 for (name, sa), v in sorted(dev.can.items(), key=lambda kv: (kv[0][0], str(kv[0][1])))]
        latest = max(dev.can.values(), key=lambda v: v["seq"])
        lines += _wrapped("can", items)
        lines[-1] += f"  (at {latest.get('ts')})"
    for a in dev.active_dtcs:
        lamps = a.get("lamps")
        lit = [k for k, v in lamps.items() if v == "on"] if isinstance(lamps, dict) else []
        lines.append(_line("dtc", f"SPN {_f(a.get('spn'))} FMI {_f(a.get('fmi'))} SA {_f(a.get('source_address'))} "
                                  f"oc {_f(a.get('oc'))}  since {a.get('ts')}" +
                                  (f"  lamps {', '.join(lit)}" if lit else "")))
    for a in reversed(dev.alarms):
        lines.append(_line("alarm", _alarm_text(a)))
    for _name, st in sorted(dev.streams.items()):
        if st.seqs.count:
            lines.append(_line("stream", f"{st.summary()};  {st.readings} readings, {st.duplicates} dup, "
                                         f"{st.messages} msgs ({st.batches} batches), {_kib(st.bytes)}"
                                         + (f", {st.malformed} malformed" if st.malformed else "")))
        elif st.messages:
            lines.append(_line("stream", f"{st.name}: no usable readings;  {st.messages} msgs, {_kib(st.bytes)}, "
                                         f"{st.malformed} malformed"))
    if dev.other:
        lines += _wrapped("other", [f"{k} {n} msgs" for k, n in sorted(dev.other.items())])
    if dev.malformed_messages or dev.malformed_readings:
        lines.append(_line("MALFORMED", f"{dev.malformed_messages} messages, {dev.malformed_readings} readings"))
        lines += [_line("", p) for p in dev.problems]
    return lines


ALARM_DETAIL_KEYS = ("seal", "sensor", "side", "c", "limit_c", "zone", "zone_kind", "spn", "fmi",
                     *DROPPED_STREAM_KEYS, "count", "first_seq", "last_seq", "reason")


def _alarm_text(a: dict[str, Any]) -> str:
    severity = f" [{a['severity']}]" if a.get("severity") else ""
    detail = " ".join(f"{k}={a[k]}" for k in ALARM_DETAIL_KEYS if a.get(k) is not None)
    if a.get("authorised") is not None:
        detail += " authorised" if a.get("authorised") else " NOT authorised"
    return f"{a.get('ts')}  {_f(a.get('kind'))} {_f(a.get('state'))}{severity}  {detail}  (seq {a['seq']})".rstrip()
