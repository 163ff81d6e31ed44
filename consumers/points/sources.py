"""Which source serves each byte of a restore point (pure).

Point ``k`` of a disk is read, byte by byte, from the *oldest* undo store at or after it that
covers the byte, else from the live replica. Why that is the point's byte: the store of point
``i`` holds the bytes of point ``i`` that the sync after it overwrote. If the stores of points
``k .. i-1`` do not cover a byte, no sync from ``k`` to ``i`` overwrote it, so point ``k``'s byte
equals point ``i``'s, which store ``i`` holds; if no store covers it, no sync since ``k`` wrote
it and the replica still holds it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from consumers.points.coverage import Coverage


class Segment(NamedTuple):
    """``length`` bytes at ``start`` served by store ``source`` (its index in the stores given
    to :func:`plan_read`), or by the live replica when ``source`` is None."""

    start: int
    length: int
    source: int | None


def plan_read(coverages: Sequence[Coverage], start: int, length: int) -> list[Segment]:
    """The segments of ``[start, start + length)`` in disk order, for the stores of points
    ``k, k+1, ...`` (oldest first) whose coverages are ``coverages``."""
    todo = [(start, start + length)] if length > 0 else []
    found: list[Segment] = []
    for i, coverage in enumerate(coverages):
        if not todo:
            break
        rest: list[tuple[int, int]] = []
        for s, e in todo:
            found.extend(Segment(a, b - a, i) for a, b in coverage.overlap(s, e))
            rest.extend(coverage.missing(s, e))
        todo = rest
    found.extend(Segment(s, e - s, None) for s, e in todo)
    found.sort()
    return found
