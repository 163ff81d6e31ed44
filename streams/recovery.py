"""Our overrides of faust-streaming: partitions resumed only after they were seeked, and a
producer flush that really flushes the table writes before an offset commit.

faust-streaming 0.15.3 (its Python source equals upstream v0.15.2; no later release changes it)
can drop records right after a partition assignment, read in its source:

1. ``Consumer.on_partitions_revoked`` deletes ``_read_offset[tp]``, but ``_drain_messages``, woken
   from a delivery that ``suspend_flow`` cancelled, calls ``set_read_offset(tp, offset)`` again
   afterwards, so a read offset X above the committed offset C survives for a partition that
   ``flow_control.clear()`` has just emptied.
2. ``Recovery.on_recovery_completed`` resumes the stream partitions **before** awaiting
   ``perform_seek()``: the fetcher delivers records from C while X still stands, and those below X
   fail the ``offset >= r_offset`` check of ``_drain_messages`` and are dropped without a log line
   ("DROPPED MESSAGE ROFF", only with ``DEVLOG``). A batch fetched in that window is still being
   delivered after the seek, moving the read offset past records the seek re-fetches, which are
   then dropped too.
3. The acked-offset bookkeeping then stalls (a hole at the head of ``_acked``), or commits past C
   (``_new_offset`` tolerates one missing record at the head), or commits a gap (``_add_gap``).
4. A partition left in ``Consumer._buffered_partitions`` (its stream buffer was full when the
   rebalance came) passes the fetch filter of ``getmany`` and is put back into the active set by
   ``on_buffer_drop`` while it should still be paused.

:class:`SeekFirstRecovery` replaces ``on_recovery_completed`` with the same steps in a safe
order: forget every read offset and buffered mark of the newly assigned stream partitions, await
``perform_seek()`` (every assigned partition positioned at its committed offset and its read
offset set from it), seek the stream partitions that have no committed offset yet (or 0) to the
start, and only then, with no ``await`` in between, resume those partitions.

5. (found by the churn test in ``tests/rebalance``) ``perform_seek()`` seeks only partitions with
   a committed offset above 0 (aiokafka's ``seek_to_committed``). A partition this worker keeps
   through a rebalance before the group ever committed it stays where the fetcher left it, past
   the records that were fetched and then discarded by ``flow_control.clear()``; they are never
   delivered and the next commit passes them. No
record of an assigned partition can be fetched before its seek, and no stale read offset is left
to compare against. :class:`TableManager` is how it is plugged in
(``faust.App(..., TableManager=...)``).

**The flush.** Table writes (our rows) go through Faust's ``ProducerBuffer``; every offset
commit first awaits ``producer.flush()``, whose ``ProducerBuffer.flush`` returns as soon as no
buffered write was sent for 0.1 s, even with writes still queued (``flush_atmost``). On a loaded
machine the commit then goes on with rows not yet in the changelog while the step's outputs, sent
straight to aiokafka, are flushed: a crash right after loses the row but not the outputs, and as
the input's offset is committed nothing repairs it (the churn test saw a commit refused as
``lineage_mismatch`` because the row of its plan was lost). :func:`install_full_flush` replaces
``ProducerBuffer.flush`` with a loop that waits until the buffer is empty (bounded: past
``FLUSH_LIMIT_S`` it raises, so the commit fails instead of passing unwritten rows).

**Changelog seeks.** ``Recovery._seek_offsets`` maps only an offset of -1 to 0; the churn soak
saw ``None`` offsets reach ``seek_wait`` and crash the worker (``ValueError('Offset must be a
positive integer')``). :class:`SeekFirstRecovery` reads an unknown or negative offset as 0: the
changelog is re-read from its start, which is always safe.

``UPSTREAM_SHA256`` pins the source of the upstream methods this replaces or relies on; a unit
test fails when a faust-streaming upgrade changes them, so the override is re-read before it is
trusted again.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
import weakref
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

from faust.streams import Stream
from faust.tables.base import Collection
from faust.tables.manager import TableManager as _FaustTableManager
from faust.tables.recovery import Recovery
from faust.tables.table import Table
from faust.transport.consumer import Consumer
from faust.transport.producer import ProducerBuffer
from faust.types import TP

log = logging.getLogger("cbtstream.streams.recovery")

_ORIGINAL_FLUSH_ATMOST = ProducerBuffer.flush_atmost

#: sha256 of ``inspect.getsource`` of each upstream function whose behaviour this module depends
#: on, as of faust-streaming 0.15.3 (checked by ``tests/rebalance/test_recovery_override.py``).
UPSTREAM_SHA256 = {
    "faust.tables.recovery.Recovery.on_recovery_completed":
        "6ef567acf072e46da3fccbccc6d662371f634f622c3d510972d5df81f70ae3ac",
    "faust.transport.consumer.Consumer.perform_seek":
        "0e8c130ff4b0afd82c0be9c5fd831316e10febc62c94032833911096e156d7c6",
    "faust.transport.consumer.Consumer.on_partitions_revoked":
        "d04b7ae72c6fc206924a2879d6c90dd383f3e8ba6f4b10a19ca99a921eb8f4db",
    "faust.transport.consumer.Consumer.resume_partitions":
        "afe6b7c02a41d63cd46d47a03f09b547c85289c108de21d682970057d1015c3b",
    "faust.transport.consumer.Consumer.on_buffer_drop":
        "4b57e8a418d5ad9c58632b13b58b377ae185855520fd1280870cf7141ac0d1d0",
    "faust.transport.consumer.Consumer._drain_messages":
        "44a2500309e83c630493f6828af50166ec8d96a0b3e4fb2bab735f704ae93417",
    "faust.tables.manager.TableManager.recovery":
        "f0bf5de78b4c3d235c3554010480f407010ccb7c481c68852a985542b952df32",
    "faust.transport.producer.ProducerBuffer.flush_atmost":
        "4966e8c5f9b42eb97abe3f93cbc9bc566a22bdea01ae5328c5a6593414820323",
    "faust.transport.producer.ProducerBuffer._handle_pending":
        "78d648030fd21016cc0d82ae6cc6df1cb474273195b10f133ea0ef9ac9d35f0c",
    "faust.tables.recovery.Recovery._seek_offsets":
        "19598ca63d94d250e49d2dfe48a3c48ecbdf65ee4f1a2871abda51d28b335e55",
    # streams.durable.DurableTable overrides send_changelog; on_key_set is what calls it
    "faust.tables.base.Collection.send_changelog":
        "3dd3884e1b5fc0e1612bc688b83d9318a1805ddc49700d3b6b37bade73c3905d",
    "faust.tables.table.Table.on_key_set":
        "a370e35ca55c2c7e36e93f0d4b485927c32d49199043cab2314572846184dd94",
    # the commit guard wraps _commit_offsets; _new_offset and Stream._py_aiter are why
    "faust.transport.consumer.Consumer._commit_offsets":
        "1a6979904118844111259d182ca1c6e92ccc16364ccbe55c58e59d6e254a7adb",
    "faust.transport.consumer.Consumer._new_offset":
        "1d2c7ea89a7ad4f1a216c1d51936e569162cd66bd56f889e13fd29c910b58eb0",
    "faust.streams.Stream._py_aiter":
        "3a48ee257a65435b482d51edb74f2993a67867949b1ef89b49fea893769e0614",
}

#: Longest a flush waits for the table writes to leave the buffer before it fails the commit.
FLUSH_LIMIT_S = 30.0


def upstream_sources() -> dict[str, str]:
    """The current source of every pinned upstream function, by dotted name."""
    objs: dict[str, Any] = {
        "faust.tables.recovery.Recovery.on_recovery_completed": Recovery.on_recovery_completed,
        "faust.transport.consumer.Consumer.perform_seek": Consumer.perform_seek,
        "faust.transport.consumer.Consumer.on_partitions_revoked":
            Consumer.on_partitions_revoked,
        "faust.transport.consumer.Consumer.resume_partitions": Consumer.resume_partitions,
        "faust.transport.consumer.Consumer.on_buffer_drop": Consumer.on_buffer_drop,
        "faust.transport.consumer.Consumer._drain_messages": Consumer._drain_messages,
        "faust.tables.manager.TableManager.recovery":
            cast(property, _FaustTableManager.__dict__["recovery"]).fget,
        "faust.transport.producer.ProducerBuffer.flush_atmost": _ORIGINAL_FLUSH_ATMOST,
        "faust.transport.producer.ProducerBuffer._handle_pending":
            ProducerBuffer.__dict__["_handle_pending"].fun,
        "faust.tables.recovery.Recovery._seek_offsets": Recovery._seek_offsets,
        "faust.tables.base.Collection.send_changelog": Collection.send_changelog,
        "faust.tables.table.Table.on_key_set": Table.on_key_set,
        "faust.transport.consumer.Consumer._commit_offsets": _ORIGINAL_COMMIT_OFFSETS,
        "faust.transport.consumer.Consumer._new_offset": Consumer._new_offset,
        "faust.streams.Stream._py_aiter": Stream._py_aiter,
    }
    return {name: inspect.getsource(inspect.unwrap(obj)) for name, obj in objs.items()}


def upstream_digests() -> dict[str, str]:
    return {name: hashlib.sha256(src.encode()).hexdigest()
            for name, src in upstream_sources().items()}


def _start_or(offset: int | None) -> int:
    """A changelog offset to seek to: 0 for an unknown (None) or negative one."""
    return offset if isinstance(offset, int) and offset > 0 else 0


class SeekFirstRecovery(Recovery):
    """Faust's recovery service, resuming stream partitions only after their seek."""

    async def _seek_offsets(self, consumer: Any, tps: Any, offsets: Any, title: str) -> None:
        """Upstream's changelog seek, with every unknown (None) or negative offset read as
        "from the start".

        Upstream maps only -1 to 0; the churn soak saw ``None`` offsets (a changelog partition
        whose offset was never read) reach ``seek_wait`` and crash the worker with
        ``ValueError('Offset must be a positive integer')``. Re-reading a changelog from the
        start is always safe (the table is rebuilt from it, writes are idempotent)."""
        await consumer.seek_wait({tp: _start_or(offsets[tp]) for tp in tps})

    async def on_recovery_completed(self, generation_id: int = 0) -> None:
        """Upstream's steps (table callbacks, generation check, seek, resume, flow, fetcher,
        ready signals) with the seek moved before the resume and stale state cleared."""
        app: Any = self.app
        consumer: Any = app.consumer
        self.log.info("Restore complete!")
        await app.on_rebalance_complete.send()
        self._set_recovery_ended()
        callbacks = [
            asyncio.ensure_future(table.on_recovery_completed(
                self.actives_for_table[table], self.standbys_for_table[table]))
            for table in self.tables.values()
        ]
        if callbacks:
            await asyncio.wait(callbacks)
        if app.consumer_generation_id != generation_id:
            self.log.warning("Recovery rebalancing again app id %s param %s",
                             app.consumer_generation_id, generation_id)
            return
        assignment = consumer.assignment()
        streams = {tp for tp in assignment if not self._is_changelog_tp(tp)}
        # Forget what an earlier assignment left: a read offset written back by _drain_messages
        # after the revocation, a "buffer full" mark that would let records through early.
        stale = {tp: consumer._read_offset[tp] for tp in streams
                 if consumer._read_offset.get(tp) is not None}
        for tp in streams:
            consumer._read_offset.pop(tp, None)
            consumer._buffered_partitions.discard(tp)
        consumer.pause_partitions(streams)
        if stale:
            log.info("cleared stale read offsets of newly assigned partitions",
                     extra={"partitions": {f"{tp.topic}:{tp.partition}": off
                                           for tp, off in stale.items()}})
        if assignment:
            self.log.info("Seek stream partitions to committed offsets.")
            await self._wait(consumer.perform_seek(),
                             timeout=app.conf.broker_request_timeout)
        # perform_seek() leaves a partition without a committed offset (or at 0) where the
        # fetcher was: after a rebalance that kept it, past records fetched and then discarded
        # by flow_control.clear(). Seek those to the start (auto_offset_reset=earliest) too.
        fresh = sorted(tp for tp in streams if not consumer._committed_offset.get(tp))
        for tp in fresh:
            await self._wait(consumer.seek(tp, 0), timeout=app.conf.broker_request_timeout)
        if app.consumer_generation_id != generation_id:
            self.log.warning("Recovery rebalancing again after the seek")
            return
        hooks = _HOOKS.get(app)
        if hooks is not None and hooks.seeked is not None:  # the commit guard's base
            hooks.seeked({tp: consumer._committed_offset.get(tp) or 0 for tp in streams})
        # No await between the seeks above and this resume: nothing is fetched unseeked.
        consumer.resume_partitions(streams)
        self.completed.set()
        self.log.dev("Resume stream partitions")
        app.flow_control.resume()
        consumer.resume_flow()
        await app._fetcher.maybe_start()
        self.tables.on_actives_ready()
        if not app.assignor.assigned_standbys():
            self.tables.on_standbys_ready()
        app.on_rebalance_end()
        self.log.info("Worker ready")


