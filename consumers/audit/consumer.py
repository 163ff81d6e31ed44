"""The audit consumer: every topic of the catalogue into PostgreSQL, idempotently.

Consumer group ``<prefix>cbtstream-audit`` on ``schemas.topics.AUDITED_TOPICS`` (the disk topics,
the dead letters, the fences, the scheduler's events and the VM descriptions), manual offset
commits. Order of effects per batch (one ``getmany``):

1. decode every record (``consumers.audit.decoding``); an undecodable one is published to
   ``cbt.deadletter`` (stage ``audit``) and skipped (a broken record *of* the dead-letter topic is
   only logged: no loops); a tombstone of the compacted fences topic is skipped (debug log);
2. in one database transaction, insert the events (``on conflict (event_id) do nothing``) and
   apply the projections of the new ones, then **commit the transaction**;
3. **commit the offsets** of the batch.

A crash before 3 redelivers the batch; the events are then duplicates and change nothing. If
PostgreSQL is unreachable, the batch is kept, every partition is paused (the consumer keeps
polling so it stays in the group) and the write is retried with backoff until it succeeds or the
consumer is stopped; offsets are never committed for rows that are not in the database. A batch
PostgreSQL refuses for its content is retried event by event, and the event it refuses goes to the
dead-letter topic, so one bad event cannot stop the audit trail.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError

from cbtstream.config import Settings
from cbtstream.errors import CbtStreamError
from cbtstream.kafka import Publisher, client_kwargs, topic_name
from consumers.audit.decoding import audited_event
from consumers.audit.repository import AuditError, AuditRecord, AuditRepository
from schemas.codec import EventDecodeError, dead_letter_record
from schemas.topics import AUDITED_TOPICS, DEADLETTER, TopicSpec

log = logging.getLogger("cbtstream.audit")

#: Backoff between retries while PostgreSQL (or Kafka, for dead letters) is unreachable; the last
#: value repeats. Capped well below max.poll.interval.ms (5 min) although we keep polling anyway.
RETRY_DELAYS = (0.5, 1.0, 2.0, 5.0, 10.0)
STAGE = "audit"


@dataclass
class _Batch:
    records: list[AuditRecord] = field(default_factory=list)
    letters: list[tuple[bytes | None, bytes, list[tuple[str, bytes]]]] = field(
        default_factory=list)
    offsets: dict[TopicPartition, int] = field(default_factory=dict)


@dataclass
class AuditStats:
    """Counters since start (for logs, tests and throughput figures)."""

    batches: int = 0
    records: int = 0
    stored: int = 0
    dead_letters: int = 0
    retries: int = 0
    busy_s: float = 0.0


class AuditConsumer:
    """Consumer group ``<prefix>cbtstream-audit`` on the audited topics -> the repository."""

    def __init__(self, settings: Settings, repository: AuditRepository, publisher: Publisher, *,
                 max_records: int = 1000, migrate: bool = False) -> None:
        self.settings = settings
        self.migrate = migrate
        self.repository = repository
        self.publisher = publisher
        self.max_records = max_records
        k = settings.kafka
        self.group_id = f"{k.topic_prefix}cbtstream-audit"
        self._specs: dict[str, TopicSpec] = {topic_name(s, k): s for s in AUDITED_TOPICS}
        self.consumer = AIOKafkaConsumer(
            **client_kwargs(k),
            group_id=self.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=max_records,
        )
        self.stats = AuditStats()
        self._stopping = asyncio.Event()

    def request_stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        """Consume until :meth:`request_stop` (or cancellation). With ``migrate``, apply pending
        schema migrations first (waiting for PostgreSQL if it is down)."""
        if self.migrate and not await self._migrate():
            return
        self.consumer.subscribe(sorted(self._specs))
        await self.consumer.start()
        log.info("audit consumer started", extra={"group": self.group_id,
                                                  "schema": self.repository.schema})
        try:
            while not self._stopping.is_set():
                fetched = await self.consumer.getmany(timeout_ms=300,
                                                      max_records=self.max_records)
                if not fetched:
                    continue
                t0 = time.monotonic()
                batch = self._prepare(fetched)
                if await self._store(batch):
                    await self._commit(batch.offsets)
                self.stats.busy_s += time.monotonic() - t0
        finally:
            await self.consumer.stop()
            log.info("audit consumer stopped", extra={"stats": self.stats.__dict__})

    async def _migrate(self) -> bool:
        attempt = 0
        while not self._stopping.is_set():
            try:
                await self.repository.migrate()
                return True
            except CbtStreamError as exc:
                if not exc.retriable:
                    raise
                delay = RETRY_DELAYS[min(attempt, len(RETRY_DELAYS) - 1)]
                attempt += 1
                log.warning("audit database unavailable, waiting", extra={
                    "attempt": attempt, "delay_s": delay, "error": str(exc)[:300]})
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
        return False

    # -- steps ----------------------------------------------------------------------------------
    def _prepare(self, fetched: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]],
                 batch: _Batch | None = None) -> _Batch:
        batch = batch or _Batch()
        for tp, recs in fetched.items():
            for rec in recs:
                self.stats.records += 1
                batch.offsets[tp] = max(batch.offsets.get(tp, 0), rec.offset + 1)
                self._decode_into(batch, rec)
        return batch

    def _decode_into(self, batch: _Batch, rec: ConsumerRecord[bytes, bytes]) -> None:
        spec = self._specs[rec.topic]  # subscribed to exactly these
        where = {"topic": rec.topic, "partition": rec.partition, "offset": rec.offset}
        try:
            event = audited_event(spec, rec.key, rec.value)
        except EventDecodeError as exc:
            if spec is DEADLETTER:
                log.error("unreadable dead letter skipped",
                          extra={**where, "error": str(exc)[:300]})
                return
            log.warning("dead letter", extra={**where, "error": str(exc)[:300]})
            batch.letters.append(dead_letter_record(rec.topic, rec.partition, rec.offset,
                                                    rec.key, rec.value, str(exc), STAGE))
            return
        if event is None:
            log.debug("fence tombstone skipped", extra={
                **where, "key": (rec.key or b"").decode(errors="replace")[:200]})
            return
        batch.records.append(AuditRecord(rec.topic, rec.partition, rec.offset, event))

    async def _store(self, batch: _Batch) -> bool:
        """Dead letters out, rows in; retries transient failures until stopped. True: done."""
        attempt = 0
        while True:
            try:
                await self._send_letters(batch)
                try:
                    stored = await self.repository.apply(batch.records)
                except AuditError as exc:
                    log.error("batch refused, storing event by event", extra={"error": str(exc)})
                    stored = await self._apply_singly(batch)
                self.stats.stored += stored
                self.stats.batches += 1
                if attempt:
                    log.info("audit database reachable again", extra={"attempts": attempt})
                return True
            except CbtStreamError as exc:
                if not exc.retriable:
                    raise
                delay = RETRY_DELAYS[min(attempt, len(RETRY_DELAYS) - 1)]
                attempt += 1
                self.stats.retries += 1
                log.warning("audit write failed, retrying", extra={
                    "attempt": attempt, "delay_s": delay, "error": str(exc)[:300]})
                if not await self._wait_polling(batch, delay):
                    return False

    async def _apply_singly(self, batch: _Batch) -> int:
        stored = 0
        for rec in batch.records:
            try:
                stored += await self.repository.apply([rec])
            except AuditError as exc:
                log.error("event refused by the audit database", extra={
                    "event_id": str(rec.event.event_id), "error": str(exc)[:300]})
                key, value, headers = dead_letter_record(
                    rec.topic, rec.partition, rec.offset, None,
                    rec.event.model_dump_json().encode(), str(exc), STAGE)
                batch.letters.append((key, value, headers))
        await self._send_letters(batch)
        return stored

    async def _send_letters(self, batch: _Batch) -> None:
        target = topic_name(DEADLETTER, self.settings.kafka)
        while batch.letters:
            await self.publisher.publish_raw(target, *batch.letters[0])
            batch.letters.pop(0)
            self.stats.dead_letters += 1

    async def _wait_polling(self, batch: _Batch, delay: float) -> bool:
        """Wait ``delay`` s with every partition paused, still polling so the group keeps us.
        Records of partitions assigned meanwhile join the batch. False: stop requested."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), delay)
        if self._stopping.is_set():
            return False
        self.consumer.pause(*self.consumer.assignment())
        extra = await self.consumer.getmany(timeout_ms=0)
        if extra:
            self._prepare(extra, batch)
        return True

    async def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        assigned = self.consumer.assignment()
        self.consumer.resume(*assigned)
        mine = {tp: off for tp, off in offsets.items() if tp in assigned}
        if not mine:
            return
        try:
            await self.consumer.commit(mine)
        except (CommitFailedError, KafkaError) as exc:
            # Rebalanced meanwhile: the new owner redelivers; the rows are already idempotent.
            log.warning("offset commit failed", extra={"error": str(exc)[:300]})

