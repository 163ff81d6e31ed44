"""The copier: executes ``SyncPlanned`` events and publishes their outcome.

Order of effects for one plan (at-least-once, idempotent):

1. execute the plan. For the vSphere executor (``consumers/replica/session.py``): admit it
   against the replica's record (a stale plan is refused with ``SyncFailed(stale_plan)`` before
   any write; an incremental onto a replica that does not provably hold its base is copied in
   full with a ``replica_*`` reason) -> mark the replica **dirty** (durable) -> copy the changed
   blocks -> **flush the target** -> mark it **clean** at the new change ID with its hash tree
   (durable);
2. publish ``ChangeIdCommitted`` (or ``SyncFailed``) and wait for ``acks=all``;
3. let the executor release what it holds for the sync (e.g. the vSphere snapshot);
4. commit the plan's offset in the copier's consumer group.

Steps 2-3 of one plan overlap the copy of the next plan of the same partition; offsets are
committed per partition once the outcome of every plan up to them is acknowledged (every
``COMMIT_EVERY`` plans, or when the partition's queue is empty), so an offset is still never
committed before the outcomes of the plans it covers were published.

A redelivered plan whose outcome was already published (the ledger, ``consumers/ledger.py``,
records each published outcome before the offset commit) is never written again: the replica
guard republishes the recorded commit if the replica holds that very sync, refuses it as stale if
the replica moved on, and otherwise the plan is skipped. Correctness does not depend on the
ledger (a lost state dir leaves the replica records beside file replicas); it spares a re-copy
of a plan whose outcome was a failure. A crash before 2
re-executes the plan on restart (same bytes to the same place; the engine resumes
from its checkpoint). A crash between 2 and 4 publishes the same commit again with the same event
id (uuid5 of the sync id), which the table drops as a duplicate. No change ID is ever published
before the data behind it is durable.

Concurrency: plans of one partition run one after another in offset order (a disk's events all
live in one partition, so one disk never has two copies at once); partitions run concurrently,
at most ``copier.max_parallel_disks`` copies at a time. The consumer keeps polling while copies
run (partitions with queued work are paused), so long copies do not trigger a rebalance; a revoked
partition's copy is cancelled and resumed from its checkpoint by the new owner.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, KafkaError

from cbtstream.config import Settings
from cbtstream.errors import CbtStreamError, PermissionDenied
from cbtstream.kafka import Publisher, client_kwargs, topic_name
from cbtstream.log import bind_disk
from consumers.executor import ProgressUpdate, SyncExecutor, SyncResult
from consumers.ledger import SyncLedger
from consumers.replica.session import OutcomeAlreadyPublished
from schemas.codec import EventDecodeError, dead_letter_record, decode
from schemas.events import (
    ChangeIdCommitted,
    SyncFailed,
    SyncPlanned,
    SyncProgress,
    SyncSuperseded,
    stable_event_id,
)
from schemas.topics import DEADLETTER, SYNC_PLANNED

log = logging.getLogger("cbtstream.copier")

#: Backoff before each retry of a retriable failure (seconds). Three retries ride out a broker
#: leader election or a vCenter hiccup without holding a disk for minutes.
RETRY_DELAYS = (1.0, 4.0, 15.0)
#: Plans of one partition whose outcomes may be in flight before their offsets are committed:
#: one commit (a broker round trip) per batch instead of one per plan.
COMMIT_EVERY = 256
#: Records per poll. Large polls mean fewer fetch requests and fewer offset commits (one per
#: partition per poll when the pipeline is busy); the partition is paused while its queue drains.
MAX_POLL_RECORDS = 500
#: ``linger_ms`` of the outcome publisher: outcomes wait up to this long to share a produce
#: request (fewer requests for the broker and us), a small delay next to any real copy.
OUTCOME_LINGER_MS = 20
#: Backoff before re-publishing an outcome: about a minute in all, longer than a broker restart.
PUBLISH_RETRY_DELAYS = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)
#: A VM snapshot is named by its managed object id (``snapshot-42``). Executors hand it to vSphere
#: and to export resolvers (URL paths, file names), so anything else (``..``, ``/``, NUL,
#: look-alike unicode) is refused before any I/O.
_SNAPSHOT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")


def check_plan(plan: SyncPlanned) -> None:
    """Raise :class:`PermissionDenied` for a plan naming something no executor may touch."""
    if not _SNAPSHOT_ID_RE.match(plan.vm_snapshot):
        raise PermissionDenied(
            f"vm_snapshot {plan.vm_snapshot[:60]!r} is not a snapshot managed object id"
        )


def commit_event(plan: SyncPlanned, result: SyncResult) -> ChangeIdCommitted:
    """The commit of a finished sync. Its event id depends only on the sync, so a re-published
    commit is recognisably the same fact."""
    assert plan.change_id is not None
    return ChangeIdCommitted(
        event_id=stable_event_id("ChangeIdCommitted", plan.sync_id),
        disk=plan.disk,
        sync_id=plan.sync_id,
        vm_snapshot=plan.vm_snapshot,
        previous_change_id=plan.previous_change_id,
        change_id=plan.change_id,
        replication_type=result.replication_type,
        reason=result.reason,
        bytes_copied=result.bytes_copied,
        bytes_zeroed=result.bytes_zeroed,
        extents=result.extents,
        digest=result.digest,
        duration_s=round(result.duration_s, 6),
        replica_digest=result.replica_digest,
        generation=plan.generation,
    )


def failure_event(plan: SyncPlanned, reason: str, detail: str, retriable: bool) -> SyncFailed:
    return SyncFailed(
        event_id=stable_event_id("SyncFailed", plan.sync_id, reason),
        disk=plan.disk,
        sync_id=plan.sync_id,
        vm_snapshot=plan.vm_snapshot,
        reason=reason[:64],
        detail=detail[:4096],
        retriable=retriable,
    )


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, copier: Copier) -> None:
        self._copier = copier

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self._copier._drop_partitions(revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        return None


class Copier:
    """Consumer group ``<prefix>cbtstream-copier`` on ``cbt.sync.planned``."""

    def __init__(
        self,
        settings: Settings,
        executor: SyncExecutor,
        publisher: Publisher,
        *,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        self.settings = settings
        self.executor = executor
        self.ledger = SyncLedger(settings.copier.state_dir / "finished")
        self.ledger.prune()
        self.publisher = publisher
        self._sleep = sleep
        k = settings.kafka
        self.group_id = f"{k.topic_prefix}cbtstream-copier"
        self.consumer = AIOKafkaConsumer(
            **client_kwargs(k),
            group_id=self.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=MAX_POLL_RECORDS,
        )
        self._slots = asyncio.Semaphore(settings.copier.max_parallel_disks)
        self._queues: dict[TopicPartition, asyncio.Queue[ConsumerRecord[bytes, bytes]]] = {}
        self._tasks: dict[TopicPartition, asyncio.Task[None]] = {}
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        """Consume until :meth:`request_stop` is called (or the task is cancelled)."""
        self.consumer.subscribe(
            [topic_name(SYNC_PLANNED, self.settings.kafka)], listener=_Listener(self)
        )
        await self.consumer.start()
        try:
            while not self._stopping.is_set():
                batch = await self.consumer.getmany(timeout_ms=300)
                for tp, records in batch.items():
                    self._enqueue(tp, records)
        finally:
            await self._drop_partitions(list(self._tasks))
            await self.consumer.stop()

    def request_stop(self) -> None:
        self._stopping.set()

    # -- partitions -----------------------------------------------------------------------------
    def _enqueue(self, tp: TopicPartition, records: list[ConsumerRecord[bytes, bytes]]) -> None:
        queue = self._queues.setdefault(tp, asyncio.Queue())
        for rec in records:
            queue.put_nowait(rec)
        self.consumer.pause(tp)  # resumed when the queue drains: bounded memory
        if tp not in self._tasks or self._tasks[tp].done():
            self._tasks[tp] = asyncio.create_task(self._drain(tp, queue), name=f"copier-{tp}")

    async def _drain(
        self, tp: TopicPartition, queue: asyncio.Queue[ConsumerRecord[bytes, bytes]]
    ) -> None:
        pending: list[asyncio.Task[None]] = []
        first: int | None = None  # first offset of the plans not committed yet
        try:
            while not queue.empty():
                rec = queue.get_nowait()
                first = rec.offset if first is None else first
                settle = False
                try:
                    finish = await self._process(rec)
                    if finish is not None:
                        pending.append(finish)
                    settle = len(pending) >= COMMIT_EVERY or queue.empty()
                    if settle:
                        await asyncio.gather(*pending)  # outcomes acknowledged, then offsets
                except Exception as exc:
                    # Kafka unreachable for longer than the publish retries (or a bug): nothing
                    # was committed from ``first`` on, so re-read those records later.
                    log.error("records not processed; they will be retried",
                              extra={"tp": str(tp), "offset": first, "error": str(exc)})
                    await asyncio.gather(*pending, return_exceptions=True)
                    while not queue.empty():
                        queue.get_nowait()
                    if tp in self.consumer.assignment():
                        self.consumer.seek(tp, first)
                    await self._sleep(RETRY_DELAYS[0])
                    break
                finally:
                    if settle:
                        pending.clear()
                if not settle:
                    continue
                first = None
                try:
                    await self.consumer.commit({tp: rec.offset + 1})
                except CommitFailedError as exc:
                    # The partition moved to another member: it will redo these plans
                    # idempotently.
                    log.warning("offset commit refused", extra={"tp": str(tp), "error": str(exc)})
                    return
                except KafkaError as exc:
                    # Coordinator unavailable (broker restart): offsets are cumulative, so the
                    # next successful commit of this partition covers these records too.
                    log.warning("offset commit failed", extra={"tp": str(tp), "error": str(exc)})
        except asyncio.CancelledError:
            # Revoked or stopping: let outcomes being published finish (they are facts); their
            # offsets stay uncommitted and whoever reads the partition next redoes the plans.
            await asyncio.gather(*pending, return_exceptions=True)
            raise
        if tp in self.consumer.assignment():
            self.consumer.resume(tp)

    async def _drop_partitions(self, tps: list[TopicPartition]) -> None:
        tasks = [self._tasks.pop(tp) for tp in tps if tp in self._tasks]
        for tp in tps:
            self._queues.pop(tp, None)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # -- one record -----------------------------------------------------------------------------
    async def _process(self, rec: ConsumerRecord[bytes, bytes]) -> asyncio.Task[None] | None:
        """Copy one plan (step 1); returns the task publishing its outcome (steps 2-3), or None
        if there is nothing to wait for."""
        try:
            event = decode(rec.value, key=rec.key, expect=(SyncPlanned, SyncSuperseded))
        except EventDecodeError as exc:
            k, v, h = dead_letter_record(
                rec.topic, rec.partition, rec.offset, rec.key, rec.value, str(exc), "copier"
            )
            log.warning("dead letter", extra={"offset": rec.offset, "error": str(exc)[:300]})
            await self.publisher.publish_raw(topic_name(DEADLETTER, self.settings.kafka), k, v, h)
            return None
        if not isinstance(event, SyncPlanned):
            return None  # superseded snapshots are the lifecycle's business, not the copier's
        published = self.ledger.finished(event.sync_id)
        if published and not self.executor.guards_replicas:
            with bind_disk(event.disk.key):
                log.info("plan redelivered after its outcome was published; skipped",
                         extra={"sync_id": str(event.sync_id)})
            return None
        with bind_disk(event.disk.key):
            outcome = await self._copy(event, outcome_published=published)
        if outcome is None:
            return None
        return asyncio.create_task(self._finish(event, outcome))

    async def _copy(self, plan: SyncPlanned, *, outcome_published: bool = False
                    ) -> ChangeIdCommitted | SyncFailed | None:
        """Step 1 (copy and flush, with retries); returns the outcome to publish (None: the
        outcome was published before and the plan is skipped)."""
        if log.isEnabledFor(logging.INFO):
            log.info(
                "sync started",
                extra={
                    "sync_id": str(plan.sync_id),
                    "replication_type": plan.replication_type,
                    "base_change_id": plan.base_change_id,
                },
            )
        async with self._slots:
            return await self._execute_with_retries(plan, outcome_published)

    async def _finish(self, plan: SyncPlanned, outcome: ChangeIdCommitted | SyncFailed) -> None:
        """Steps 2-3: publish the outcome (acks=all), then release what the sync holds."""
        with bind_disk(plan.disk.key):
            await self._publish_outcome(outcome)
            await asyncio.to_thread(self.ledger.record, plan.sync_id)
            self._log_outcome(plan, outcome)
            try:
                await self.executor.release(plan)
            except CbtStreamError as exc:
                log.warning("release failed", extra={"error": str(exc)})

    def _log_outcome(self, plan: SyncPlanned, outcome: ChangeIdCommitted | SyncFailed) -> None:
        if not log.isEnabledFor(logging.INFO):
            return
        log.info(
            "sync committed" if isinstance(outcome, ChangeIdCommitted) else "sync failed",
            extra={
                "sync_id": str(plan.sync_id),
                "outcome": outcome.model_dump(mode="json", exclude={"disk"}),
            },
        )

    async def _publish_outcome(self, outcome: ChangeIdCommitted | SyncFailed) -> None:
        """Publish with patience: the data is durable already, so ride out a broker restart
        rather than redo the copy. Raises if Kafka stays away (the record is then re-read)."""
        for delay in (*PUBLISH_RETRY_DELAYS, None):
            try:
                await self.publisher.publish(outcome)
                return
            except CbtStreamError as exc:
                if delay is None or not exc.retriable or self._stopping.is_set():
                    raise
                log.warning("publishing the outcome failed; retrying",
                            extra={"error": str(exc), "retry_in_s": delay})
                await self._sleep(delay)

    async def _execute_with_retries(self, plan: SyncPlanned, outcome_published: bool
                                    ) -> ChangeIdCommitted | SyncFailed | None:
        try:
            check_plan(plan)
        except PermissionDenied as exc:
            return failure_event(plan, exc.reason, str(exc), False)
        attempt = 0
        while True:
            try:
                result = await self._execute_once(plan, outcome_published)
            except OutcomeAlreadyPublished as exc:
                log.info("plan redelivered after its outcome was published; skipped",
                         extra={"sync_id": str(plan.sync_id), "detail": str(exc)})
                return None
            except CbtStreamError as exc:
                if exc.retriable and attempt < len(RETRY_DELAYS):
                    log.warning("retrying sync", extra={"attempt": attempt + 1, "error": str(exc)})
                    await self._sleep(RETRY_DELAYS[attempt])
                    attempt += 1
                    continue
                return failure_event(plan, exc.reason, str(exc), exc.retriable)
            except Exception as exc:  # a bug must not stop the other disks
                log.exception("sync crashed")
                return failure_event(plan, "internal_error", f"{type(exc).__name__}: {exc}", False)
            if plan.change_id is None:
                return failure_event(
                    plan,
                    "cbt_not_enabled",
                    "replica copied in full, but the snapshot has no change ID to commit; "
                    "enable CBT on the VM",
                    False,
                )
            return commit_event(plan, result)

    async def _execute_once(self, plan: SyncPlanned, outcome_published: bool) -> SyncResult:
        latest: list[ProgressUpdate] = []
        interval = self.settings.copier.progress_interval_s

        def on_progress(update: ProgressUpdate) -> None:
            latest[:] = [update]

        async def report() -> None:
            last_done, last_t = 0, time.monotonic()
            while True:
                await asyncio.sleep(interval)
                if not latest:
                    continue
                now, update = time.monotonic(), latest[0]
                rate = max(0.0, (update.bytes_done - last_done) / max(now - last_t, 1e-6))
                last_done, last_t = update.bytes_done, now
                with contextlib.suppress(CbtStreamError):
                    await self.publisher.publish(
                        SyncProgress(
                            disk=plan.disk,
                            sync_id=plan.sync_id,
                            bytes_done=update.bytes_done,
                            bytes_total=update.bytes_total,
                            rate_bytes_per_s=rate,
                        )
                    )

        reporter = asyncio.create_task(report())
        try:
            return await self.executor.execute(plan, on_progress,
                                               outcome_published=outcome_published)
        finally:
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter
