"""J1939-21 transport protocol, as a listener: multi-packet messages (DM1 with several DTCs, the
VIN) reassembled from the TP.CM / TP.DT frames we overhear.

We never transmit, so a connection-mode (RTS/CTS) session between two other nodes is followed
from both sides' frames, like a broadcast (BAM) one. Timeouts are measured on frame times, never
the wall clock, so a capture replayed at any speed behaves as it did on the bus. Nothing here
raises on bus input: a faulty ECU must not stop the frame loop, so bad frames are only counted.
"""

from __future__ import annotations

from dataclasses import dataclass

from drivers.can.j1939.ids import GLOBAL, TP_CM_PGN, TP_DT_PGN

RTS, CTS, EOMA, BAM, ABORT = 16, 17, 19, 32, 255
MIN_SIZE, MAX_SIZE = 9, 1785  # 8 bytes fit one frame; 255 packets × 7 bytes
T1 = 0.75  # J1939-21 T1: longest gap between DT packets (BAM and CMDT)
T2 = 1.25  # T2/T3: after an RTS or CTS, and after the last packet a CTS asked for
MAX_SESSIONS = 64

Message = tuple[int, int, int, bytes]
"""(PGN of the message, source address, destination address, payload)."""


@dataclass
class TransportCounters:
    """Plain dataclass (no slots) so that ``vars()`` gives the driver's status dict."""

    completed_bam: int = 0
    completed_cmdt: int = 0
    timeouts: int = 0
    missing_packets: int = 0
    aborted: int = 0
    replaced: int = 0
    orphan_packets: int = 0
    bad_announcements: int = 0
    dropped_sessions: int = 0
    bad_frames: int = 0


@dataclass(slots=True)
class _Session:
    bam: bool
    pgn: int
    size: int
    parts: list[bytes | None]
    deadline: float
    filled: int = 0
    window_end: int = 0
    """Last packet number the latest CTS asked for (CMDT): more packets are due before it."""


class TransportReassembler:
    """Open sessions keyed by (sender, destination); destination 0xFF for BAM."""

    def __init__(self, *, max_sessions: int = MAX_SESSIONS):
        self.max_sessions = max_sessions
        self.counters = TransportCounters()
        self._sessions: dict[tuple[int, int], _Session] = {}
        self._soonest = float("inf")  # earliest deadline, so most feeds skip the expiry scan

    def __len__(self) -> int:
        return len(self._sessions)

    def feed(self, ts: float, pgn: int, sa: int, da: int, data: bytes) -> Message | None:
        """One TP.CM or TP.DT frame; the whole message when this frame completes it."""
        if ts > self._soonest:
            self.expire(ts)
        if pgn == TP_DT_PGN:
            return self._packet(ts, (sa, da), data)
        if pgn != TP_CM_PGN or len(data) < 8:
            self.counters.bad_frames += 1
            return None
        control, msg_pgn = data[0], int.from_bytes(data[5:8], "little")
        if control in (BAM, RTS):
            self._announce(ts, (sa, da), control == BAM, data, msg_pgn)
        elif control == CTS:  # receiver → sender: the session is keyed the other way round
            s = self._cmdt((da, sa), msg_pgn)
            if s is not None:
                count, first = data[1], data[2]
                if count and not 1 <= first <= len(s.parts):
                    self.counters.bad_frames += 1
                    return None
                s.window_end = first + count - 1 if count else 0  # count 0: "hold", wait
                self._touch(s, ts + T2)
        elif control == EOMA:
            # Normally the session completed on its last packet and is gone; if it is still
            # open, the receiver got packets that we did not.
            if self._cmdt((da, sa), msg_pgn) is not None:
                del self._sessions[(da, sa)]
                self.counters.missing_packets += 1
        elif control == ABORT:  # either side may abort
            for key in ((sa, da), (da, sa)):
                if self._cmdt(key, msg_pgn) is not None:
                    del self._sessions[key]
                    self.counters.aborted += 1
                    break
        else:
            self.counters.bad_frames += 1
        return None

    def expire(self, ts: float) -> None:
        """Drop sessions silent past their timeout at frame time ``ts`` (also when idle)."""
        dead = [k for k, s in self._sessions.items() if ts > s.deadline]
        for k in dead:
            del self._sessions[k]
        self.counters.timeouts += len(dead)
        self._soonest = min((s.deadline for s in self._sessions.values()), default=float("inf"))

    def _announce(self, ts: float, key: tuple[int, int], bam: bool, data: bytes, pgn: int) -> None:
        size, packets = data[1] | data[2] << 8, data[3]
        if not MIN_SIZE <= size <= MAX_SIZE or packets != -(-size // 7) or (not bam and key[1] == GLOBAL):
            self.counters.bad_announcements += 1
            return
        if self._sessions.pop(key, None) is not None:
            self.counters.replaced += 1
        elif len(self._sessions) >= self.max_sessions:
            del self._sessions[next(iter(self._sessions))]  # oldest announcement
            self.counters.dropped_sessions += 1
        s = self._sessions[key] = _Session(bam, pgn, size, [None] * packets, 0.0)
        self._touch(s, ts + (T1 if bam else T2))

    def _packet(self, ts: float, key: tuple[int, int], data: bytes) -> Message | None:
        if len(data) < 2:
            self.counters.bad_frames += 1
            return None
        s = self._sessions.get(key)
        if s is None:
            self.counters.orphan_packets += 1
            return None
        seq, chunk = data[0], bytes(data[1:8])
        if not 1 <= seq <= len(s.parts) or len(chunk) < min(7, s.size - 7 * (seq - 1)):
            self.counters.bad_frames += 1
            return None
        if s.bam and seq > s.filled + 1:  # BAM cannot be repaired: a gap ends it
            del self._sessions[key]
            self.counters.missing_packets += 1
            return None
        if s.parts[seq - 1] is None:
            s.filled += 1
        s.parts[seq - 1] = chunk  # a retransmission (CMDT) or duplicate overwrites its slot
        if s.filled < len(s.parts):
            self._touch(s, ts + (T1 if s.bam or seq < s.window_end else T2))
            return None
        del self._sessions[key]
        if s.bam:
            self.counters.completed_bam += 1
        else:
            self.counters.completed_cmdt += 1
        return s.pgn, key[0], key[1], b"".join(s.parts)[: s.size]  # type: ignore[arg-type]

    def _cmdt(self, key: tuple[int, int], pgn: int) -> _Session | None:
        s = self._sessions.get(key)
        return s if s is not None and not s.bam and s.pgn == pgn else None

    def _touch(self, s: _Session, deadline: float) -> None:
        s.deadline = deadline
        if deadline < self._soonest:
            self._soonest = deadline
