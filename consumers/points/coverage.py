"""Sets of byte ranges of a disk (pure): what an undo store holds, and what a read still needs.

A :class:`Coverage` is a sorted list of disjoint, non-adjacent half-open ranges
``[start, end)``; adjacent or overlapping additions are joined, so a store written in disk order
stays a handful of ranges however many extents it holds.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator

#: A half-open byte range ``(start, end)``.
Span = tuple[int, int]


class Coverage:
    """A set of byte ranges (see the module docstring)."""

    __slots__ = ("_ends", "_starts")

    def __init__(self, spans: Iterable[Span] = ()) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        for start, end in spans:
            self.add(start, end)

    def __iter__(self) -> Iterator[Span]:
        return zip(self._starts, self._ends, strict=True)

    def __len__(self) -> int:
        return len(self._starts)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Coverage) and list(self) == list(other)

    def __hash__(self) -> int:  # mutable: not hashable by value
        raise TypeError("Coverage is mutable")

    @property
    def total(self) -> int:
        """Bytes covered."""
        return sum(e - s for s, e in self)

    def add(self, start: int, end: int) -> None:
        """Cover ``[start, end)`` (joined with the ranges it overlaps or touches)."""
        if end <= start:
            return
        # ranges that end at or after start and begin at or before end touch the new one
        lo = bisect_left(self._ends, start)
        hi = bisect_right(self._starts, end)
        if lo < hi:
            start = min(start, self._starts[lo])
            end = max(end, self._ends[hi - 1])
        self._starts[lo:hi] = [start]
        self._ends[lo:hi] = [end]

    def missing(self, start: int, end: int) -> list[Span]:
        """The parts of ``[start, end)`` not covered, in order."""
        out: list[Span] = []
        i = bisect_right(self._ends, start)
        pos = start
        while pos < end and i < len(self._starts) and self._starts[i] < end:
            if self._starts[i] > pos:
                out.append((pos, self._starts[i]))
            pos = max(pos, self._ends[i])
            i += 1
        if pos < end:
            out.append((pos, end))
        return out

    def overlap(self, start: int, end: int) -> list[Span]:
        """The parts of ``[start, end)`` covered, in order."""
        out: list[Span] = []
        i = bisect_right(self._ends, start)
        while i < len(self._starts) and self._starts[i] < end:
            s, e = max(start, self._starts[i]), min(end, self._ends[i])
            if s < e:
                out.append((s, e))
            i += 1
        return out

    def covers(self, start: int, end: int) -> bool:
        """Is all of ``[start, end)`` covered?"""
        return not self.missing(start, end)
