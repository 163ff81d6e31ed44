"""Byte-range sets against a bitmap model."""

from __future__ import annotations

import random

import pytest

from consumers.points.coverage import Coverage


def _spans(bits: list[bool], start: int, end: int, want: bool) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for i in range(start, end):
        if bits[i] == want:
            if out and out[-1][1] == i:
                out[-1] = (out[-1][0], i + 1)
            else:
                out.append((i, i + 1))
    return out


@pytest.mark.parametrize("seed", range(20))
def test_against_a_bitmap(seed: int) -> None:
    rnd = random.Random(seed)
    size = 200
    bits = [False] * size
    cov = Coverage()
    for _ in range(30):
        s = rnd.randrange(size)
        e = rnd.randrange(s, size + 1)
        cov.add(s, e)
        for i in range(s, e):
            bits[i] = True
        assert list(cov) == _spans(bits, 0, size, True)  # joined, sorted, disjoint
        qs = rnd.randrange(size)
        qe = rnd.randrange(qs, size + 1)
        assert cov.missing(qs, qe) == _spans(bits, qs, qe, False)
        assert cov.overlap(qs, qe) == _spans(bits, qs, qe, True)
        assert cov.covers(qs, qe) == all(bits[qs:qe])
    assert cov.total == sum(bits)


def test_adjacent_ranges_join() -> None:
    cov = Coverage([(0, 10), (20, 30)])
    cov.add(10, 20)
    assert list(cov) == [(0, 30)]
    assert len(cov) == 1
    cov.add(5, 5)  # empty: nothing
    assert cov == Coverage([(0, 30)])
