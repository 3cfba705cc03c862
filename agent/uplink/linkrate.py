"""How much to put on the link: message size and bytes in flight from what the link shows.

Every PUBACK gives a round-trip sample (publish → acknowledgement) and a delivery-rate sample:
the bytes acknowledged between a message's publish and its own acknowledgement, over that
time (as BBR does: acknowledgements arriving in one lump do not fake a fast link). The
bandwidth-delay product (the fastest recent delivery rate × the shortest recent round trip)
is what the link holds; we keep about twice that in flight, never less than two messages,
and cut it into messages of about a quarter each (at least 100 ms of link time each).
So a slow roaming link (256 kbit/s, 300 ms) carries a few full messages at a time and a fresh
alarm waits behind well under a second of backlog, while a fast link gets large messages and
a deep window. Limits: ``max_message_bytes`` (and the broker's Maximum Packet Size).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from operator import gt, lt

MIN_MESSAGE = 1024
MIN_MESSAGE_S = 0.1
START_INFLIGHT = 16 * 1024
MIN_INFLIGHT = 4 * 1024
# Samples older than this are forgotten: the link changes as the lorry moves.
WINDOW_S = 30.0


class _WindowBest:
    """The best sample of the last ``WINDOW_S``, in O(1) per sample: read for every message
    while a backlog drains, so never a scan of thousands of samples. A monotonic deque: a
    sample is dropped as soon as a newer one is at least as good."""

    def __init__(self, better: Callable[[float, float], bool]):
        self._better = better
        self._q: deque[tuple[float, float]] = deque()

    def add(self, now: float, value: float) -> None:
        q = self._q
        while q and not self._better(q[-1][1], value):
            q.pop()
        q.append((now, value))
        while q[0][0] < now - WINDOW_S:  # never the sample just added
            q.popleft()

    @property
    def best(self) -> float | None:
        return self._q[0][1] if self._q else None


class LinkRate:
    """Fed by the uplink thread; ``status`` is read from the main thread, hence the lock."""

    def __init__(self, max_message_bytes: int, *, adaptive: bool = True, clock: Callable[[], float] = time.monotonic):
        self.max_message = max_message_bytes
        self.adaptive = adaptive
        self._clock = clock
        self._sent: dict[int, tuple[float, int, int]] = {}
        self._rtt = _WindowBest(lt)
        self._rate = _WindowBest(gt)
        self._delivered = 0
        self.inflight_bytes = 0
        self._lock = threading.Lock()

    def reset(self) -> None:
        """A new connection: nothing in flight; the samples of the last one still hold."""
        self._sent.clear()
        self.inflight_bytes = 0

    def sent(self, mid: int, nbytes: int) -> None:
        self._sent[mid] = (self._clock(), nbytes, self._delivered)
        self.inflight_bytes += nbytes

    def acked(self, mid: int) -> None:
        got = self._sent.pop(mid, None)
        if got is None:
            return
        now = self._clock()
        t0, nbytes, delivered_then = got
        self.inflight_bytes -= nbytes
        self._delivered += nbytes
        with self._lock:
            self._rtt.add(now, now - t0)
            if now > t0:
                self._rate.add(now, (self._delivered - delivered_then) / (now - t0))

    @property
    def rtt_s(self) -> float | None:
        with self._lock:
            return self._rtt.best

    @property
    def rate_bps(self) -> float | None:
        """Bytes per second the link has delivered at best recently."""
        with self._lock:
            return self._rate.best

    def inflight_limit(self) -> int:
        if not self.adaptive:
            return 1 << 62
        rtt, rate = self.rtt_s, self.rate_bps
        if rtt is None or rate is None:
            return START_INFLIGHT
        return max(MIN_INFLIGHT, 2 * self.message_bytes(), int(2 * rate * rtt))

    def message_bytes(self) -> int:
        """Target size of the next message (encoded)."""
        if not self.adaptive:
            return self.max_message
        rtt, rate = self.rtt_s, self.rate_bps
        if rtt is None or rate is None:
            return min(self.max_message, START_INFLIGHT // 4)
        # Half the bandwidth-delay product, but at least 100 ms of link time: on a fast link
        # with a tiny round trip, per-message costs (a publish, a PUBACK) must stay amortised.
        return max(MIN_MESSAGE, min(self.max_message, int(rate * max(rtt / 2, MIN_MESSAGE_S))))

    def may_send(self) -> bool:
        return self.inflight_bytes < self.inflight_limit()

    def snapshot(self) -> dict[str, float | int | None]:
        rtt, rate = self.rtt_s, self.rate_bps
        return {"rtt_ms": round(rtt * 1000, 1) if rtt is not None else None,
                "rate_kbit_s": round(rate * 8 / 1000, 1) if rate is not None else None,
                "message_bytes": self.message_bytes(), "inflight_limit_bytes": self.inflight_limit()}