class TableManager(_FaustTableManager):
    """Faust's table manager with :class:`SeekFirstRecovery` as its recovery service."""

    @property
    def recovery(self) -> Recovery:
        if self._recovery is None:
            self._recovery = SeekFirstRecovery(
                self.app, self, beacon=self.beacon, loop=self.loop)
        return self._recovery


@dataclass
class _Hooks:
    """What one app plugged into the overrides (:func:`on_flush`, :func:`on_seeked`,
    :func:`limit_commits`)."""

    flush: Callable[[], Awaitable[None]] | None = None
    seeked: Callable[[dict[TP, int]], None] | None = None
    commit_limit: Callable[[str, int], int | None] | None = None


_HOOKS: weakref.WeakKeyDictionary[Any, _Hooks] = weakref.WeakKeyDictionary()


def _hooks(app: Any) -> _Hooks:
    return _HOOKS.setdefault(app, _Hooks())


def on_flush(app: Any, hook: Callable[[], Awaitable[None]]) -> None:
    """Make every flush of ``app``'s producer (before each offset commit) await ``hook`` once
    the table writes are handed to the driver, before the driver's own flush (the drain of
    ``streams.durable.Outbox``)."""
    _hooks(app).flush = hook


async def _full_flush(self: ProducerBuffer) -> None:
    """``ProducerBuffer.flush`` that returns only once every buffered write was handed to the
    driver (whose own flush, awaited next by ``Producer.flush``, then waits for the acks), and
    the app's flush hook (:func:`on_flush`) has run."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + FLUSH_LIMIT_S
    while self.size:
        await _ORIGINAL_FLUSH_ATMOST(self, None)
        if self.size and loop.time() > deadline:
            raise RuntimeError(f"producer buffer not flushed after {FLUSH_LIMIT_S}s "
                               f"({self.size} writes left)")
    # the write taken off the queue last may still be on its way into the driver
    for _ in range(3):
        await asyncio.sleep(0)
    hooks = _HOOKS.get(self.app) if self.app is not None else None
    if hooks is not None and hooks.flush is not None:
        await hooks.flush()


def on_seeked(app: Any, hook: Callable[[dict[TP, int]], None]) -> None:
    """After every assignment, once the stream partitions are seeked and before they resume,
    call ``hook`` with the offset each starts from (its committed offset; 0 for a partition the
    group never committed, read from its start)."""
    _hooks(app).seeked = hook


_ORIGINAL_COMMIT_OFFSETS = Consumer._commit_offsets


def limit_commits(app: Any, limit: Callable[[str, int], int | None]) -> None:
    """Cap every offset commit of ``app``: ``limit(topic, partition)`` is the highest offset
    that may be committed (the next record to read: one past the last record the app has
    processed without a gap), negative when nothing may be, None for a partition it does not
    track (committed as Faust decides)."""
    _hooks(app).commit_limit = limit


async def _guarded_commit_offsets(self: Consumer, offsets: Mapping[TP, int],
                                  start_new_transaction: bool = True) -> bool:
    """``Consumer._commit_offsets`` with each offset capped by the app's limit: Faust acks an
    event whose processing was interrupted (its stream's ``finally`` acks the event being
    processed when the agent is cancelled at a stop) and its head check tolerates one
    missing record, so it could commit past a record nobody processed."""
    hooks = _HOOKS.get(self.app)
    limit = hooks.commit_limit if hooks is not None else None
    if limit is not None:
        kept: dict[TP, int] = {}
        for tp, offset in offsets.items():
            cap = limit(tp.topic, tp.partition)
            if cap is not None and offset > cap:
                log.warning("offset commit held back to the last processed record", extra={
                    "topic": tp.topic, "partition": tp.partition, "offset": offset,
                    "held_at": cap})
                offset = cap
            committed = self._committed_offset.get(tp)
            if offset >= 0 and (committed is None or offset > committed):
                kept[tp] = offset
        offsets = kept
        if not offsets:
            return False
    return bool(await _ORIGINAL_COMMIT_OFFSETS(self, offsets, start_new_transaction))


def install_commit_guard() -> None:
    """Make every Faust consumer of this process cap its commits (:func:`limit_commits`)."""
    Consumer._commit_offsets = _guarded_commit_offsets  # type: ignore[method-assign]


def install_full_flush() -> None:
    """Make every ``ProducerBuffer`` of this process flush completely (idempotent). Called by
    ``streams.app.build``, the composition root, not at import."""
    ProducerBuffer.flush = _full_flush  # type: ignore[method-assign]
