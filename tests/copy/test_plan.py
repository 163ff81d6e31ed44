"""Pure extent planning (the hash tree definition is tested in test_tree.py)."""

from __future__ import annotations

import itertools

import pytest

from cbtstream.extents import Extent
from consumers.copy.plan import Segment, merge, normalize, plan_ranges, segments, split_aligned

M = 1 << 20


def test_normalize_clips_sorts_and_joins() -> None:
    got = normalize([Extent(50, 10), Extent(0, 10), Extent(5, 10), Extent(95, 20)], 100)
    assert got == [Extent(0, 15), Extent(50, 10), Extent(95, 5)]
    assert normalize([Extent(100, 5), Extent(3, 0)], 100) == []
    with pytest.raises(ValueError):
        normalize([Extent(-1, 5)], 100)


def test_merge_with_gap() -> None:
    ext = [Extent(0, 10), Extent(20, 10), Extent(100, 1)]
    assert merge(ext, 10) == [Extent(0, 30), Extent(100, 1)]
    assert merge(ext, 9) == ext
    assert plan_ranges(ext, 25, 100) == [Extent(0, 25)]


def test_split_aligned_cuts_at_multiples() -> None:
    assert list(split_aligned(3 * M - 5, 2 * M + 10, M)) == [
        Extent(3 * M - 5, 5),
        Extent(3 * M, M),
        Extent(4 * M, M),
        Extent(5 * M, 5),
    ]
    assert list(split_aligned(0, 0, M)) == []


def test_segments_align_zero_runs_and_fill_gaps() -> None:
    # Range [100, 10M+7): data, a zero run not aligned, data; undescribed tail is data.
    status = [(100, 2 * M, False), (2 * M + 100, 5 * M, True), (7 * M + 100, M, False)]
    segs = segments(100, 10 * M + 7 - 100, status, M)
    assert segs == [
        Segment(100, 3 * M - 100, False),
        Segment(3 * M, 4 * M, True),
        Segment(7 * M, 3 * M + 7, False),
    ]
    # A short zero run becomes data; a zero run at the range ends needs no alignment.
    assert segments(0, 3 * M, [(0, 10, True), (10, M, True)], M) == [
        Segment(0, M, True),
        Segment(M, 2 * M, False),
    ]
    assert segments(0, 3 * M, [(M - 10, M, True)], M) == [Segment(0, 3 * M, False)]
    assert segments(5, 100, [(0, 1000, True)], M) == [Segment(5, 100, True)]
    assert segments(0, 4096, [(0, 100, True)], M) == [Segment(0, 4096, False)]
    assert segments(0, 4096, [(0, 4096, True)], M) == [Segment(0, 4096, True)]


def test_segments_cover_range_exactly() -> None:
    status = [(0, 123, False), (123, 3 * M, True), (3 * M + 123, 77, False)]
    segs = segments(0, 3 * M + 200, status, M)
    assert segs[0].start == 0 and segs[-1].end == 3 * M + 200
    assert all(a.end == b.start for a, b in itertools.pairwise(segs))


