"""Whether NTP has synchronised the system clock, learnt through what the unit's sandbox allows.

Never adjtimex(2): even its read-only form is a clock system call, and ``ProtectClock=yes`` /
``SystemCallFilter=~@privileged`` kill the agent for it (status=31/SYS under a real systemd).
Instead:

- systemd-timesyncd running (Debian, Raspberry Pi OS): its flag file
  ``/run/systemd/timesync/synchronized``, touched at its first synchronisation of the boot
  (systemd >= 239) — one stat(2);
- otherwise (chrony, ntpd): systemd-timedated's ``NTPSynchronized`` property over the D-Bus
  system bus (timedated makes the adjtimex(2) call itself, outside our sandbox), through
  jeepney: a pure-Python D-Bus client, no subprocess (timedatectl every minute would cost a
  fork and exec on a Pi).

Anything that cannot answer (no bus, no timedated, a timeout) means not synchronised: readings
then wait for GPS time, the safe side.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from jeepney import DBusAddress, Properties
from jeepney.io.blocking import open_dbus_connection
from jeepney.wrappers import unwrap_msg

TIMESYNCD_DIR = Path("/run/systemd/timesync")
"""systemd-timesyncd's runtime folder: it exists while timesyncd runs."""
BUS_TIMEOUT_S = 2.0
"""At most this long for timedated's answer (it is started on demand)."""
TIMEDATED = DBusAddress("/org/freedesktop/timedate1", bus_name="org.freedesktop.timedate1",
                        interface="org.freedesktop.timedate1")

log = logging.getLogger(__name__)
_bus_failure_logged = False
_asking: threading.Thread | None = None
_asking_lock = threading.Lock()


def kernel_clock_synchronised() -> bool:
    if TIMESYNCD_DIR.is_dir():
        return (TIMESYNCD_DIR / "synchronized").exists()
    return timedated_ntp_synchronised()


def timedated_ntp_synchronised(address: str | None = None, timeout_s: float = BUS_TIMEOUT_S) -> bool:
    """timedated's ``NTPSynchronized`` on the system bus (``$DBUS_SYSTEM_BUS_ADDRESS``, or
    ``address``); False when it cannot be asked within ``timeout_s``.

    Asked from a helper thread: jeepney bounds the connection and our call, but not the bus's
    own Hello, and a stuck bus must not stall the agent (its watchdog would kill it). While a
    stuck question is still out, no new one is asked."""
    global _asking
    answer: list[bool] = []
    with _asking_lock:  # the clock is asked from several threads (the store's, the main loop)
        if _asking is not None and _asking.is_alive():
            return False
        asking = _asking = threading.Thread(target=_ask, args=(address, timeout_s, answer),
                                            name="ntp-sync-query", daemon=True)
        asking.start()
    asking.join(timeout_s)
    if not answer:
        _failed(TimeoutError(f"no answer within {timeout_s} s"))
    return bool(answer) and answer[0]


def _ask(address: str | None, timeout_s: float, answer: list[bool]) -> None:
    try:
        with open_dbus_connection(bus=address or "SYSTEM", auth_timeout=timeout_s) as conn:
            reply = conn.send_and_get_reply(Properties(TIMEDATED).get("NTPSynchronized"), timeout=timeout_s)
        ((signature, value),) = unwrap_msg(reply)
        answer.append(signature == "b" and value is True)
    except Exception as e:  # noqa: BLE001 - whatever the bus says or does, the answer is "not known"
        _failed(e)
        answer.append(False)


def _failed(e: Exception) -> None:
    global _bus_failure_logged
    level = logging.DEBUG if _bus_failure_logged else logging.WARNING
    _bus_failure_logged = True
    log.log(level, "cannot ask systemd-timedated whether NTP has synchronised the clock (%s: %s); "
            "the system clock is not trusted until it can (docs/install.md)", type(e).__name__, e)
