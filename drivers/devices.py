"""Device access for ``lorry-agent unit-dropin`` (agent/daemon/dropin.py): what a serial port
or a GPIO line needs in systemd's ``DeviceAllow=``, for drivers' ``devices()``.

A UART is allowed by its node; a USB receiver by its class (ttyUSB, ttyACM), since it may come
back under another node after a replug; GPIO lines by the gpiochip class (chips are found by
label at run time). A pyserial URL (``loop://``, ``socket://``) has no device node.
"""

from __future__ import annotations

USB_HINTS = ("/dev/serial/by-id/", "/dev/serial/by-path/", "/dev/ttyUSB", "/dev/ttyACM")
GPIOCHIP = "char-gpiochip rw"


def serial_port(port: str) -> list[str]:
    """What a serial port (a device, a glob, or a pyserial URL) needs."""
    if "://" in port:
        return []
    if port.startswith(USB_HINTS) or any(c in port for c in "*?["):
        return ["char-ttyUSB rw", "char-ttyACM rw"]
    return [f"{port} rw"]


def allow_lines(lines: list[str]) -> list[str]:
    """The drivers' lines for the drop-in: each once, in the order given, the GPIO chip class
    after the serial devices (the order ``unit-dropin`` has always printed)."""
    unique = list(dict.fromkeys(lines))
    return [line for line in unique if line != GPIOCHIP] + [line for line in unique if line == GPIOCHIP]
