"""A slow, costly roaming link on loopback: a TCP relay for tests and benchmarks.

``LinkSim(broker_port, rtt_s=0.3, rate_bps=256_000)`` listens on a free loopback port and
relays every connection to ``host:target_port``, each direction behaving like one side of a
cellular link:

* **latency**: a chunk is released ``rtt_s / 2`` after it was read (a true one-way delay,
  pipelined: chunks in flight overlap, order is kept);
* **rate**: a chunk of n bytes occupies the link ``n * 8 / rate_bps`` seconds and chunks queue
  behind each other (serialisation), per direction;
* **buffer**: at most ``buffer_bytes`` wait in the relay per direction; beyond that it stops
  reading, so the sender's own TCP buffers fill as they would behind a real bottleneck.

Reads are at most 4 KiB, so MQTT packets are timed one by one, not in large lumps.
``bytes_up`` / ``bytes_down`` count TCP payload relayed (MQTT framing included, TCP/IP
headers not). ``set()`` changes the link live; ``black_hole()`` stops forwarding without
closing anything (bytes wait, as in a tunnel; a new connection is still accepted but carries
nothing either), ``forward()`` resumes; ``drop()`` resets every open connection (coverage
lost). A side that closes (FIN) is closed on the other side once everything it sent before
has been delivered, and no sooner than rtt_s / 2.

One asyncio loop in a daemon thread carries every connection; the public methods may be
called from any thread. For tests and benchmarks only, never in the agent itself.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections import deque
from typing import Any

CHUNK = 4096


class LinkSim:
    def __init__(self, target_port: int, *, rtt_s: float = 0.0, rate_bps: float | None = None,
                 host: str = "127.0.0.1", buffer_bytes: int = 64 * 1024):
        self.target = (host, target_port)
        self.rtt_s = 0.0
        self.rate_bps: float | None = None
        self.set(rtt_s=rtt_s, rate_bps=rate_bps)
        self.buffer_bytes = max(CHUNK, buffer_bytes)
        self.bytes_up = 0
        """Client → target bytes relayed (delivered to the target)."""
        self.bytes_down = 0
        """Target → client bytes relayed (delivered to the client)."""
        self.connections = 0
        """Connections accepted so far."""
        self.accept_times: list[float] = []
        """``time.monotonic()`` of every accepted connection, in order."""
        self._conns: set[_Conn] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="linksim", daemon=True)
        self._thread.start()
        self._closed = False
        try:
            self._forwarding = self._call(self._make_event)
            self._server = self._call(self._listen)
        except BaseException:
            self._stop_loop()
            raise
        self.port: int = self._server.sockets[0].getsockname()[1]

    # -- control (any thread) -------------------------------------------------------------------

    def set(self, *, rtt_s: float | None = None, rate_bps: float | None = None) -> None:
        """Change the link for chunks read from now on. None leaves a value as it is;
        ``rate_bps=0`` removes the rate limit."""
        if rtt_s is not None:
            if rtt_s < 0:
                raise ValueError("rtt_s must be >= 0")
            self.rtt_s = float(rtt_s)
        if rate_bps is not None:
            if rate_bps < 0:
                raise ValueError("rate_bps must be >= 0")
            self.rate_bps = float(rate_bps) or None

    def black_hole(self) -> None:
        """Stop forwarding in both directions; connections stay open and bytes wait."""
        self._call(self._set_forwarding, False)

    def forward(self) -> None:
        """Resume forwarding: what waited is delivered, in order."""
        self._call(self._set_forwarding, True)

    def drop(self) -> None:
        """Reset every open connection, both sides at once (coverage lost). Listening goes on."""
        self._call(self._drop_all)

    def reset_counters(self) -> tuple[int, int]:
        """Zero ``bytes_up`` and ``bytes_down``; returns what they were."""
        return self._call(self._reset)

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._call(self._shutdown)
        finally:
            self._stop_loop()

    def __enter__(self) -> LinkSim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- loop thread ----------------------------------------------------------------------------

    def _call(self, fn: Any, *args: Any) -> Any:
        async def run() -> Any:
            out = fn(*args)
            return await out if asyncio.iscoroutine(out) else out

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(30)

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self._loop.close()

    @staticmethod
    def _make_event() -> asyncio.Event:
        ev = asyncio.Event()
        ev.set()
        return ev

    async def _listen(self) -> asyncio.base_events.Server:
        return await asyncio.start_server(self._accept, "127.0.0.1", 0, limit=CHUNK)

    def _set_forwarding(self, on: bool) -> None:
        if on:
            self._forwarding.set()
        else:
            self._forwarding.clear()

    def _reset(self) -> tuple[int, int]:
        old = (self.bytes_up, self.bytes_down)
        self.bytes_up = self.bytes_down = 0
        return old

    def _drop_all(self) -> None:
        for conn in list(self._conns):
            conn.abort()

    async def _shutdown(self) -> None:
        self._server.close()
        tasks = [t for c in self._conns for t in c.tasks]
        self._drop_all()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        await asyncio.sleep(0)  # let the accept handlers finish

    async def _accept(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.accept_times.append(time.monotonic())
        try:
            treader, twriter = await asyncio.open_connection(*self.target, limit=CHUNK)
        except OSError:
            _reset(cwriter)
            return
        for w in (cwriter, twriter):
            sock = w.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = _Conn(cwriter, twriter)
        up = _Direction(self, "up", creader, twriter, conn)
        down = _Direction(self, "down", treader, cwriter, conn)
        conn.tasks = [asyncio.ensure_future(c) for c in (up.pump(), up.deliver(), down.pump(), down.deliver())]
        self._conns.add(conn)
        try:
            await asyncio.wait(conn.tasks)
        finally:
            self._conns.discard(conn)
            conn.close()


class _Conn:
    def __init__(self, client: asyncio.StreamWriter, target: asyncio.StreamWriter):
        self.writers = (client, target)
        self.tasks: list[asyncio.Future] = []
        self.aborted = False

    def abort(self) -> None:
        """Reset both sides and stop relaying at once, whatever is still queued."""
        if not self.aborted:
            self.aborted = True
            for w in self.writers:
                _reset(w)
            for t in self.tasks:
                t.cancel()

    def close(self) -> None:
        for w in self.writers:
            if not w.transport.is_closing():
                w.close()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST, not a FIN: to the peer the connection is simply gone."""
    sock = writer.get_extra_info("socket")
    try:
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    writer.transport.abort()


