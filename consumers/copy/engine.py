"""The block copy engine: the changed extents of one disk from a source to a durable target.

Order of a disk copy (each step only after the previous one succeeded)::

    plan (merge, clip) -> [resume: skip what the checkpoint says is durable]
    -> for each range: block status -> data runs read+written, zero runs written as zeroes
       (pipelined: ``max_in_flight`` requests, one buffer each, so memory is bounded)
       -> every few hundred MiB: flush target -> save checkpoint
    -> flush target -> [verify: re-read target, recompute digest] -> return CopyResult

The caller commits the change ID only after ``copy_disk`` returned, then calls
``checkpoint.done()``. Any failure raises :class:`CopyFailed` (with the reason and retryability
of the underlying error); a partial copy is never returned as a result.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

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
            "progress_interval_s": copier.progress_interval_s,
            "max_bytes_per_s": copier.max_bytes_per_s,
        }
        base.update(overrides)
        return cls(**base)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class CopyResult:
    """What a successful copy did. ``digest`` is defined in :mod:`consumers.copy.digest`."""

    bytes_copied: int
    bytes_zeroed: int
    extents: int
    digest: str
    duration_s: float
    #: Bytes covered by the plan (merged ranges): bytes_copied + bytes_zeroed when not resumed.
    bytes_planned: int = 0
    #: Disk offset up to which a checkpoint let this run skip work (0: started from scratch).
    resumed_from: int = 0
    verified: bool = False
    ranges: tuple[Extent, ...] = field(default=(), repr=False)


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
    ) -> None:
        self.source, self.target, self.ranges, self.o = source, target, ranges, options
        self.checkpoint, self.plan_id, self.on_progress = checkpoint, plan_id, on_progress
        limit = min(source.max_request, target.max_request)
        self.request = min(_round_piece(options.request_bytes), _round_piece(limit))
        self.resume_until = resume.durable_until if resume else 0
        self.copied = resume.bytes_copied if resume else 0
        self.zeroed = resume.bytes_zeroed if resume else 0
        self.total = sum(r.length for r in ranges)
        self.done_bytes = 0
        self.resumed_bytes = 0
        self.folder = dg.DigestFolder()
        # In-order completion tracking for checkpoints.
        self._ends: dict[int, tuple[int, int, int]] = {}  # seq -> (end, copied, zeroed)
        self._next = 0
        self.watermark = self.resume_until
        self._prefix_copied, self._prefix_zeroed = self.copied, self.zeroed
        self._saved_at, self._saved_time = self.watermark, time.monotonic()
        self._saving: asyncio.Task[None] | None = None
        self._t0 = time.monotonic()
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
            cur = cur // dg.PIECE * dg.PIECE
        return out, cur

    async def items(self) -> AsyncIterable[Segment]:
        for r in self.ranges:
            pos = r.start
            while pos < r.end:
                status, nxt = await self._status(pos, r.end)
                for seg in segments(pos, nxt - pos, status, dg.PIECE):
                    if seg.zero:
                        yield seg
                    else:
                        for s, n in split_aligned(seg.start, seg.length, self.request):
                            yield Segment(s, n, False)
                pos = nxt

    # -- execution -----------------------------------------------------------------------------
    async def execute(self) -> None:
        queue: asyncio.Queue[tuple[int, Segment] | None] = asyncio.Queue(self.o.max_in_flight)
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
            self._pool.shutdown(wait=True)

    async def _worker(self, queue: asyncio.Queue[tuple[int, Segment] | None]) -> None:
        loop = asyncio.get_running_loop()
        buf: memoryview | None = None
        while (job := await queue.get()) is not None:
            seq, seg = job
            copied = zeroed = 0
            if seg.end <= self.resume_until:
                records = await self._rehash(seg, buf)
                self.resumed_bytes += seg.length
            elif seg.zero:
                await self.target.zero(seg.start, seg.length)
                records = dg.zero_records(seg.start, seg.length)
                zeroed = seg.length
            else:
                if buf is None:
                    buf = memoryview(bytearray(self.request))
                view = buf[: seg.length]
                await self.throttle.acquire(seg.length)
                await self.source.read_into(seg.start, view)
                if seg.length <= _INLINE_HASH:
                    # Small: hashing here is cheaper than a thread hop (and its GIL hand-off).
                    records = dg.data_records(seg.start, view)
                    await self.target.write(seg.start, view)
                else:
                    hashed = loop.run_in_executor(self._pool, dg.data_records, seg.start, view)
                    try:
                        await self.target.write(seg.start, view)
                    finally:
                        records = await hashed
                copied = seg.length
            self._complete(seq, seg, records, copied, zeroed)

    async def _rehash(self, seg: Segment, buf: memoryview | None) -> bytes:
        """Digest records of an item a previous run made durable (read back from the target)."""
        if seg.zero:
            return dg.zero_records(seg.start, seg.length)
        view = (buf if buf is not None else memoryview(bytearray(self.request)))[: seg.length]
        await self.target.read_into(seg.start, view)
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, dg.data_records, seg.start, view
        )

    def _complete(self, seq: int, seg: Segment, records: bytes, copied: int, zeroed: int) -> None:
        self.folder.add(seq, records)
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

    def progress(self, final: bool = False) -> CopyProgress:
        elapsed = time.monotonic() - self._t0
        fresh = self.done_bytes - self.resumed_bytes
        rate = fresh / elapsed if elapsed > 0 else 0.0
        left = self.total - self.done_bytes
        eta = left / rate if rate > 0 else None
        return CopyProgress(self.o.disk_key, self.done_bytes, self.total, elapsed, rate, eta, final)

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
) -> CopyResult:
    """Copy the changed ``extents`` of one disk of ``capacity`` bytes; flush; return what was done.

    Extents outside ``[0, capacity)`` are clipped. With a ``checkpoint`` an interrupted copy of
    the same plan resumes after the last durable offset. Raises :class:`CopyFailed`.
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
    run = _Run(source, target, ranges, options, checkpoint, plan_id, resume, on_progress, capacity)
    try:
        await run.execute()
        await target.flush()
        digest = run.folder.hexdigest()
        verified = False
        if options.verify:
            again = await dg.digest_of_target(ranges, target.read_into)
            if again != digest:
                raise VerifyFailed(
                    f"verify of {options.disk_key or 'disk'}: target digest {again} != {digest}"
                )
            verified = True
    except asyncio.CancelledError:
        raise
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
        raise _failure(exc, options.disk_key) from exc
    run.report(final=True)
    return CopyResult(
        bytes_copied=run.copied,
        bytes_zeroed=run.zeroed,
        extents=len(input_extents),
        digest=digest,
        duration_s=time.monotonic() - t0,
        bytes_planned=run.total,
        resumed_from=run.resume_until,
        verified=verified,
        ranges=tuple(ranges),
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
