"""A target that saves the old bytes of every area before it is overwritten (any target kind).

The copy engine (``consumers/copy/engine.py``) and the full copy's zeroing of what it does not
copy (``consumers/vsphere_executor.py``) write a replica only through its ``BlockTarget``. When
the replica keeps restore points, the copier hands them a :class:`SavingTarget` around the real
one (file, block device or NBD export), so every write and zero, from whichever step, follows
the durability rule of ``consumers/points/undo.py``::

    writer.missing(area) -> read those parts from the replica -> writer.save_many
    -> writer.sync() (data fsync, then index fsync)  -> only then the write itself

Each write of the engine (at most a request, 4 MiB by default; an edge leaf; a zero run) is one
group (a zero run in groups of :data:`ZERO_GROUP`, so memory stays bounded). Reads of old
bytes run concurrently, as the engine's writes do; appends and syncs are serialised (the undo
writer is not thread-safe). **Group commit:** a write appends its old bytes, then waits for a
sync that *started after* its append; one sync (data fsync, index fsync) makes every group
appended before it durable, so the writes in flight share the fsyncs instead of queueing for a
pair each (``python -m cbtctl.bench.pointcost`` measures it). No write reaches the replica
before a sync covering its own old bytes has returned. The engine writes disjoint areas at a time
(an edge unit is read before it is written, and no other item writes into it), so an area's old
bytes are never read while another write of this sync is changing them.

First saved bytes win (``UndoWriter.missing``): a resumed sync, or a full copy that the fence
allows after it, re-reads nothing it saved before, so the point keeps the bytes it had.
"""

from __future__ import annotations

import asyncio

from consumers.copy.targets import BlockTarget
from consumers.points.undo import UndoWriter

#: Old bytes are read from the replica in pieces of at most this size (one buffer per write in
#: flight, and inside every target's request limit).
READ_PIECE = 4 << 20
#: A zero run (a full copy zeroes every gap between allocated areas: gigabytes) is saved and
#: zeroed in groups of this size: at most this much old data in memory per write in flight.
ZERO_GROUP = 16 << 20


class SavingTarget:
    """``BlockTarget`` that saves the old bytes of each area to ``writer`` before writing it."""

    def __init__(self, inner: BlockTarget, writer: UndoWriter) -> None:
        self.inner = inner
        self.writer = writer
        self._lock = asyncio.Lock()
        #: Groups appended so far, and how many of them a finished sync made durable.
        self._appended = 0
        self._durable = 0
        self._syncing: asyncio.Future[None] | None = None
        #: Bytes read from the replica and saved (for the log and the tests).
        self.saved_bytes = 0
        #: Syncs of the undo store (for the benchmark and the tests).
        self.syncs = 0

    @property
    def size(self) -> int:
        return self.inner.size

    @property
    def max_request(self) -> int:
        return self.inner.max_request

    async def _protect(self, offset: int, length: int) -> None:
        """Make the old bytes of ``[offset, offset + length)`` durable in the store."""
        missing = self.writer.missing(offset, length)
        if not missing:
            return
        piece = max(1, min(READ_PIECE, self.inner.max_request))
        items: list[tuple[int, memoryview]] = []
        for ext in missing:
            for start in range(ext.start, ext.end, piece):
                buf = memoryview(bytearray(min(piece, ext.end - start)))
                await self.inner.read_into(start, buf)
                items.append((start, buf))
        async with self._lock:
            added = await asyncio.to_thread(self.writer.save_many, items)
            self._appended += 1
            ticket = self._appended
        self.saved_bytes += added
        while self._durable < ticket:
            if self._syncing is None:
                self._syncing = asyncio.ensure_future(self._sync())
            # shielded: a cancelled write does not cancel the sync the others wait for
            await asyncio.shield(self._syncing)

    async def _sync(self) -> None:
        """One sync of everything appended before it started (see the module docstring)."""
        try:
            async with self._lock:
                covered = self._appended
                await asyncio.to_thread(self.writer.sync)
                self.syncs += 1
            self._durable = max(self._durable, covered)
        finally:
            self._syncing = None

    async def write(self, offset: int, buf: memoryview) -> None:
        await self._protect(offset, len(buf))
        await self.inner.write(offset, buf)

    async def zero(self, offset: int, length: int) -> None:
        end = offset + length
        for start in range(offset, end, ZERO_GROUP):
            n = min(ZERO_GROUP, end - start)
            await self._protect(start, n)
            await self.inner.zero(start, n)

    async def flush(self) -> None:
        await self.inner.flush()

    async def read_into(self, offset: int, buf: memoryview) -> None:
        await self.inner.read_into(offset, buf)
