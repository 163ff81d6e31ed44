"""The block copy engine: the changed extents of one disk from a source to a durable target.

Order of a disk copy (each step only after the previous one succeeded)::

    plan (merge, clip) -> cut into runs of whole leaves and "edge leaves" (leaves the ranges
    cover only in part) -> [resume: skip what the checkpoint says is durable]
    -> whole leaves: block status -> data runs read+written, zero runs written as zeroes
       edge leaf: read the old leaf from the target -> prove the bytes the sync keeps against
       the base tree -> read+write the changed bytes into it (unproven: copy the whole leaf
       from the source) -> hash the new leaf
       (pipelined: ``max_in_flight`` requests, one buffer each, so memory is bounded)
       -> every few hundred MiB: flush target -> save checkpoint
    -> flush target -> [verify: re-read every touched leaf, compare] -> return CopyResult

Every touched leaf of the replica hash tree (``digest.py``) is rehashed as its bytes are written
(hashing overlaps the writes, in a thread pool); untouched leaves keep the hash they had in the
``tree`` passed in, i.e. the replica's tree at the sync's base.

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

An edge leaf a checkpoint covers was proven by the run that wrote it, and is rehashed as found.
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
import contextlib
import logging
import time
from collections.abc import AsyncIterable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NamedTuple

from cbtstream.config import CopierSettings
from cbtstream.errors import CbtStreamError
from cbtstream.extents import Extent
from consumers.copy import digest as dg
from consumers.copy.checkpoint import Checkpoint, CheckpointState
from consumers.copy.plan import Segment, fingerprint, plan_ranges, segments, split_aligned
from consumers.copy.progress import CopyProgress, ProgressCallback
from consumers.copy.sources import BlockSource
from consumers.copy.targets import BlockTarget
from consumers.copy.throttle import Throttle

#: Block status is asked for this much of a range at a time (bounds the status list in memory).
_STATUS_WINDOW = 1 << 30
#: Items up to this size are hashed on the event loop thread (about 0.1 ms of work).
_INLINE_HASH = 256 * 1024
#: One leaf hash: its index and blake3 digest.
LeafHashes = list[tuple[int, bytes]]

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
    merge_gap_bytes: int = 1024 * 1024
    max_in_flight: int = 8
    use_block_status: bool = True
    verify: bool = False
    progress_interval_s: float = 2.0
    checkpoint_interval_bytes: int = 256 * 1024 * 1024
    checkpoint_interval_s: float = 10.0
    hash_threads: int = 2
    #: Average read rate limit of this disk copy in bytes/s (0: unlimited).
    max_bytes_per_s: int = 0

    @classmethod
    def from_settings(cls, copier: CopierSettings, **overrides: object) -> CopyOptions:
        base: dict[str, object] = {
            "request_bytes": copier.request_bytes,
            "merge_gap_bytes": copier.merge_gap_bytes,
            "max_in_flight": copier.max_in_flight,
            "progress_interval_s": copier.progress_interval_s,
            "max_bytes_per_s": copier.max_bytes_per_s,
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

    @property
    def leaves_repaired(self) -> int:
        return len(self.repaired)


class Edge(NamedTuple):
    """A leaf the planned ranges cover only in part, and the parts they cover (sorted)."""

    leaf: int
    touched: tuple[Extent, ...]


class EdgeLeaf(NamedTuple):
    """Work item: an edge leaf with the segments of it the sync writes (in order)."""

    leaf: int
    segs: tuple[Segment, ...]

    @property
    def end(self) -> int:
        return self.segs[-1].end

    @property
    def length(self) -> int:
        return sum(s.length for s in self.segs)


def cut_edges(ranges: Iterable[Extent], capacity: int) -> list[Extent | Edge]:
    """Cut planned ranges (sorted, disjoint, not touching) into runs of whole leaves and edge
    leaves, in disk order. A leaf shared by the end of one range and the start of the next is
    one :class:`Edge`. Pure."""
    out: list[Extent | Edge] = []
    edge, touched = -1, list[Extent]()
    for r in ranges:
        whole = dg.full_leaves(r.start, r.length, capacity)
        pos = r.start
        while pos < r.end:
            i = pos // dg.LEAF
            if i in whole:
                end = min(whole.stop * dg.LEAF, r.end)
                if touched:
                    out.append(Edge(edge, tuple(touched)))
                    edge, touched = -1, []
                out.append(Extent(pos, end - pos))
            else:
                end = min(r.end, (i + 1) * dg.LEAF)
                if i != edge and touched:
                    out.append(Edge(edge, tuple(touched)))
                    touched = []
                edge = i
                touched.append(Extent(pos, end - pos))
            pos = end
    if touched:
        out.append(Edge(edge, tuple(touched)))
    return out


async def _collect(extents: Iterable[Extent] | AsyncIterable[Extent]) -> list[Extent]:
    if isinstance(extents, AsyncIterable):
        return [Extent(int(e[0]), int(e[1])) async for e in extents]
    return [Extent(int(e[0]), int(e[1])) for e in extents]


def _round_piece(n: int) -> int:
    return max(dg.LEAF, n // dg.LEAF * dg.LEAF)


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
    ) -> None:
        self.source, self.target, self.ranges, self.o = source, target, ranges, options
        self.tree = tree
        self.units = cut_edges(ranges, capacity)
        self.repaired: list[int] = []
        self.recopied: list[int] = []
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
        self.capacity = capacity
        self._cache: list[tuple[int, int, bool]] = []
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
        return [d for d in self._cache if d[0] + d[1] > pos and d[0] < end]

    async def _status(self, pos: int, end: int) -> tuple[list[tuple[int, int, bool]], int]:
        """Zero map of ``[pos, x)``, where x is ``end`` or a piece-aligned offset > pos."""
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

    async def items(self) -> AsyncIterable[Segment | EdgeLeaf]:
        for unit in self.units:
            if isinstance(unit, Edge):
                segs: list[Segment] = []
                for t in unit.touched:
                    pos = t.start
                    while pos < t.end:
                        status, nxt = await self._status(pos, t.end)
                        segs.extend(segments(pos, nxt - pos, status, dg.LEAF))
                        pos = nxt
                yield EdgeLeaf(unit.leaf, tuple(segs))
                continue
            pos = unit.start
            while pos < unit.end:
                status, nxt = await self._status(pos, unit.end)
                for seg in segments(pos, nxt - pos, status, dg.LEAF):
                    if seg.zero:
                        yield seg
                    else:
                        for s, n in split_aligned(seg.start, seg.length, self.request):
                            yield Segment(s, n, False)
                pos = nxt

    # -- execution -----------------------------------------------------------------------------
    async def execute(self) -> None:
        queue: asyncio.Queue[tuple[int, Segment | EdgeLeaf] | None] = asyncio.Queue(
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

    async def _worker(self, queue: asyncio.Queue[tuple[int, Segment | EdgeLeaf] | None]
                      ) -> None:
        loop = asyncio.get_running_loop()
        buf: memoryview | None = None
        leaf: memoryview | None = None
        while (job := await queue.get()) is not None:
            seq, item = job
            copied = zeroed = 0
            cap = self.capacity
            if isinstance(item, EdgeLeaf):
                if leaf is None:
                    leaf = memoryview(bytearray(dg.LEAF))
                records, copied, zeroed = await self._edge(item, leaf)
                self._complete(seq, item, records, copied, zeroed)
                continue
            seg = item
            if seg.end <= self.resume_until:
                records = await self._rehash(seg, buf)
            elif seg.zero:
                await self.target.zero(seg.start, seg.length)
                records = dg.zero_item(seg.start, seg.length, cap)
                zeroed = seg.length
            else:
                if buf is None:
                    buf = memoryview(bytearray(self.request))
                view = buf[: seg.length]
                await self.throttle.acquire(seg.length)
                await self.source.read_into(seg.start, view)
                if seg.length <= _INLINE_HASH:
                    # Small: hashing here is cheaper than a thread hop (and its GIL hand-off).
                    records = dg.hash_item(seg.start, view, cap)
                    await self.target.write(seg.start, view)
                else:
                    hashed = loop.run_in_executor(self._pool, dg.hash_item, seg.start, view, cap)
                    try:
                        await self.target.write(seg.start, view)
                    finally:
                        records = await hashed
                copied = seg.length
            self._complete(seq, seg, records, copied, zeroed)

    async def _rehash(self, seg: Segment, buf: memoryview | None) -> LeafHashes:
        """Leaf hashes of an item a previous run made durable (read back from the target)."""
        if seg.zero:
            return dg.zero_item(seg.start, seg.length, self.capacity)
        view = (buf if buf is not None else memoryview(bytearray(self.request)))[: seg.length]
        await self.target.read_into(seg.start, view)
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, dg.hash_item, seg.start, view, self.capacity
        )

    async def _edge(self, edge: EdgeLeaf, buf: memoryview) -> tuple[LeafHashes, int, int]:
        """One edge leaf (see "Edge leaves" above): (its new hash, bytes copied, zeroed).

        The old leaf is read before anything of this sync is written into it (no other item
        writes into an edge leaf), its kept bytes proven, and the changed bytes read from the
        source straight into that buffer, so the buffer then is the new leaf."""
        loop = asyncio.get_running_loop()
        i = edge.leaf
        span = dg.leaf_span(i, self.capacity)
        leaf = buf[: span.length]
        await self.target.read_into(span.start, leaf)
        if edge.end <= self.resume_until:
            # Written (after being proven) by the run whose checkpoint covers it.
            return [(i, await loop.run_in_executor(self._pool, dg.leaf_hash, leaf))], 0, 0
        keep = dg.untouched(span, (Extent(s.start, s.length) for s in edge.segs))
        if not await loop.run_in_executor(self._pool, dg.holds_base, leaf, self.tree.get(i),
                                          keep):
            return await self._recopy(i, span, leaf, keep), span.length, 0
        copied = zeroed = 0
        for seg in edge.segs:
            rel = seg.start - span.start
            piece = leaf[rel : rel + seg.length]
            if seg.zero:
                piece[:] = bytes(seg.length)
                await self.target.zero(seg.start, seg.length)
                zeroed += seg.length
            else:
                await self.throttle.acquire(seg.length)
                await self.source.read_into(seg.start, piece)
                await self.target.write(seg.start, piece)
                copied += seg.length
        return [(i, await loop.run_in_executor(self._pool, dg.leaf_hash, leaf))], copied, zeroed

    async def _recopy(self, i: int, span: Extent, old: memoryview,
                      keep: list[tuple[int, int]]) -> LeafHashes:
        """An edge leaf the base tree does not prove: copy it whole from the source, and tell
        a corrupt replica (kept bytes differ from the snapshot) from an interrupted write."""
        loop = asyncio.get_running_loop()
        new = memoryview(bytearray(span.length))
        await self.throttle.acquire(span.length)
        await self.source.read_into(span.start, new)
        intact = await loop.run_in_executor(self._pool, dg.same_runs, old, new, keep)
        await self.target.write(span.start, new)
        self.recopied.append(i)
        disk = self.o.disk_key or "disk"
        where = {"leaf": i, "leaf_offset": span.start, "leaf_length": span.length}
        if intact:
            log.debug(f"{disk}: leaf {i} (bytes {span.start}+{span.length}) differed from the "
                      "replica's tree only in bytes this sync rewrites: copied whole from the "
                      "snapshot", extra=where)
        else:
            self.repaired.append(i)
            log.warning(f"{disk}: replica corrupt in leaf {i} (bytes {span.start}+"
                        f"{span.length}): bytes this sync keeps differ from the snapshot; leaf "
                        "repaired from the snapshot. Leaves the sync does not touch are not "
                        "checked: run cbtstream verify", extra=where)
        return [(i, await loop.run_in_executor(self._pool, dg.leaf_hash, new))]

    def _complete(
        self, seq: int, seg: Segment | EdgeLeaf, records: LeafHashes, copied: int, zeroed: int
    ) -> None:
        for i, h in records:
            self.tree.set(i, h)
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
    the sync's base (default: an all-zero disk); it is updated in place for every touched leaf and
    returned in the result. The bytes a leaf covered only in part keeps from the target are
    proven against it first, and repaired from the source if they are not what it says (see
    "Edge leaves" above). Raises :class:`CopyFailed`.
    """
    t0 = time.monotonic()
    input_extents = await _collect(extents)
    ranges = plan_ranges(input_extents, capacity, options.merge_gap_bytes)
    if source.size < capacity:
        raise CopyFailed(f"source has {source.size} bytes, the disk {capacity}")
    if target.size < capacity:
        raise CopyFailed(f"target has {target.size} bytes, the disk {capacity}")
    plan_id = fingerprint(ranges, capacity)
    resume = checkpoint.load(plan_id) if checkpoint is not None else None
    if tree is None:
        tree = dg.HashTree.zeros(capacity)
    elif tree.capacity != capacity:
        raise CopyFailed(f"replica tree is for {tree.capacity} bytes, the disk {capacity}")
    run = _Run(source, target, ranges, options, checkpoint, plan_id, resume, on_progress,
               capacity, tree)
    try:
        try:
            await run.execute()
        finally:
            run.close()
        await target.flush()
        digest = tree.touched_digest(ranges)
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
    )


async def verify_leaves(
    target: BlockTarget, tree: dg.HashTree, ranges: Iterable[Extent], disk_key: str = ""
) -> None:
    """Re-read every leaf ``ranges`` touch from the target; raise :class:`VerifyFailed` on the
    first leaf whose bytes do not hash to the tree's entry."""
    indexes = (i for first, n in dg.touched_leaves(ranges) for i in range(first, first + n))
    async for i, h in dg.leaves_of_target(indexes, tree.capacity, target.read_into):
        if h != tree.get(i):
            span = dg.leaf_span(i, tree.capacity)
            raise VerifyFailed(
                f"verify of {disk_key or 'disk'}: bytes {span.start}+{span.length} on the target "
                "do not match what was written"
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
