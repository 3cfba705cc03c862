"""The live bus, gently: the kernel drops the frames nothing decodes, and the driver's thread
wakes about 20 times a second, not once per frame.

A truck's J1939 bus carries ~1,500 frames/s, most of them (~80 % in bench/bench_can.py's mix)
parameter groups the driver ignores. Waking for each one costs a context switch and a pass
through python-can per frame, which is most of the agent's CPU on a Raspberry Pi. So:

- **Kernel filters.** On SocketCAN the raw socket gets one ``CAN_RAW_FILTER`` entry per PGN in
  use (:func:`kernel_pgns`: what drivers/can/handlers.py does not ignore under the config, plus
  EEC1 and CCVS1 when the ignition is taken from the bus), so other frames never reach the
  process. A J1939 PGN is identifier bits 8..25, without the destination byte for PDU1
  (drivers/can/j1939/ids.py ``pgn_match``); the filters also ask for extended, non-remote
  frames. Error frames are not subject to ``CAN_RAW_FILTER``: the kernel delivers them by the
  socket's ``CAN_RAW_ERR_FILTER``, which python-can sets to every class (bus-off, restarted…).
  Other interfaces (python-can's ``virtual`` bus) and replays get every frame and filter them
  in Python as before (IGNORED handlers): what is decoded is the same on every interface; the
  driver's ``frames`` / ``unknown_frames`` / ``non_j1939_frames`` count what reached it.
- **Batched receive.** :func:`batches` takes what is queued, then sleeps BATCH_S while the
  kernel queues the next frames in the socket's buffer (stamped on arrival: ``msg.timestamp``
  is the kernel's, so nothing is dated late), and takes those at once. BATCH_S = 50 ms keeps
  the wake-ups at ~20/s and the delay of a reading (values go out once a second anyway; DM1
  changes are urgent but a DM1 is itself sent once a second) well below anything the backend
  could notice, and needs 50 ms of bus in the socket buffer: a saturated 500 kbit/s bus is at
  most ~4,200 frames/s, ~210 frames, and each queued frame costs the buffer ~0.9 KB (sk_buff
  overhead), so ~190 KB unfiltered, which the default buffer (``net.core.rmem_default``,
  208 KB) just holds. The socket asks for RCVBUF_BYTES (the kernel caps it at
  ``net.core.rmem_max`` and doubles it: 416 KB by default), and ``status`` says what it got
  (``kernel.rcvbuf_bytes``) and how many frames the kernel dropped for a full buffer
  (``kernel.rx_dropped``, from ``SO_MEMINFO``; python-can's receive cannot take the
  ``SO_RXQ_OVFL`` counter, which would add a second control message to every frame).
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import can

from drivers.can import handlers
from drivers.can.config import CanConfig
from drivers.can.j1939 import spn
from drivers.can.j1939.ids import pgn_match

log = logging.getLogger(__name__)

CAN_RTR_FLAG = 0x40000000
CAN_RAW_FILTER_MAX = 512  # linux/can/raw.h: more entries than this are refused
# Between two batches. Why 50 ms: see the module's docstring.
BATCH_S = 0.05
# A batch never takes more frames than this before the loop looks at stop and the clock again
# (at 1,500 frames/s a batch is ~75 frames; this only bounds a flood).
MAX_BATCH = 4096
# Silence that makes recv() give up and the loop look at the bus as a whole (ignition, bus-off).
RECV_TIMEOUT_S = 0.5
# What the socket's receive buffer is asked to hold (the kernel caps and doubles it).
RCVBUF_BYTES = 1 << 20
# How often (in batches, ~1 s) the kernel's drop counter is read.
DROPS_EVERY = 20
SO_MEMINFO = getattr(socket, "SO_MEMINFO", 55)  # Linux >= 4.6: u32[SK_MEMINFO_VARS]
SK_MEMINFO_DROPS = 8
# Sent whenever the ignition is on (engine controller, cab), so they keep "frames arriving =
# ignition on" true on a filtered socket even when none of their signals is used.
IGNITION_PGNS = frozenset((spn.EEC1, spn.CCVS1))


def kernel_pgns(config: CanConfig, dbc: dict[int, Any]) -> frozenset[int]:
    """The PGNs the kernel is asked to let through."""
    pgns = handlers.used_pgns(config, dbc)
    return pgns | IGNITION_PGNS if config.ignition else pgns


def kernel_filters(pgns: Iterable[int]) -> list[can.typechecking.CanFilter] | None:
    """python-can filters (``set_filters``) passing extended, non-remote frames of ``pgns``
    and nothing else (error frames go by their own filter); None when there are more than the
    kernel takes (then every frame comes and Python filters them)."""
    out: list[can.typechecking.CanFilter] = []
    for pgn in sorted(set(pgns)):
        m = pgn_match(pgn)
        if m is not None:
            out.append({"can_id": m[0], "can_mask": m[1] | CAN_RTR_FLAG, "extended": True})
    return out if len(out) <= CAN_RAW_FILTER_MAX else None


class Kernel:
    """What the kernel does for one open SocketCAN bus: its filters, buffer and drops."""

    def __init__(self, sock: socket.socket | None, filters: int | None, pgns: int, rcvbuf: int | None):
        self.sock = sock
        self.filters = filters
        """Kernel filter entries set (None: none, every frame reaches the process)."""
        self.pgns = pgns
        self.rcvbuf = rcvbuf
        self.dropped = 0
        """Frames the kernel dropped for this socket (its buffer was full), since it opened."""

    @classmethod
    def attach(cls, bus: Any, pgns: frozenset[int]) -> Kernel:
        """Filters and buffer for ``bus`` when it is a SocketCAN socket; else nothing to do."""
        sock = getattr(bus, "socket", None)
        if not isinstance(sock, socket.socket) or sock.family != getattr(socket, "AF_CAN", -1):
            return cls(None, None, len(pgns), None)
        filters = kernel_filters(pgns)
        if filters is None:
            log.warning("CAN: %d PGNs in use, more than the kernel filters (%d): every frame is received",
                        len(pgns), CAN_RAW_FILTER_MAX)
        else:
            bus.set_filters(filters)
            if not getattr(bus, "_is_filtered", True):  # python-can fell back to filtering in Python
                filters = None
        rcvbuf = None
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF_BYTES)
            rcvbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        except OSError as e:
            log.debug("CAN: receive buffer left as it was: %s", e)
        return cls(sock, None if filters is None else len(filters), len(pgns), rcvbuf)

    def poll(self) -> None:
        """Read the kernel's drop count for the socket (SO_MEMINFO; nothing on old kernels)."""
        if self.sock is None:
            return
        try:
            info = self.sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, 4 * (SK_MEMINFO_DROPS + 1))
        except OSError:
            self.sock = None  # not available here (or closed): stop asking
            return
        if len(info) >= 4 * (SK_MEMINFO_DROPS + 1):
            self.dropped = struct.unpack_from("=I", info, 4 * SK_MEMINFO_DROPS)[0]

    def snapshot(self) -> dict[str, Any]:
        return {"filters": self.filters, "pgns": self.pgns, "rcvbuf_bytes": self.rcvbuf}


def batches(bus: Any, stop: threading.Event, kernel: Kernel | None = None) -> Iterator[can.Message | None]:
    """Every frame ``bus`` receives, in order, taken in batches BATCH_S apart; None after
    RECV_TIMEOUT_S without any frame (the bus is silent)."""
    recv = bus.recv
    wait = stop.wait
    n = 0
    while not stop.is_set():
        msg = recv(RECV_TIMEOUT_S)
        if msg is None:
            yield None
            continue
        yield msg
        taken = 1
        while taken < MAX_BATCH and (msg := recv(0)) is not None:
            yield msg
            taken += 1
        n += 1
        if kernel is not None and n % DROPS_EVERY == 0:
            kernel.poll()
        if taken < MAX_BATCH and wait(BATCH_S):
            return
