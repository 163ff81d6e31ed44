"""The block copy engine: the changed extents of one disk from a source to a durable target.

Order of a disk copy (each step only after the previous one succeeded)::

    plan (merge, clip) -> before any write: find the pieces the ranges cover in part whose leaf
    entries do not fold to the base's piece ("coarse"), and let the tree's store journal the
    entries of every touched piece (``prepare_tree``) -> cut into runs of whole units and "edge
    units" (units the ranges cover only in part; a unit is a 64 KiB leaf, or a whole coarse
    piece) -> [resume: skip what the checkpoint says is durable]
    -> whole units: block status -> data runs read+written, zero runs written as zeroes
       edge unit: read the old unit from the target -> prove the bytes the sync keeps against
       the base tree -> read+write the changed bytes into it (unproven: copy the whole unit
       from the source) -> hash the new unit's leaves
       (pipelined: ``max_in_flight`` requests, one buffer each, so memory is bounded)
       -> every few hundred MiB: flush target -> save checkpoint
    -> flush target -> refold the touched pieces -> [verify: re-read every touched leaf,
    compare] -> return CopyResult

Every touched leaf of the replica hash tree (``digest.py``) is rehashed as its bytes are written
(on the event loop thread, while earlier writes run: ``_Run._worker`` says why) and its entry
written to the tree's leaf store;
untouched leaves keep the entry they had in the ``tree`` passed in, i.e. the replica's tree at
the sync's base, and each touched piece is folded again from its leaves at the end.

What a sync costs: the changed areas are CBT blocks (64 KiB and up, aligned), so they cover the
64 KiB leaves whole; only an area that starts or ends inside a leaf (the guest's write was
smaller, or a merged gap) makes an edge leaf, which costs a 64 KiB read from the target (with
1 MiB leaves nearly every scattered 64 KiB change cost a 1 MiB target read and hash: an
incremental of 1% of a disk took 11-15% of a full copy's time). Every source read goes through
``_Run._read`` and is counted (``CopyResult.bytes_read``), against the bytes of the changed
areas (``bytes_changed``): their ratio is the read amplification the merge gap trades for fewer
requests (``CopyOptions.merge_gap_bytes``).

Edge leaves (issue 24: "a corrupt replica can be certified as good"). An edge leaf is hashed
whole, so the bytes the sync keeps from the replica go into the new tree, the commit's
``replica_digest`` and every later ``cbtstream verify``, which compares the replica with that
digest: a corrupt byte hashed here would be certified as good for ever. So before the sync
writes into an edge leaf it reads the old leaf from the target (the one target read such a leaf
always cost; the new hash is computed from that buffer with the changed bytes laid over it, not
read back again) and proves the kept bytes with the base tree (``digest.holds_base``). The
normal case reads no source byte more than before. Unproven, the leaf is read whole from the
source, the snapshot (the one witness of what the kept bytes must be: CBT never misses a change,
so they are unchanged since the base), and written whole:

* the kept bytes differ from the snapshot's: the replica was corrupt there. The leaf is counted
  in ``CopyResult.repaired`` and a warning names the disk and the leaf;
* they equal them: only bytes this sync rewrites differed (a write of an interrupted run of the
  same lineage: a resumed sync, or a dirty replica admitted for repair). Counted in
  ``recopied`` only, one INFO line per sync: no alarm for what a restart always leaves behind.

A *coarse* piece is one whose leaf entries the store cannot vouch for (they do not fold to the
base's piece: the leaf file was lost or damaged; an interrupted sync's rewrites are put back by
its journal before this point, ``leaves.py``). Such a piece is proven as one unit the same way,
its leaves hashed and folded against the base's piece entry, so a lost leaf file costs target
reads, never a wrong tree.

An edge unit a checkpoint covers was proven by the run that wrote it, and is rehashed as found.
Where the base tree has a zero leaf (a hole; and every leaf of a full copy, which starts from the
all-zero tree after its caller zeroed what it does not copy) the kept bytes must be zero: checked
as such, without a hash, so the old bytes the sync overwrites cost no source read either.

What the outcome says (the copier, ``consumers/vsphere_executor.py``): the commit stays
``incremental`` (the lineage is intact: the plan's changed areas were applied onto its base)
with ``reason=replica_mismatch`` when a leaf was repaired. That is the word ``cbtstream verify``
uses for "the replica differed from its record", already carried by the audit tables, ``status``,
the replay and ``cbtstream_syncs_total{reason}``, so an operator finds every finding of
corruption under one reason, and the type tells them apart: ``full``, verify found it and the
whole disk was copied; ``incremental``, the sync found it in leaves it rewrote in part and copied
those from the snapshot. No ``ReplicaMismatch`` is published: that event is verify's verdict on a
whole replica and marks its record for a full copy, while this difference is repaired in the very
commit that reports it; the leaves the sync did not touch are as proven as after any incremental
(verify and the patrol cover them, as the warning says). A new reason would be refused by older
workers (their commit would be dead-lettered), and the event has no field for the count: it is
in the log lines and in :class:`CopyResult`.

The caller commits the change ID only after ``copy_disk`` returned, then calls
``checkpoint.done()``. Any failure raises :class:`CopyFailed` (with the reason and retryability
of the underlying error); a partial copy is never returned as a result.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterable, Container, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NamedTuple

from cbtstream.config import CopierSettings
from cbtstream.errors import CbtStreamError
from cbtstream.extents import Extent
from consumers.copy import digest as dg
from consumers.copy.buffers import pool_for
from consumers.copy.checkpoint import Checkpoint, CheckpointState
from consumers.copy.leaves import FileLeaves
from consumers.copy.plan import (
    Segment,
    fingerprint,
    normalize,
    plan_ranges,
    segments,
    split_aligned,
)
from consumers.copy.progress import CopyProgress, ProgressCallback
from consumers.copy.sources import BlockSource
from consumers.copy.targets import BlockTarget
from consumers.copy.throttle import Throttle

#: Block status is asked for this much of a range at a time (bounds the status list in memory).
_STATUS_WINDOW = 1 << 30

log = logging.getLogger("cbtstream.copier.copy")


class CopyFailed(CbtStreamError):
    """A disk copy did not complete; nothing of it may be committed."""

    reason = "copy_failed"


class VerifyFailed(CopyFailed):
    """The target read back does not match what was written."""

    reason = "verify_mismatch"


@dataclass(frozen=True, slots=True)
class CopyOptions:
    """Tuning of one disk copy. Sizes are rounded to multiples of 1 MiB (the digest piece)."""

    disk_key: str = ""
    request_bytes: int = 4 * 1024 * 1024
    merge_gap_bytes: int = 32 * 1024  # copier.merge_gap_bytes: why 32 KiB
    max_in_flight: int = 8
    use_block_status: bool = True
    verify: bool = False
    progress_interval_s: float = 2.0
    checkpoint_interval_bytes: int = 256 * 1024 * 1024
    checkpoint_interval_s: float = 10.0
    #: Threads hashing edge units and items a checkpoint covers (data items are hashed on the
    #: event loop thread: ``_Run._worker`` says why).
    hash_threads: int = 2
    #: Average read rate limit of this disk copy in bytes/s (0: unlimited).
    max_bytes_per_s: int = 0
    #: Bytes of read buffers all copies of the process share (``consumers.copy.buffers``).
    buffer_bytes: int = 256 * 1024 * 1024

    @classmethod
    def from_settings(cls, copier: CopierSettings, **overrides: object) -> CopyOptions:
        base: dict[str, object] = {
            "request_bytes": copier.request_bytes,
            "merge_gap_bytes": copier.merge_gap_bytes,
            "max_in_flight": copier.max_in_flight,
            "progress_interval_s": copier.progress_interval_s,
            "max_bytes_per_s": copier.max_bytes_per_s,
            "buffer_bytes": copier.buffer_bytes,
        }
        base.update(overrides)
        return cls(**base)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class CopyResult:
    """What a successful copy did. ``digest`` (this sync's leaves) and ``replica_digest`` (the
    whole replica's tree root) are defined in :mod:`consumers.copy.digest`."""

    bytes_copied: int
    bytes_zeroed: int
    extents: int
    digest: str
    duration_s: float
    replica_digest: str = ""
    tree: dg.HashTree | None = field(default=None, repr=False)
    #: Disk offset up to which a checkpoint let this run skip work (0: started from scratch).
    resumed_from: int = 0
    verified: bool = False
    ranges: tuple[Extent, ...] = field(default=(), repr=False)
    #: Edge leaves whose kept bytes differed from the snapshot: the replica was corrupt there;
    #: copied whole from the source (see "Edge leaves" above).
    repaired: tuple[int, ...] = ()
    #: Every edge leaf copied whole from the source because the base tree did not prove it
    #: (``repaired`` and those that differed only in bytes this sync rewrote).
    recopied: tuple[int, ...] = ()
    #: Bytes read from the source (data, gaps merged into a read, units copied whole).
    bytes_read: int = 0
    #: Bytes in the changed areas asked for (clipped, overlaps joined): the denominator of the
    #: read amplification ``bytes_read / bytes_changed``.
    bytes_changed: int = 0

    @property
    def leaves_repaired(self) -> int:
        return len(self.repaired)


class Edge(NamedTuple):
    """A unit (a leaf, or a whole piece whose leaf entries are not known: ``coarse``) that the
    planned ranges cover only in part, and the parts they cover (sorted)."""

    span: Extent
    touched: tuple[Extent, ...]
    coarse: bool = False


class EdgeUnit(NamedTuple):
    """Work item: an edge unit with the segments of it the sync writes (in order)."""

    span: Extent
    segs: tuple[Segment, ...]
    coarse: bool

    @property
    def end(self) -> int:
        return self.segs[-1].end

    @property
    def length(self) -> int:
        return sum(s.length for s in self.segs)


def _unit(pos: int, capacity: int, coarse: Container[int]) -> Extent:
    size = dg.PIECE if pos // dg.PIECE in coarse else dg.LEAF
    start = pos // size * size
    return Extent(start, min(size, capacity - start))


def cut_edges(ranges: Iterable[Extent], capacity: int, coarse: Container[int] = frozenset()
              ) -> list[Extent | Edge]:
    """Cut planned ranges (sorted, disjoint, not touching) into runs of whole units and edge
    units, in disk order. A unit is a leaf, or the whole piece for the pieces in ``coarse``. A
    unit shared by the end of one range and the start of the next is one :class:`Edge`. Pure."""
    out: list[Extent | Edge] = []
    edge: Extent | None = None
    touched: list[Extent] = []

    def close_edge() -> None:
        nonlocal edge, touched
        if edge is not None:
            out.append(Edge(edge, tuple(touched), edge.start // dg.PIECE in coarse))
        edge, touched = None, []

    for r in ranges:
        pos = r.start
        while pos < r.end:
            u = _unit(pos, capacity, coarse)
            if pos != u.start or r.end < u.end:
                end = min(r.end, u.end)
                if u != edge:
                    close_edge()
                    edge = u
                touched.append(Extent(pos, end - pos))
                pos = end
                continue
            # whole units from here to the last unit boundary at or below the range's end
            stop = r.end if r.end >= capacity else _unit(r.end, capacity, coarse).start
            stop = max(stop, u.end)
            close_edge()
            out.append(Extent(pos, stop - pos))
            pos = stop
    close_edge()
    return out


async def _collect(extents: Iterable[Extent] | AsyncIterable[Extent]) -> list[Extent]:
    if isinstance(extents, AsyncIterable):
        return [Extent(int(e[0]), int(e[1])) async for e in extents]
    return [Extent(int(e[0]), int(e[1])) for e in extents]


def _round_piece(n: int) -> int:
    return max(dg.PIECE, n // dg.PIECE * dg.PIECE)


class _Run:
    """State of one ``copy_disk`` call."""

    def __init__(
        self,
        source: BlockSource,
        target: BlockTarget,
        ranges: list[Extent],
        options: CopyOptions,
        checkpoint: Checkpoint | None,
        plan_id: str,
        resume: CheckpointState | None,
        on_progress: ProgressCallback | None,
        capacity: int,
        tree: dg.HashTree,
        coarse: frozenset[int],
    ) -> None:
        self.source, self.target, self.ranges, self.o = source, target, ranges, options
        self.tree = tree
        self.units = cut_edges(ranges, capacity, coarse)
        self.edge_size = dg.PIECE if coarse else dg.LEAF
        self.repaired: list[int] = []
        self.recopied: list[int] = []
        self.bytes_read = 0
        self.checkpoint, self.plan_id, self.on_progress = checkpoint, plan_id, on_progress
        limit = min(source.max_request, target.max_request)
        self.request = min(_round_piece(options.request_bytes), _round_piece(limit))
        self.resume_until = resume.durable_until if resume else 0
        self.copied = resume.bytes_copied if resume else 0
        self.zeroed = resume.bytes_zeroed if resume else 0
        self.total = sum(r.length for r in ranges)
        self.done_bytes = 0
        # In-order completion tracking for checkpoints.
        self._ends: dict[int, tuple[int, int, int]] = {}  # seq -> (end, copied, zeroed)
        self._next = 0
        self.watermark = self.resume_until
        self._prefix_copied, self._prefix_zeroed = self.copied, self.zeroed
        self._saved_at, self._saved_time = self.watermark, time.monotonic()
        self._saving: asyncio.Task[None] | None = None
        self._last_progress = 0.0
        self._pool = ThreadPoolExecutor(max(1, options.hash_threads), "cbt-hash")
        self.buffers = pool_for(options.buffer_bytes)
        self.capacity = capacity
        self._cache: list[tuple[int, int, bool]] = []
        self._cache_ends: list[int] = []
        self._cache_start = self._cache_end = 0
        self.throttle = Throttle(options.max_bytes_per_s)

    # -- work items ----------------------------------------------------------------------------
    async def _zero_map(self, pos: int, end: int) -> list[tuple[int, int, bool]]:
        """Source zero map from ``pos``, answered from a cache when possible.

        One block status query asks for a whole window (not just this range): servers such as
        nbdkit's file plugin pay about the same per query whatever its length, and incremental
        plans have many small ranges, so one query serves many ranges.
        """
        if not (self._cache_start <= pos < self._cache_end):
            want = min(self.capacity, max(end, pos + _STATUS_WINDOW)) - pos
            status = await self.source.zero_map(pos, want)
            nxt = max((s + n for s, n, _ in status), default=pos)
            if nxt <= pos:
                raise CopyFailed(f"source block status made no progress at offset {pos}")
            self._cache, self._cache_start, self._cache_end = status, pos, nxt
            self._cache_ends = list(itertools.accumulate((s + n for s, n, _ in status), max))
        # the descriptors overlapping [pos, end): found by bisection, not a scan, since an
        # incremental asks once per range and a window can hold thousands of descriptors
        out = []
        for d in itertools.islice(self._cache, bisect.bisect_right(self._cache_ends, pos), None):
            if d[0] >= end:
                break
            out.append(d)
        return out

    async def _status(self, pos: int, end: int) -> tuple[list[tuple[int, int, bool]], int]:
        """Zero map of ``[pos, x)``, where x is ``end`` or a leaf-aligned offset > pos."""
        want = min(end, pos + _STATUS_WINDOW)
        if not self.o.use_block_status:
            return [], want
        out: list[tuple[int, int, bool]] = []
        cur = pos
        while cur < want:
            status = await self._zero_map(cur, want)
            out.extend(status)
            cur = min(max(s + n for s, n, _ in status), want)
        if cur < end:
            cur = cur // dg.LEAF * dg.LEAF
        return out, cur

    async def items(self) -> AsyncIterable[Segment | EdgeUnit]:
        """Work items in disk order. Runs of whole units become data and zero segments whose
        boundaries are leaf boundaries (zero runs trimmed to whole pieces, so a fragmented map
        does not become thousands of tiny requests), each hashed as it is written."""
        for unit in self.units:
            if isinstance(unit, Edge):
                segs: list[Segment] = []
                for t in unit.touched:
                    pos = t.start
                    while pos < t.end:
                        status, nxt = await self._status(pos, t.end)
                        segs.extend(segments(pos, nxt - pos, status, dg.LEAF))
                        pos = nxt
                yield EdgeUnit(unit.span, tuple(segs), unit.coarse)
                continue
            pos = unit.start
            while pos < unit.end:
                status, nxt = await self._status(pos, unit.end)
                for seg in segments(pos, nxt - pos, status, dg.PIECE):
                    if seg.zero:
                        yield seg
                    else:
                        for s, n in split_aligned(seg.start, seg.length, self.request):
                            yield Segment(s, n, False)
                pos = nxt

    # -- execution -----------------------------------------------------------------------------
    async def execute(self) -> None:
        queue: asyncio.Queue[tuple[int, Segment | EdgeUnit] | None] = asyncio.Queue(
            self.o.max_in_flight)
        workers = max(1, self.o.max_in_flight)
        try:
            async with asyncio.TaskGroup() as tg:
                for _ in range(workers):
                    tg.create_task(self._worker(queue))
                seq = 0
                async for seg in self.items():
                    await queue.put((seq, seg))
                    seq += 1
                for _ in range(workers):
                    await queue.put(None)
            if self._saving is not None:
                await self._saving
        finally:
            if self._saving is not None and not self._saving.done():
                self._saving.cancel()
                with contextlib.suppress(BaseException):
                    await self._saving

    async def _read(self, offset: int, buf: memoryview) -> None:
        """Read from the source (every source byte a sync reads goes through here)."""
        await self.throttle.acquire(len(buf))
        self.bytes_read += len(buf)
        await self.source.read_into(offset, buf)

    async def _worker(self, queue: asyncio.Queue[tuple[int, Segment | EdgeUnit] | None]
                      ) -> None:
        unit: memoryview | None = None
        while (job := await queue.get()) is not None:
            seq, item = job
            copied = zeroed = 0
            cap = self.capacity
            if isinstance(item, EdgeUnit):
                if unit is None:
                    unit = memoryview(bytearray(self.edge_size))
                records, copied, zeroed = await self._edge(item, unit)
                self._complete(seq, item, records, copied, zeroed)
                continue
            seg = item
            if seg.zero:
                if seg.end > self.resume_until:
                    await self.target.zero(seg.start, seg.length)
                    zeroed = seg.length
                records = dg.zero_run(seg.start, seg.length, cap)
                self._complete(seq, seg, records, copied, zeroed)
                continue
            # a buffer of the process's pool, back to it once the request completed (lost if
            # it failed or was cancelled: an I/O may still be using it)
            buf = await self.buffers.take(seg.length)
            done = False
            try:
                view = buf[: seg.length]
                if seg.end <= self.resume_until:
                    records = await self._rehash(seg, view)
                else:
                    await self._read(seg.start, view)
                    # Hashed here, on the event loop thread, not in a pool overlapping the
                    # write: blake3 releases the GIL per call, i.e. per 64 KiB leaf, so a
                    # hashing thread takes the GIL back 16 times per MiB, each time against this
                    # thread receiving the next replies, and that hand-off cost more CPU than
                    # the hash itself (issue 24, in the closing note). The hash is about 0.4 CPU
                    # s per GiB: this blocks the loop about 1 ms per 2 MiB while earlier writes
                    # run in the writer thread.
                    records = dg.hash_run(seg.start, view, cap)
                    await self.target.write(seg.start, view)
                    copied = seg.length
                done = True
            finally:
                (self.buffers.give if done else self.buffers.lose)(buf)
            self._complete(seq, seg, records, copied, zeroed)

    async def _rehash(self, seg: Segment, view: memoryview) -> tuple[int, bytes]:
        """Leaf entries of a data item a previous run made durable (read back from the target
        into ``view``, its length)."""
        await self.target.read_into(seg.start, view)
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, dg.hash_run, seg.start, view, self.capacity
        )

    async def _edge(self, edge: EdgeUnit, buf: memoryview) -> tuple[tuple[int, bytes], int, int]:
        """One edge unit (see "Edge leaves" above): (its new entries, bytes copied, zeroed).

        The old unit is read before anything of this sync is written into it (no other item
        writes into an edge unit), its kept bytes proven, and the changed bytes read from the
        source straight into that buffer, so the buffer then is the new unit."""
        loop = asyncio.get_running_loop()
        span = edge.span
        first = span.start // dg.LEAF
        unit = buf[: span.length]
        await self.target.read_into(span.start, unit)
        if edge.end <= self.resume_until:
            # Written (after being proven) by the run whose checkpoint covers it.
            return (first, await loop.run_in_executor(self._pool, dg.unit_entries, unit)), 0, 0
        keep = dg.untouched(span, (Extent(s.start, s.length) for s in edge.segs))
        base = (self.tree.piece(span.start // dg.PIECE) if edge.coarse
                else self.tree.leaf(first))
        if not await loop.run_in_executor(self._pool, dg.holds_base, unit, base, keep,
                                          edge.coarse):
            return await self._recopy(edge, unit, keep), span.length, 0
        copied = zeroed = 0
        for seg in edge.segs:
            rel = seg.start - span.start
            piece = unit[rel : rel + seg.length]
            if seg.zero:
                piece[:] = bytes(seg.length)
                await self.target.zero(seg.start, seg.length)
                zeroed += seg.length
            else:
                await self._read(seg.start, piece)
                await self.target.write(seg.start, piece)
                copied += seg.length
        return (first, await loop.run_in_executor(self._pool, dg.unit_entries, unit)), copied, \
            zeroed

    async def _recopy(self, edge: EdgeUnit, old: memoryview, keep: list[tuple[int, int]]
                      ) -> tuple[int, bytes]:
        """An edge unit the base tree does not prove: copy it whole from the source, and tell
        a corrupt replica (kept bytes differ from the snapshot) from an interrupted write."""
        loop = asyncio.get_running_loop()
        span = edge.span
        new = memoryview(bytearray(span.length))
        await self._read(span.start, new)
        leaves = range(span.start // dg.LEAF, (span.end - 1) // dg.LEAF + 1)
        bad = [i for i in leaves if not await loop.run_in_executor(
            self._pool, dg.same_runs, old, new, _within(keep, i * dg.LEAF - span.start))]
        await self.target.write(span.start, new)
        self.recopied.extend(leaves)
        disk = self.o.disk_key or "disk"
        what = (f"piece {span.start // dg.PIECE} (its leaf entries were not known)"
                if edge.coarse else f"leaf {leaves.start}")
        where = {"leaf": leaves.start, "leaf_offset": span.start, "leaf_length": span.length}
        if not bad:
            log.debug(f"{disk}: {what} (bytes {span.start}+{span.length}) differed from the "
                      "replica's tree only in bytes this sync rewrites: copied whole from the "
                      "snapshot", extra=where)
        else:
            self.repaired.extend(bad)
            where["leaf"] = bad[0]
            log.warning(f"{disk}: replica corrupt in {what} (bytes {span.start}+"
                        f"{span.length}): bytes this sync keeps differ from the snapshot; "
                        "repaired from the snapshot. Leaves the sync does not touch are not "
                        "checked: run cbtstream verify", extra=where)
        return span.start // dg.LEAF, await loop.run_in_executor(self._pool, dg.unit_entries,
                                                                 new)

    def _complete(
        self, seq: int, seg: Segment | EdgeUnit, records: tuple[int, bytes], copied: int,
        zeroed: int,
    ) -> None:
        first, entries = records
        if entries:
            self.tree.set_leaves(first, entries)
        self.copied += copied
        self.zeroed += zeroed
        self.done_bytes += seg.length
        self._ends[seq] = (seg.end, copied, zeroed)
        while self._next in self._ends:
            end, c, z = self._ends.pop(self._next)
            self.watermark = max(self.watermark, end)
            self._prefix_copied += c
            self._prefix_zeroed += z
            self._next += 1
        self._maybe_checkpoint()
        self.report()

    def _maybe_checkpoint(self) -> None:
        if self.checkpoint is None or (self._saving is not None and not self._saving.done()):
            return
        if self._saving is not None and self._saving.exception() is not None:
            raise self._saving.exception()  # type: ignore[misc]
        due_bytes = self.watermark - self._saved_at >= self.o.checkpoint_interval_bytes
        due_time = time.monotonic() - self._saved_time >= self.o.checkpoint_interval_s
        if self.watermark > self._saved_at and (due_bytes or due_time):
            state = CheckpointState(
                self.plan_id, self.watermark, self._prefix_copied, self._prefix_zeroed
            )
            self._saved_at, self._saved_time = self.watermark, time.monotonic()
            self._saving = asyncio.get_running_loop().create_task(self._save(state))

    async def _save(self, state: CheckpointState) -> None:
        """Flush first, then record: the checkpoint never claims more than is durable."""
        assert self.checkpoint is not None
        await self.target.flush()
        await asyncio.to_thread(self.checkpoint.save, state)

    def close(self) -> None:
        """Release the hashing threads (after the last hash of the run)."""
        self._pool.shutdown(wait=True)

    def progress(self, final: bool = False) -> CopyProgress:
        return CopyProgress(self.o.disk_key, self.done_bytes, self.total, final)

    def report(self, final: bool = False) -> None:
        if self.on_progress is None:
            return
        now = time.monotonic()
        if final or now - self._last_progress >= self.o.progress_interval_s:
            self._last_progress = now
            self.on_progress(self.progress(final))


def _within(keep: list[tuple[int, int]], rel: int) -> list[tuple[int, int]]:
    """The runs of ``keep`` inside the leaf at ``rel`` (offsets relative to the unit)."""
    end = rel + dg.LEAF
    return [(max(a, rel), min(b, end)) for a, b in keep if a < end and b > rel]


def _failure(exc: BaseException, disk_key: str) -> CopyFailed:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    if isinstance(exc, CopyFailed):
        return exc
    failed = CopyFailed(f"copy of {disk_key or 'disk'} failed: {exc}")
    if isinstance(exc, CbtStreamError):
        failed.reason = exc.reason
        failed.retriable = exc.retriable
    failed.__cause__ = exc
    return failed


def prepare_tree(tree: dg.HashTree, ranges: list[Extent]) -> frozenset[int]:
    """Before the first write: the pieces the ranges cover in part whose stored leaf entries do
    not fold to the base's piece (proven whole by the engine: "coarse"), and the old entries of
    every leaf the sync rewrites handed to the store to keep (``LeafStore.protect``: a file
    store journals them). One read of the entries of the touched pieces serves both, in
    batches, so memory stays bounded whatever the sync's size. Blocking I/O."""
    store = tree.store()
    partial = set(dg.partial_pieces(ranges, tree.capacity))
    coarse: set[int] = set()
    leaf_runs = list(dg.touched_units(ranges))
    total = tree.leaf_count

    def old_entries() -> Iterator[tuple[int, bytes]]:
        k = 0  # the first leaf run not yet wholly handed on
        for j0, n in dg.touched_units(ranges, dg.PIECE):
            for b0 in range(j0, j0 + n, _PREPARE_PIECES):
                b1 = min(j0 + n, b0 + _PREPARE_PIECES)
                lo, hi = b0 * dg.FANOUT, min(total, b1 * dg.FANOUT)
                raw = store.read(lo, hi - lo)
                for j in range(b0, b1):
                    if j in partial:
                        a = (j * dg.FANOUT - lo) * dg.HASH
                        if dg.fold(raw[a : a + dg.FANOUT * dg.HASH]) != tree.piece(j):
                            coarse.add(j)
                while k < len(leaf_runs) and leaf_runs[k][0] < hi:
                    first, count = leaf_runs[k]
                    a, b = max(first, lo), min(first + count, hi)
                    yield a, raw[(a - lo) * dg.HASH : (b - lo) * dg.HASH]
                    if first + count > hi:
                        break
                    k += 1

    store.protect(old_entries())
    return frozenset(coarse)


async def copy_disk(
    source: BlockSource,
    target: BlockTarget,
    extents: Iterable[Extent] | AsyncIterable[Extent],
    *,
    capacity: int,
    options: CopyOptions,
    checkpoint: Checkpoint | None = None,
    on_progress: ProgressCallback | None = None,
    tree: dg.HashTree | None = None,
) -> CopyResult:
    """Copy the changed ``extents`` of one disk of ``capacity`` bytes; flush; return what was done.

    Extents outside ``[0, capacity)`` are clipped. With a ``checkpoint`` an interrupted copy of
    the same plan resumes after the last durable offset. ``tree`` is the replica's hash tree at
    the sync's base with its leaf store (default: an all-zero disk, leaves in a temporary file);
    it is updated in place for every touched leaf and piece and returned in the result. The
    bytes a unit covered only in part keeps from the target are proven against it first, and
    repaired from the source if they are not what it says (see "Edge leaves" above). Raises
    :class:`CopyFailed`.
    """
    t0 = time.monotonic()
    input_extents = await _collect(extents)
    ranges = plan_ranges(input_extents, capacity, options.merge_gap_bytes)
    changed = sum(e.length for e in normalize(input_extents, capacity))
    if source.size < capacity:
        raise CopyFailed(f"source has {source.size} bytes, the disk {capacity}")
    if target.size < capacity:
        raise CopyFailed(f"target has {target.size} bytes, the disk {capacity}")
    plan_id = fingerprint(ranges, capacity)
    resume = checkpoint.load(plan_id) if checkpoint is not None else None
    if tree is None:
        tree = dg.HashTree.zeros(capacity, await asyncio.to_thread(FileLeaves.temporary,
                                                                   capacity))
    elif tree.capacity != capacity:
        raise CopyFailed(f"replica tree is for {tree.capacity} bytes, the disk {capacity}")
    try:
        pieces = list(dg.touched_units(ranges, dg.PIECE))
        small = sum(n for _, n in pieces) <= _INLINE_PIECES
        coarse = (prepare_tree(tree, ranges) if small
                  else await asyncio.to_thread(prepare_tree, tree, ranges))
        run = _Run(source, target, ranges, options, checkpoint, plan_id, resume, on_progress,
                   capacity, tree, coarse)
        try:
            await run.execute()
        finally:
            run.close()
        await target.flush()
        if small:
            tree.refold(pieces)
            digest = tree.touched_digest(ranges)
        else:
            await asyncio.to_thread(tree.refold, pieces)
            digest = await asyncio.to_thread(tree.touched_digest, ranges)
        verified = False
        if options.verify:
            await verify_leaves(target, tree, ranges, options.disk_key)
            verified = True
    except asyncio.CancelledError:
        raise
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
        raise _failure(exc, options.disk_key) from exc
    run.report(final=True)
    if len(run.recopied) > len(run.repaired):
        log.info(f"{options.disk_key or 'disk'}: {len(run.recopied) - len(run.repaired)} leaves "
                 "this sync writes in part differed from the replica's tree only in bytes it "
                 "rewrites (an interrupted earlier write): copied whole from the snapshot",
                 extra={"leaves_recopied": len(run.recopied) - len(run.repaired)})
    return CopyResult(
        bytes_copied=run.copied,
        bytes_zeroed=run.zeroed,
        extents=len(input_extents),
        digest=digest,
        duration_s=time.monotonic() - t0,
        replica_digest=tree.root(),
        tree=tree,
        resumed_from=run.resume_until,
        verified=verified,
        ranges=tuple(ranges),
        repaired=tuple(sorted(run.repaired)),
        recopied=tuple(sorted(run.recopied)),
        bytes_read=run.bytes_read,
        bytes_changed=changed,
    )


#: A sync touching at most this many pieces prepares and folds its tree on the event loop
#: thread (a few hundred small reads of the leaf file: less than a thread hop costs).
_INLINE_PIECES = 512
#: Pieces whose leaf entries :func:`prepare_tree` reads at a time (64 KiB of entries).
_PREPARE_PIECES = 128
#: Leaves re-read per request by :func:`verify_leaves` (8 MiB).
_VERIFY_LEAVES = 128


async def verify_leaves(
    target: BlockTarget, tree: dg.HashTree, ranges: Iterable[Extent], disk_key: str = ""
) -> None:
    """Re-read every leaf ``ranges`` touch from the target; raise :class:`VerifyFailed` on the
    first leaf whose bytes do not hash to the tree's entry."""
    cap = tree.capacity
    buf = memoryview(bytearray(_VERIFY_LEAVES * dg.LEAF))
    for first, count in dg.touched_units(ranges):
        for i in range(first, first + count, _VERIFY_LEAVES):
            n = min(_VERIFY_LEAVES, first + count - i)
            start = i * dg.LEAF
            view = buf[: min(n * dg.LEAF, cap - start)]
            await target.read_into(start, view)
            got = await asyncio.to_thread(dg.unit_entries, view)
            want = await asyncio.to_thread(tree.store().read, i, n)
            if got != want:
                bad = next(k for k in range(n) if got[k * dg.HASH : (k + 1) * dg.HASH]
                           != want[k * dg.HASH : (k + 1) * dg.HASH])
                span = dg.leaf_span(i + bad, cap)
                raise VerifyFailed(
                    f"verify of {disk_key or 'disk'}: bytes {span.start}+{span.length} on the "
                    "target do not match what was written"
                )


@dataclass(slots=True)
class DiskJob:
    """One disk of a multi-disk copy."""

    disk_key: str
    source: BlockSource
    target: BlockTarget
    extents: Iterable[Extent] | AsyncIterable[Extent]
    capacity: int
    checkpoint: Checkpoint | None = None
    on_progress: ProgressCallback | None = None


async def copy_disks(
    jobs: Iterable[DiskJob], options: CopyOptions, *, max_parallel: int = 4
) -> dict[str, CopyResult | CopyFailed]:
    """Copy several disks at once (at most ``max_parallel``). Disks are independent: one
    failing does not stop the others; each gets its own result or error."""
    gate = asyncio.Semaphore(max(1, max_parallel))
    results: dict[str, CopyResult | CopyFailed] = {}

    async def one(job: DiskJob) -> None:
        async with gate:
            opts = _with_key(options, job.disk_key)
            try:
                results[job.disk_key] = await copy_disk(
                    job.source,
                    job.target,
                    job.extents,
                    capacity=job.capacity,
                    options=opts,
                    checkpoint=job.checkpoint,
                    on_progress=job.on_progress,
                )
            except CopyFailed as exc:
                results[job.disk_key] = exc

    async with asyncio.TaskGroup() as tg:
        for job in jobs:
            tg.create_task(one(job))
    return results


def _with_key(options: CopyOptions, disk_key: str) -> CopyOptions:
    from dataclasses import replace

    return replace(options, disk_key=disk_key)
