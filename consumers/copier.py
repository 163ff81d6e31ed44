"""The copier: executes ``SyncPlanned`` events and publishes their outcome.

Order of effects for one plan (at-least-once, idempotent):

1. execute the plan. For the vSphere executor (``consumers/replica/session.py``): admit it
   against the replica's record (a stale plan is refused with ``SyncFailed(stale_plan)`` before
   any write, and in a host-local pool a replica whose record another host wrote with
   ``SyncFailed(replica_on_other_host)``; an incremental onto a replica that does not provably
   hold its base is copied in full with a ``replica_*`` reason) -> mark the replica **dirty**
   (durable) -> copy the changed blocks -> **flush the target** -> mark it **clean** at the new
   change ID with its hash tree (durable); with restore points kept (``[points]``), the sync
   begins its point before "dirty", saves the old bytes of every area durably before writing
   it, and commits its point (then drops what the policy no longer keeps) after "clean"
   (``consumers/replica/points.py``);
2. publish ``ChangeIdCommitted`` (or ``SyncFailed``) and wait for ``acks=all``;
3. let the executor release what it holds for the sync (e.g. the vSphere snapshot);
4. commit the offset in the copier's consumer group, only once the outcome of **every** record
   at or below it in its partition is acknowledged.

Order per disk, not per partition (``consumers/schedule.py``, pure): plans of different disks
run concurrently even when they share a partition, at most ``copier.max_parallel_disks`` copies
at a time; the plans of one disk run one after another in offset order, and a disk's next plan
starts only once the previous one's outcome is acknowledged (a disk never has two copies at
once). A copy slot frees as soon as step 1 ends, so steps 2-3 of one plan overlap the copy of
the next. When a slot frees, the oldest waiting plan whose disk is free starts.

Source limits: a copy is a VDDK/NFC session on the ESXi host that runs the VM, reading one
datastore, so at most ``copier.max_copies_per_esxi_host`` copies of one host's VMs and
``copier.max_copies_per_datastore`` of one datastore's disks run at once
(``consumers.queued.sources``). A plan held back by its host leaves the free slot to the plans
of other hosts, and its queued reports say which limit holds it.

Commits are gap-aware: a partition's offset is committed only below its lowest record not
finished (a long seeding copy holds the commits of its partition back, not the copies of the
disks behind it), every ``COMMIT_EVERY`` records or when nothing of the partition waits. So an
offset is never committed before the outcomes of the plans it covers were published, and a
crash re-reads every record whose outcome was not acknowledged.

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

Failures: a plan whose outcome cannot be published (Kafka away for longer than the publish
retries) or that hits a bug stays at the head of its disk's queue, its offset holding the
partition's commits back, and runs again after a delay from the record the copier holds (a
crash meanwhile re-reads it from Kafka).

Waiting is not silence (``consumers/queued.py``): every plan held but not started is reported
as ``SyncProgress(state="queued", queue_position=n, wait_reason=...)`` every
``queued.report_interval`` seconds, so the planner's silent-sync time-out measures the silence
of the copier holding it.

Bounded memory: a partition with ``copier.max_waiting_per_partition`` plans waiting is paused
(its records stay in Kafka) and resumed at half of it; the consumer keeps polling while copies
run, so long copies do not trigger a rebalance. A revoked partition's copies are cancelled (the
engine's checkpoints let the new owner resume them), outcomes being published finish (they are
facts), what is finished is committed, and its waiting plans are forgotten.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, KafkaError
from pydantic import BaseModel

from cbtstream.config import Settings
from cbtstream.errors import CbtStreamError, PermissionDenied
from cbtstream.kafka import client_kwargs, copier_group_id, topic_name
from cbtstream.log import bind_disk
from consumers.executor import ProgressUpdate, SyncExecutor, SyncResult
from consumers.ledger import SyncLedger
from consumers.queued import queued_reports, report_interval, source_limits, sources
from consumers.replica.session import OutcomeAlreadyPublished
from consumers.schedule import Schedule, Stage, Work
from schemas.codec import EventDecodeError, Headers, dead_letter_record, decode
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
#: Records of one partition finished before their offsets are committed while more of the
#: partition waits: one commit (a broker round trip) per batch instead of one per plan.
COMMIT_EVERY = 256
#: How long a revocation waits to commit what finished (the rebalance waits for it); after
#: that the next owner redoes those plans (idempotently).
REVOKE_COMMIT_TIMEOUT_S = 10.0
#: Records per poll. Large polls mean fewer fetch requests and fewer offset commits.
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
        bytes_read=result.bytes_read,
        bytes_changed=result.bytes_changed,
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


@dataclass(frozen=True)
class _BadRecord:
    """A record that is neither a plan nor a superseded snapshot: it goes to the dead letters."""

    rec: ConsumerRecord[bytes, bytes]
    error: str


_Item = SyncPlanned | _BadRecord
_Work = Work[TopicPartition, _Item]


class PlanConsumer(Protocol):
    """What the copier asks of its Kafka consumer: ``AIOKafkaConsumer`` (a fake in tests)."""

    def subscribe(self, topics: list[str], listener: ConsumerRebalanceListener) -> None: ...
    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def getmany(self, *, timeout_ms: int
                      ) -> dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]: ...
    def pause(self, *partitions: TopicPartition) -> None: ...
    def resume(self, *partitions: TopicPartition) -> None: ...
    def assignment(self) -> set[TopicPartition]: ...
    async def commit(self, offsets: dict[TopicPartition, int]) -> None: ...


class OutcomePublisher(Protocol):
    """What the copier asks of its publisher (:class:`cbtstream.kafka.Publisher`)."""

    async def publish(self, event: BaseModel) -> tuple[int, int]: ...
    async def publish_raw(self, topic: str, key: bytes | None, value: bytes,
                          headers: Headers) -> tuple[int, int]: ...


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, copier: Copier) -> None:
        self._copier = copier

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self._copier._drop_partitions(revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        return None


class Copier:
    """Consumer group of its pool (:func:`cbtstream.kafka.copier_group_id`) on ``cbt.sync.planned``.

    **Pools.** Every pool's copiers read the one plans topic in a consumer group of their own
    and run only the plans of their pool (``SyncPlanned.pool``, decided by the planner); the
    others pass at once. Each group has its own assignment and committed offsets, so a
    rebalance in one pool never hands a plan to another pool's copier, and plans stay in one
    topic for auditors and console tools (reading every plan costs each pool a few hundred
    bytes per disk and cycle: 15,000 disks every 15 minutes is about 17 records a second)."""

    def __init__(
        self,
        settings: Settings,
        executor: SyncExecutor,
        publisher: OutcomePublisher,
        *,
        consumer: PlanConsumer | None = None,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        self.settings = settings
        self.executor = executor
        self.ledger = SyncLedger(settings.copier.state_dir / "finished")
        self.ledger.prune()
        self.publisher = publisher
        self._sleep = sleep
        k = settings.kafka
        self.pool = settings.copier.pool
        self.group_id = copier_group_id(k.topic_prefix, self.pool)
        self.consumer: PlanConsumer = consumer if consumer is not None else AIOKafkaConsumer(
            **client_kwargs(k),
            group_id=self.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=MAX_POLL_RECORDS,
        )
        c = settings.copier
        self.schedule: Schedule[TopicPartition, _Item] = Schedule(
            c.max_parallel_disks, c.max_waiting_per_partition, COMMIT_EVERY,
            limits=source_limits(c))
        self._tasks: dict[_Work, asyncio.Task[None]] = {}
        self._commit_wanted = asyncio.Event()
        self._commit_lock = asyncio.Lock()
        #: Syncs reported queued in the latest round: their start is reported at once.
        self._reported_queued: set[uuid.UUID] = set()
        self._background: set[asyncio.Task[Any]] = set()
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        """Consume until :meth:`request_stop` is called (or the task is cancelled)."""
        self.consumer.subscribe(
            [topic_name(SYNC_PLANNED, self.settings.kafka)], listener=_Listener(self)
        )
        await self.consumer.start()
        helpers = [asyncio.create_task(self._committer(), name="copier-commits"),
                   asyncio.create_task(self._report_queued(), name="copier-queued")]
        try:
            while not self._stopping.is_set():
                batch = await self.consumer.getmany(timeout_ms=300)
                if not batch:
                    continue
                assigned = self.consumer.assignment()
                for tp, records in batch.items():
                    if tp in assigned:
                        for rec in records:
                            self._admit(tp, rec)
                self._commit_wanted.set()
                self._kick()
        finally:
            await self._drop_partitions(self.schedule.partitions())
            for task in (*helpers, *self._background):
                task.cancel()
            for task in (*helpers, *self._background):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await self.consumer.stop()

    def request_stop(self) -> None:
        self._stopping.set()

    # -- scheduling -----------------------------------------------------------------------------
    def _admit(self, tp: TopicPartition, rec: ConsumerRecord[bytes, bytes]) -> None:
        """Hand one fetched record to the schedule, keyed by its disk."""
        try:
            event = decode(rec.value, key=rec.key, expect=(SyncPlanned, SyncSuperseded))
        except EventDecodeError as exc:
            # Its own key: a bad record waits for no disk and no disk waits for it.
            self.schedule.add(tp, rec.offset, f"dead-letter:{tp.topic}/{tp.partition}@{rec.offset}",
                              _BadRecord(rec, str(exc)))
            return
        if isinstance(event, SyncPlanned) and event.pool == self.pool:
            self.schedule.add(tp, rec.offset, event.disk.key, event, sources(event))
        elif isinstance(event, SyncPlanned):
            self.schedule.passed(tp, rec.offset)  # another pool's: its own group runs it
        else:
            self.schedule.passed(tp, rec.offset)  # superseded snapshots: the lifecycle's business

    def _kick(self) -> None:
        """Start every plan that may start now, then pause or resume partitions for the bound."""
        while (work := self.schedule.next()) is not None:
            self._tasks[work] = asyncio.create_task(self._run_work(work),
                                                    name=f"copier-{work.key}")
        pause, resume = self.schedule.flow()
        assigned = self.consumer.assignment()
        if to_pause := [tp for tp in pause if tp in assigned]:
            self.consumer.pause(*to_pause)
        if to_resume := [tp for tp in resume if tp in assigned]:
            self.consumer.resume(*to_resume)

    async def _run_work(self, work: _Work) -> None:
        """One record from start to acknowledged outcome; tells the schedule how it ended."""
        try:
            await self._process(work)
        except asyncio.CancelledError:
            self.schedule.abandon(work)
            raise
        except Exception as exc:
            # Kafka unreachable for longer than the publish retries, or a bug: the record stays
            # at the head of its disk's queue and holds its partition's commits back.
            log.error("record not processed; it will be retried", extra={
                "tp": str(work.partition), "offset": work.offset, "error": str(exc)})
            try:
                await self._sleep(RETRY_DELAYS[0])
            except asyncio.CancelledError:
                self.schedule.abandon(work)
                raise
            self.schedule.retry(work)
        else:
            self.schedule.done(work)
            self._commit_wanted.set()
        finally:
            self._tasks.pop(work, None)
            self._kick()

    async def _drop_partitions(self, tps: list[TopicPartition]) -> None:
        """Revoked (or stopping): forget the partitions' waiting plans, cancel their copies
        (checkpointed: the new owner resumes them), let outcomes being published finish (they
        are facts), then commit what is finished."""
        active = [w for tp in tps for w in self.schedule.revoke(tp)]
        tasks = [self._tasks[w] for w in active if w in self._tasks]
        for work in active:
            if work.stage == Stage.RUNNING and work in self._tasks:
                self._tasks[work].cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        points = {tp: p for tp in tps if (p := self.schedule.forget(tp)) is not None}
        try:  # best effort: aiokafka retries a commit while the coordinator is away
            await asyncio.wait_for(self._commit(points), REVOKE_COMMIT_TIMEOUT_S)
        except TimeoutError:
            log.warning("offset commit at revocation timed out; the next owner redoes the plans",
                        extra={"offsets": {str(tp): o for tp, o in points.items()}})

    # -- offsets --------------------------------------------------------------------------------
    async def _committer(self) -> None:
        """Commit what is due whenever something finished (one request for all partitions)."""
        while True:
            await self._commit_wanted.wait()
            self._commit_wanted.clear()
            if not await self._commit(self.schedule.due_commits()):
                await asyncio.sleep(RETRY_DELAYS[0])
                self._commit_wanted.set()

    async def _commit(self, offsets: dict[TopicPartition, int]) -> bool:
        """Commit ``offsets`` of the partitions still assigned; False: try again later."""
        async with self._commit_lock:
            assigned = self.consumer.assignment()
            offsets = {tp: o for tp, o in offsets.items() if tp in assigned}
            if not offsets:
                return True
            try:
                await self.consumer.commit(offsets)
            except CommitFailedError as exc:
                # The partitions moved to another member: it redoes these plans idempotently.
                log.warning("offset commit refused", extra={"error": str(exc)})
                return True
            except KafkaError as exc:
                # Coordinator unavailable (broker restart): offsets are cumulative, so the next
                # successful commit covers these records too.
                log.warning("offset commit failed", extra={"error": str(exc)})
                return False
            self.schedule.committed(offsets)
            return True

    # -- waiting is not silence -----------------------------------------------------------------
    async def _report_queued(self) -> None:
        interval = report_interval(self.settings)
        while True:
            await asyncio.sleep(interval)
            await self._publish_queued()

    async def _publish_queued(self) -> None:
        """One ``SyncProgress(state="queued")`` per plan held and not started."""
        reports = queued_reports(
            ((w.item, self.schedule.waits_for(w)) for w in self.schedule.waiting()
             if isinstance(w.item, SyncPlanned)),
            (w.item for w in self.schedule.active() if isinstance(w.item, SyncPlanned)))
        self._reported_queued = {r.sync_id for r in reports}
        results = await asyncio.gather(*(self.publisher.publish(r) for r in reports),
                                       return_exceptions=True)
        if lost := sum(isinstance(r, Exception) for r in results):
            log.warning("queued reports not published", extra={"count": lost})

    def _report_start(self, plan: SyncPlanned) -> None:
        """A plan reported queued starts: say so now, not at its first progress."""
        if plan.sync_id not in self._reported_queued:
            return
        self._reported_queued.discard(plan.sync_id)

        async def publish() -> None:
            with contextlib.suppress(CbtStreamError):
                await self.publisher.publish(SyncProgress(
                    disk=plan.disk, sync_id=plan.sync_id, bytes_done=0, bytes_total=0,
                    rate_bytes_per_s=0.0, state="running"))

        task = asyncio.create_task(publish())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- one record -----------------------------------------------------------------------------
    async def _process(self, work: _Work) -> None:
        """Steps 1-3 of one record. Its copy slot is freed as soon as step 1 ends."""
        item = work.item
        try:
            if isinstance(item, _BadRecord):
                await self._dead_letter(item)
                return
            outcome = await self._copy(item)
        finally:
            self.schedule.copied(work)
            self._kick()
        if outcome is not None:
            await self._finish(item, outcome)

    async def _dead_letter(self, bad: _BadRecord) -> None:
        rec = bad.rec
        k, v, h = dead_letter_record(
            rec.topic, rec.partition, rec.offset, rec.key, rec.value, bad.error, "copier"
        )
        log.warning("dead letter", extra={"offset": rec.offset, "error": bad.error[:300]})
        await self.publisher.publish_raw(topic_name(DEADLETTER, self.settings.kafka), k, v, h)

    async def _copy(self, plan: SyncPlanned) -> ChangeIdCommitted | SyncFailed | None:
        """Step 1 (copy and flush, with retries); returns the outcome to publish (None: the
        outcome was published before and the plan is skipped)."""
        published = self.ledger.finished(plan.sync_id)
        with bind_disk(plan.disk.key):
            if published and not self.executor.guards_replicas:
                log.info("plan redelivered after its outcome was published; skipped",
                         extra={"sync_id": str(plan.sync_id)})
                return None
            self._report_start(plan)
            if log.isEnabledFor(logging.INFO):
                log.info(
                    "sync started",
                    extra={
                        "sync_id": str(plan.sync_id),
                        "replication_type": plan.replication_type,
                        "base_change_id": plan.base_change_id,
                    },
                )
            return await self._execute_with_retries(plan, published)

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
