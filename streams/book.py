"""A book of control records: a compacted topic read whole into memory, by every worker.

Every planner worker reads the whole topic (all partitions, no consumer group, from the
beginning), so each worker knows every record whatever disks it owns, and a restarted worker
knows them all again: the compacted topic *is* the table. The planner does not plan before the
book has read up to the end offsets it found at start (:meth:`ControlBook.wait_ready`): a record
published before a snapshot is never missed because the worker had just started. After that,
new records apply from the moment the book reads them. The latest record per key wins (by its
``occurred_at``; a tombstone drops the key).

Two books: the change-ID fences (``streams.fences``) and the replication holds
(``streams.holds``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime
from typing import Generic, Protocol, TypeVar

from aiokafka import AIOKafkaConsumer, TopicPartition
from pydantic import BaseModel, ValidationError

from cbtstream.config import KafkaSettings
from cbtstream.kafka import client_kwargs, topic_name, topic_partitions
from schemas.topics import TopicSpec


class ControlRecord(Protocol):
    """What a book keeps: a pydantic model with a key and a time (``ChangeIdFence``,
    ``ReplicationHold``)."""

    @property
    def key(self) -> str: ...

    @property
    def occurred_at(self) -> datetime: ...

    def model_dump(self, *, mode: str = ...) -> dict[str, object]: ...


R = TypeVar("R", bound=ControlRecord)


class ControlBook(Generic[R]):
    """``await book.run()`` in the background; the latest record per key in ``records``."""

    def __init__(self, settings: KafkaSettings, spec: TopicSpec, model: type[BaseModel],
                 log: logging.Logger, name: str) -> None:
        #: What a record is called in the log ("fence", "hold").
        self.name = name
        self.settings = settings
        self.spec = spec
        self.model = model
        self.log = log
        self.records: dict[str, R] = {}
        #: Log each record as it applies (a worker's book); the command line's reads do not.
        self.announce = True
        self._ready = asyncio.Event()

    def parse(self, value: bytes | None) -> R | None:
        """A record's value; None for a tombstone or a value that is not the book's model."""
        if not value:
            return None
        try:
            record: R = self.model.model_validate_json(value)  # type: ignore[assignment]
            return record
        except ValidationError as exc:
            self.log.warning(f"not a {self.name} record",
                             extra={"error": str(exc)[:300]})
            return None

    def apply(self, key: bytes | None, value: bytes | None) -> None:
        record = self.parse(value)
        if record is None:
            if key is not None and not value:
                self.records.pop(key.decode(errors="replace"), None)
            return
        current = self.records.get(record.key)
        if current is None or record.occurred_at >= current.occurred_at:
            self.records[record.key] = record
            if self.announce:
                self.log.info(self.name, extra={self.name: record.model_dump(mode="json")})

    def ready(self) -> bool:
        return self._ready.is_set()

    async def wait_ready(self) -> None:
        await self._ready.wait()

    async def run(self) -> None:
        """Read the topic for as long as the worker runs (retrying after broker errors)."""
        while True:
            try:
                await self._read()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the broker went away: read again from the start
                self.log.warning(f"{self.name} book: reading again",
                                 extra={"topic": self.spec.name, "error": str(exc)[:300]})
                await asyncio.sleep(2.0)

    async def _read(self) -> None:
        consumer = AIOKafkaConsumer(**client_kwargs(self.settings), group_id=None,
                                    enable_auto_commit=False, auto_offset_reset="earliest")
        await consumer.start()
        try:
            name = topic_name(self.spec, self.settings)
            try:
                tps = await topic_partitions(consumer, name, timeout_s=10.0)
            except LookupError:
                # No record was ever possible (`cbtstream topics create` makes the topic):
                # plan without, and look again later.
                self.log.warning(f"{self.name} topic missing; planning without {self.name}s",
                                 extra={"topic": name})
                self._ready.set()
                await asyncio.sleep(30.0)
                return
            # The offsets first, then an explicit seek: asked after ``seek_to_beginning`` they
            # waited for its offset reset (half a second a read, most of `cbtstream status`'s
            # own time); an empty topic is read at once.
            begin = await consumer.beginning_offsets(tps)
            end = await consumer.end_offsets(tps)
            consumer.assign(tps)
            for tp in tps:
                consumer.seek(tp, begin[tp])
            while True:
                if not self._ready.is_set() and await _positions_reached(consumer, end):
                    self._ready.set()
                    if self.announce:
                        self.log.info(f"{self.name} book ready",
                                      extra={f"{self.name}s": len(self.records)})
                batch = await consumer.getmany(timeout_ms=500)
                for records in batch.values():
                    for r in records:
                        self.apply(r.key, r.value)
        finally:
            with contextlib.suppress(Exception):
                await consumer.stop()


async def _positions_reached(consumer: AIOKafkaConsumer,
                             end: dict[TopicPartition, int]) -> bool:
    for tp, offset in end.items():
        if await consumer.position(tp) < offset:
            return False
    return True


async def read_book(book: ControlBook[R], timeout_s: float = 30.0) -> list[R]:
    """Every record of ``book``'s topic as of now (for the command line)."""
    book.announce = False
    task = asyncio.create_task(book.run())
    try:
        await asyncio.wait_for(book.wait_ready(), timeout_s)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return sorted(book.records.values(), key=lambda r: r.occurred_at)
