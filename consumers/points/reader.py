"""Reading a restore point: a range, or the whole disk in leaf-sized chunks.

The reader asks :func:`consumers.points.sources.plan_read` which store serves each part and
reads the replica's own bytes through a callable, so the same reader serves a file, a block
device or an NBD export (the caller opens the target as the copy engine does). Chunks are
aligned to the hash tree's 64 KiB leaves so a later check against the point's root
(``consumers/copy/digest.py``) can hash them as they stream. Read a point under the replica's
lock: a sync running meanwhile would overwrite the replica after the reader planned a read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from consumers.copy.digest import LEAF
from consumers.points.coverage import Coverage
from consumers.points.sources import plan_read
from consumers.points.undo import UndoStore

#: ``read_live(offset, length)``: that many bytes of the live replica.
ReadLive = Callable[[int, int], bytes]


class PointReader:
    """The bytes of one point, from its undo stores (oldest first) and the live replica."""

    def __init__(self, stores: Sequence[UndoStore], read_live: ReadLive, capacity: int) -> None:
        self.stores = list(stores)
        self.read_live = read_live
        self.capacity = capacity
        self._coverages = [s.coverage for s in self.stores]

    def differs(self) -> Coverage:
        """Where the point may differ from the live replica: the bytes some undo store serving
        it holds (everywhere else the point reads the replica itself)."""
        return Coverage(span for cov in self._coverages for span in cov)

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes of the point at ``offset`` (inside the disk)."""
        if offset < 0 or length < 0 or offset + length > self.capacity:
            raise ValueError(f"range {offset}+{length} outside the disk")
        parts = []
        for seg in plan_read(self._coverages, offset, length):
            if seg.source is None:
                data = self.read_live(seg.start, seg.length)
                if len(data) != seg.length:
                    raise ValueError(f"the replica gave {len(data)} bytes at {seg.start}, "
                                     f"not {seg.length}")
            else:
                data = self.stores[seg.source].read(seg.start, seg.length)
            parts.append(data)
        return b"".join(parts)

    def chunks(self, offset: int = 0, length: int | None = None, chunk: int = LEAF
               ) -> Iterator[tuple[int, bytes]]:
        """``(offset, bytes)`` of the range (the whole disk by default) in pieces ending on
        multiples of ``chunk`` (a leaf: 64 KiB), so a tree can hash them as they come."""
        end = self.capacity if length is None else offset + length
        pos = offset
        while pos < end:
            stop = min(end, (pos // chunk + 1) * chunk)
            yield pos, self.read(pos, stop - pos)
            pos = stop

    def close(self) -> None:
        for store in self.stores:
            store.close()
