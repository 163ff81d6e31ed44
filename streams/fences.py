"""The fence book: every change-ID fence, read from the compacted ``cbt.changeid.fences``.

Every planner worker reads the whole topic (all partitions, no consumer group, from the
beginning), so each worker knows every fence whatever disks it owns, and a restarted worker
knows them all again: the compacted topic *is* the table. The planner does not plan before the
book has read up to the end offsets it found at start (:meth:`FenceBook.wait_ready`): a fence
published before a snapshot is never missed because the worker had just started. After that,
new fences apply from the moment the book reads them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiokafka import AIOKafkaConsumer, TopicPartition
from pydantic import ValidationError

from cbtstream.config import KafkaSettings
from cbtstream.kafka import client_kwargs, topic_name, topic_partitions
from schemas.events import ChangeIdFence
from schemas.topics import FENCES

log = logging.getLogger("cbtstream.fences")


def parse_fence(value: bytes | None) -> ChangeIdFence | None:
    """A fence record's value; None for a tombstone or a record that is not a fence."""
    if not value:
        return None
    try:
        return ChangeIdFence.model_validate_json(value)
    except ValidationError as exc:
        log.warning("not a fence record", extra={"error": str(exc)[:300]})
        return None


class FenceBook:
    """``await book.run()`` in the background; ``book.active()`` for the planner."""

    def __init__(self, settings: KafkaSettings) -> None:
        self.settings = settings
        self.fences: dict[str, ChangeIdFence] = {}
        self._ready = asyncio.Event()

    def apply(self, key: bytes | None, value: bytes | None) -> None:
        fence = parse_fence(value)
        if fence is None:
            if key is not None and not value:
                self.fences.pop(key.decode(errors="replace"), None)
            return
        current = self.fences.get(fence.key)
        if current is None or fence.occurred_at >= current.occurred_at:
            self.fences[fence.key] = fence
            log.info("fence", extra={"fence": fence.model_dump(mode="json")})

    def active(self) -> tuple[ChangeIdFence, ...]:
        return tuple(f for f in self.fences.values() if not f.revoked)

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
                log.warning("fence book: reading again", extra={"error": str(exc)[:300]})
                await asyncio.sleep(2.0)

    async def _read(self) -> None:
        consumer = AIOKafkaConsumer(**client_kwargs(self.settings), group_id=None,
                                    enable_auto_commit=False, auto_offset_reset="earliest")
        await consumer.start()
        try:
            name = topic_name(FENCES, self.settings)
            try:
                tps = await topic_partitions(consumer, name, timeout_s=10.0)
            except LookupError:
                # No fence was ever possible (`cbtstream topics create` makes the topic): plan
                # without fences, and look again later.
                log.warning("fence topic missing; planning without fences", extra={"topic": name})
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
                    log.info("fence book ready", extra={"fences": len(self.active())})
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


async def read_fences(settings: KafkaSettings) -> list[ChangeIdFence]:
    """Every fence (revoked ones too) as of now: for ``cbtstream status`` and ``fence --list``."""
    book = FenceBook(settings)
    task = asyncio.create_task(book.run())
    try:
        await asyncio.wait_for(book.wait_ready(), 30)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return sorted(book.fences.values(), key=lambda f: f.occurred_at)
