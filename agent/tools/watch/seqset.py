"""The seq numbers received on one stream, as ranges: duplicates, gaps, late filling."""

from __future__ import annotations

import bisect
from collections.abc import Iterable

SHOWN_RANGES = 8
"""Missing seq ranges listed on a stream's line; the rest are counted."""


class SeqSet:
    """The seq numbers received, as sorted disjoint ranges: membership, gaps and late filling
    in O(log n) and memory proportional to the number of gaps, not of readings."""

    def __init__(self, seqs: Iterable[int] = ()) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        self.count = 0
        for s in seqs:
            self.add(s)

    def __contains__(self, seq: int) -> bool:
        i = bisect.bisect_right(self._starts, seq) - 1
        return i >= 0 and self._ends[i] >= seq

    def __len__(self) -> int:
        return self.count

    def add(self, seq: int) -> bool:
        """Add ``seq``; False if it was already there (a duplicate)."""
        starts, ends = self._starts, self._ends
        i = bisect.bisect_right(starts, seq) - 1
        if i >= 0 and ends[i] >= seq:
            return False
        left = i >= 0 and ends[i] == seq - 1
        right = i + 1 < len(starts) and starts[i + 1] == seq + 1
        if left and right:
            ends[i] = ends[i + 1]
            del starts[i + 1], ends[i + 1]
        elif left:
            ends[i] = seq
        elif right:
            starts[i + 1] = seq
        else:
            starts.insert(i + 1, seq)
            ends.insert(i + 1, seq)
        self.count += 1
        return True

    @property
    def lowest(self) -> int | None:
        return self._starts[0] if self._starts else None

    @property
    def highest(self) -> int | None:
        return self._ends[-1] if self._ends else None

    def ranges(self) -> list[tuple[int, int]]:
        """What was received, as inclusive ranges."""
        return list(zip(self._starts, self._ends))

    def missing(self) -> list[tuple[int, int]]:
        """The holes between the lowest and the highest seq received, as inclusive ranges."""
        return [(e + 1, s - 1) for e, s in zip(self._ends, self._starts[1:])]


def subtract(ranges: list[tuple[int, int]], cuts: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``ranges`` without what ``cuts`` covers (all inclusive)."""
    out = []
    for a, b in ranges:
        pieces = [(a, b)]
        for c, d in cuts:
            rest = []
            for x, y in pieces:
                if d < x or c > y:
                    rest.append((x, y))
                    continue
                if x < c:
                    rest.append((x, c - 1))
                if d < y:
                    rest.append((d + 1, y))
            pieces = rest
        out.extend(pieces)
    return out


def size(ranges: Iterable[tuple[int, int]]) -> int:
    return sum(b - a + 1 for a, b in ranges)


def format_ranges(ranges: list[tuple[int, int]], limit: int = SHOWN_RANGES) -> str:
    """``5, 17-18, 40-99`` (and ``… +3 more`` past ``limit``)."""
    shown = [str(a) if a == b else f"{a}-{b}" for a, b in ranges[:limit]]
    if len(ranges) > limit:
        shown.append(f"... +{len(ranges) - limit} more")
    return ", ".join(shown)