class _Direction:
    """One direction of one connection: ``pump`` reads and stamps chunks with the time they
    reach the far end, ``deliver`` writes them out at that time."""

    def __init__(self, sim: LinkSim, name: str, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, conn: _Conn):
        self.sim, self.name, self.reader, self.writer, self.conn = sim, name, reader, writer, conn
        self.queue: deque[tuple[float, bytes]] = deque()  # b"": end of stream
        self.queued = 0
        self.has_data = asyncio.Event()
        self.has_space = asyncio.Event()
        self.link_free = 0.0  # when the link has finished serialising what was read so far
        self.last_release = 0.0

    async def pump(self) -> None:
        loop = asyncio.get_running_loop()
        sim = self.sim
        try:
            while True:
                while self.queued >= sim.buffer_bytes:
                    self.has_space.clear()
                    await self.has_space.wait()
                await sim._forwarding.wait()
                data = await self.reader.read(CHUNK)
                if not data:
                    break
                now = loop.time()
                rate = sim.rate_bps
                start = max(self.link_free, now)
                self.link_free = start + (len(data) * 8 / rate if rate else 0.0)
                release = max(self.last_release, self.link_free + sim.rtt_s / 2)
                self.last_release = release
                self.queued += len(data)
                self.queue.append((release, data))
                self.has_data.set()
        except OSError:
            pass
        # End of stream (or a reset): a FIN, as late as a byte sent now would be.
        release = max(self.last_release, loop.time() + sim.rtt_s / 2)
        self.queue.append((release, b""))
        self.has_data.set()

    async def deliver(self) -> None:
        loop = asyncio.get_running_loop()
        sim = self.sim
        try:
            while True:
                while not self.queue:
                    self.has_data.clear()
                    await self.has_data.wait()
                release, data = self.queue[0]
                delay = release - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                await sim._forwarding.wait()
                if not data:
                    if self.writer.can_write_eof():
                        self.writer.write_eof()
                    return
                self.queue.popleft()
                self.queued -= len(data)
                self.has_space.set()
                # Counted before the write, so a receiver never sees bytes not counted yet.
                if self.name == "up":
                    sim.bytes_up += len(data)
                else:
                    sim.bytes_down += len(data)
                self.writer.write(data)
                await self.writer.drain()
        except (OSError, RuntimeError):
            # The receiving side is gone: so is the connection, for both.
            self.conn.abort()
