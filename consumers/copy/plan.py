"""Extent planning: pure functions from changed areas to copy requests (no I/O).

The pipeline of a disk copy is::

    changed areas --normalize--> sorted, clipped, non-overlapping ranges
                  --merge(gap)--> fewer, larger ranges (reading a small gap is cheaper than a
                                  second request; ``copier.merge_gap_bytes``, 32 KiB: measured,
                                  see "the merge gap" in docs/architecture.md)
    each range + source block status --segments--> data and zero runs (zero runs trimmed to
                                  1 MiB boundaries: short ones are folded into data, so a
                                  fragmented map does not become thousands of tiny requests)
    data runs --split(request size)--> requests cut at multiples of the request size, so they
                                  stay aligned with the target's blocks whatever the extents.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from typing import NamedTuple

from cbtstream.extents import Extent


class Segment(NamedTuple):
    """A run of a planned range that is copied as data (``zero`` False) or written as zeroes."""

    start: int
    length: int
    zero: bool

    @property
    def end(self) -> int:
        return self.start + self.length


def normalize(extents: Iterable[Extent], capacity: int) -> list[Extent]:
    """Clip to ``[0, capacity)``, drop empty extents, sort, and join overlapping or touching ones.

    Raises ``ValueError`` for negative starts or lengths (a corrupt changed-area list must not be
    silently "fixed").
    """
    if capacity < 0:
        raise ValueError("capacity must be >= 0")
    clipped: list[Extent] = []
    for e in extents:
        start, length = int(e[0]), int(e[1])
        if start < 0 or length < 0:
            raise ValueError(f"invalid extent ({start}, {length})")
        end = min(start + length, capacity)
        if end > start:
            clipped.append(Extent(start, end - start))
    return merge(clipped, 0)


def merge(extents: Iterable[Extent], gap: int) -> list[Extent]:
    """Sort and join extents whose distance is at most ``gap`` bytes (0 joins touching ones)."""
    if gap < 0:
        raise ValueError("gap must be >= 0")
    out: list[Extent] = []
    cur_start = cur_end = -1
    for start, length in sorted(extents):
        end = start + length
        if cur_end >= 0 and start - cur_end <= gap:
            cur_end = max(cur_end, end)
            continue
        if cur_end >= 0:
            out.append(Extent(cur_start, cur_end - cur_start))
        cur_start, cur_end = start, end
    if cur_end >= 0:
        out.append(Extent(cur_start, cur_end - cur_start))
    return out


def plan_ranges(extents: Iterable[Extent], capacity: int, gap: int) -> list[Extent]:
    """Changed areas to the ranges the copy covers: normalized, then merged with ``gap``."""
    return merge(normalize(extents, capacity), gap)


def split_aligned(start: int, length: int, request: int) -> Iterator[Extent]:
    """Cut ``[start, start+length)`` at every multiple of ``request``."""
    if request <= 0:
        raise ValueError("request size must be > 0")
    end = start + length
    pos = start
    while pos < end:
        nxt = min((pos // request + 1) * request, end)
        yield Extent(pos, nxt - pos)
        pos = nxt


def segments(
    start: int, length: int, status: Iterable[tuple[int, int, bool]], align: int
) -> list[Segment]:
    """Turn block status of ``[start, start+length)`` into data/zero segments.

    ``status`` yields ``(offset, length, is_zero)`` descriptors; they are clipped to the range,
    and any part of the range they do not describe is treated as data (reading is always safe).
    Zero runs are trimmed inwards to multiples of ``align`` (except at the ends of the range):
    the trimmed fringes are copied as data. So every segment boundary is a multiple of ``align``
    or an end of the range, which keeps digest pieces (see ``digest.py``) inside one segment.
    Adjacent segments of the same kind are joined.
    """
    if align <= 0:
        raise ValueError("align must be > 0")
    end = start + length
    joined: list[tuple[int, int, bool]] = []
    for off, n, zero in sorted(status):
        if joined and joined[-1][2] == zero and joined[-1][0] + joined[-1][1] == off:
            prev = joined.pop()
            off, n = prev[0], prev[1] + n
        joined.append((off, n, zero))
    raw: list[Segment] = []
    pos = start
    for off, n, zero in joined:
        s, e = max(off, pos), min(off + n, end)
        if e <= s:
            continue
        if s > pos:
            raw.append(Segment(pos, s - pos, False))
        if zero:
            zs = s if s == start else -(-s // align) * align
            ze = e if e == end else e // align * align
            if ze > zs:
                if zs > s:
                    raw.append(Segment(s, zs - s, False))
                raw.append(Segment(zs, ze - zs, True))
                if e > ze:
                    raw.append(Segment(ze, e - ze, False))
            else:
                raw.append(Segment(s, e - s, False))
        else:
            raw.append(Segment(s, e - s, False))
        pos = e
    if pos < end:
        raw.append(Segment(pos, end - pos, False))
    out: list[Segment] = []
    for seg in raw:
        if out and out[-1].zero == seg.zero and out[-1].end == seg.start:
            prev = out.pop()
            seg = Segment(prev.start, prev.length + seg.length, seg.zero)
        out.append(seg)
    return out


def fingerprint(ranges: Iterable[Extent], capacity: int) -> str:
    """Identity of a plan, stored in checkpoints so a resume never applies to different work."""
    h = hashlib.sha256(f"capacity={capacity};".encode())
    for r in ranges:
        h.update(f"{r.start}+{r.length};".encode())
    return h.hexdigest()
