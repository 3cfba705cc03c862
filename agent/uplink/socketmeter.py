"""Bytes on the wire, counted by the kernel: what the carrier bills, TLS and MQTT framing
included (TCP payload; IP and TCP headers are not in it).

Linux keeps per-socket totals in ``TCP_INFO`` (``tcpi_bytes_acked``, ``tcpi_bytes_received``,
kernel ≥ 4.2). Elsewhere ``SocketMeter`` reports nothing and the caller counts what it wrote.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

# struct tcp_info (include/uapi/linux/tcp.h): u64 tcpi_bytes_acked at offset 120, u64
# tcpi_bytes_received at 128.
_OFFSET = 120
_LEN = 136


def tcp_bytes(sock: Any) -> tuple[int, int] | None:
    """(bytes sent and acknowledged by the peer, bytes received) on this connection. ``sock``
    is whatever paho holds (a TCP or TLS socket, or a websocket wrapper without getsockopt)."""
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _LEN)
    except (OSError, AttributeError, ValueError):
        return None
    if len(raw) < _LEN:
        return None
    return struct.unpack_from("=QQ", raw, _OFFSET)


class SocketMeter:
    """Turns one connection's running totals into increments."""

    def __init__(self) -> None:
        self._sock: object | None = None
        self._last = (0, 0)
        self.available = True

    def take(self, sock: object | None) -> int:
        """Bytes (both directions) since the last call; a new socket starts from zero."""
        if sock is None:
            return 0
        if sock is not self._sock:
            self._sock, self._last = sock, (0, 0)
        now = tcp_bytes(sock)
        if now is None:
            self.available = False
            return 0
        delta = (now[0] - self._last[0]) + (now[1] - self._last[1])
        self._last = now
        return max(0, delta)
