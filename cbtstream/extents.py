"""Byte ranges of a disk. ``Extent`` is what the vSphere adapter yields (one changed area of
``QueryChangedDiskAreas``) and what the copy engine consumes."""

from __future__ import annotations

from typing import NamedTuple


class Extent(NamedTuple):
    """``length`` bytes starting at byte ``start`` of a disk."""

    start: int
    length: int

    @property
    def end(self) -> int:
        return self.start + self.length
