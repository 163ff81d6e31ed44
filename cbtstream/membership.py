"""Split keys between the processes of one consumer group, and read back what each wrote.

Every process joins the group on one topic; Kafka's group protocol gives each partition one
owner. A key belongs to the partition Kafka's default partitioner gives it (murmur2, as our
publisher uses it), so a process owns the keys of its partitions **and** finds the records it
(or a previous owner) published for them there. On assignment each partition is read from a
point ``lookback_s`` back to its end before its keys count as owned: that is the new owner's
memory. On revocation ``on_revoke`` is awaited *before* the partitions go (aiokafka's eager
protocol: nobody gets them until every member has let go), so the caller finishes or stops
what it does for those keys and flushes what it publishes.

A process that loses the group without noticing (a pause longer than the session timeout)
may still act on its keys until its next poll; see docs/architecture.md "Scheduling a site".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.partitioner import murmur2

from cbtstream.config import KafkaSettings
from cbtstream.errors import ConfigError
from cbtstream.kafka import client_kwargs, topic_partitions

log = logging.getLogger(__name__)


def partition_of(key: str, partitions: int) -> int:
    """The partition Kafka's default partitioner gives ``key`` (pure)."""
    return int(murmur2(key.encode()) & 0x7FFFFFFF) % partitions


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, owner: KeyOwnership) -> None:
        self._owner = owner

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self._owner._revoked()

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        await self._owner._assigned(assigned)


class KeyOwnership:
    """Membership of ``group`` on ``topic``: :meth:`owns` says whether a key is this
    process's, ``on_record`` gets every record of the owned partitions (``key``, ``value``)."""

    def __init__(self, settings: KafkaSettings, topic: str, group: str, *,
                 lookback_s: float,
                 on_record: Callable[[bytes | None, bytes | None], None],
                 on_revoke: Callable[[], Awaitable[None]],
                 session_timeout_s: float = 10.0) -> None:
        self._topic, self._group = topic, group
        self._lookback_s = lookback_s
        self._on_record, self._on_revoke = on_record, on_revoke
        self._consumer = AIOKafkaConsumer(
            **client_kwargs(settings), group_id=group, enable_auto_commit=False,
            auto_offset_reset="latest", session_timeout_ms=int(session_timeout_s * 1000),
            heartbeat_interval_ms=1000)
        self._partitions = 0
        self._owned: frozenset[int] = frozenset()
        self._catching_up: dict[int, int] = {}  # partition -> end offset at assignment
        self._task: asyncio.Task[None] | None = None
        self.assignments = 0

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._task is not None:
            return
        await self._consumer.start()
        try:
            self._partitions = len(await topic_partitions(self._consumer, self._topic,
                                                          timeout_s=10))
        except LookupError as exc:
            await self._consumer.stop()
            raise ConfigError(f"topic {self._topic} does not exist: run `cbtstream topics "
                              "create`") from exc
        self._consumer.subscribe([self._topic], listener=_Listener(self))
        self._task = asyncio.create_task(self._poll(), name=f"membership {self._group}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        self._owned = frozenset()
        await self._consumer.stop()  # leaves the group: the others take the partitions now

    async def __aenter__(self) -> KeyOwnership:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- ownership ------------------------------------------------------------------------------
    @property
    def partitions(self) -> int:
        return self._partitions

    def ready_partitions(self) -> frozenset[int]:
        """Partitions owned and read back to their end (their keys are owned)."""
        return frozenset(p for p in self._owned if p not in self._catching_up)

    def owns(self, key: str) -> bool:
        return self._partitions > 0 and partition_of(key, self._partitions) in (
            self.ready_partitions())

    async def wait_ready(self, within_s: float) -> bool:
        """Wait until an assignment is read back; False if none within ``within_s``."""
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            if self.assignments and not self._catching_up:
                return True
            await asyncio.sleep(0.05)
        return False

    # -- rebalance ------------------------------------------------------------------------------
    async def _revoked(self) -> None:
        self._owned, self._catching_up = frozenset(), {}
        await self._on_revoke()

    async def _assigned(self, assigned: list[TopicPartition]) -> None:
        tps = [tp for tp in assigned if tp.topic == self._topic]
        since_ms = int((time.time() - self._lookback_s) * 1000)
        ends = await self._consumer.end_offsets(tps) if tps else {}
        starts = await self._consumer.offsets_for_times({tp: since_ms for tp in tps}) \
            if tps else {}
        for tp in tps:
            found = starts.get(tp)
            self._consumer.seek(tp, found.offset if found is not None else ends[tp])
        self._catching_up = {tp.partition: ends[tp] for tp in tps if ends[tp] > 0 and (
            starts.get(tp) is not None)}
        self._owned = frozenset(tp.partition for tp in tps)
        self.assignments += 1
        log.info("scheduler partitions assigned", extra={
            "group": self._group, "partitions": sorted(self._owned)})

    async def _poll(self) -> None:
        while True:
            try:
                batches = await self._consumer.getmany(timeout_ms=500)
            except KafkaError as exc:
                log.warning("membership poll failed", extra={"error": str(exc)[:300]})
                await asyncio.sleep(1)
                continue
            for tp, records in batches.items():
                for rec in records:
                    self._on_record(rec.key, rec.value)
                end = self._catching_up.get(tp.partition)
                if end is not None and records and records[-1].offset + 1 >= end:
                    del self._catching_up[tp.partition]
            for p, end in list(self._catching_up.items()):
                tp = TopicPartition(self._topic, p)
                with contextlib.suppress(Exception):
                    if tp in self._consumer.assignment() and (
                            await self._consumer.position(tp)) >= end:
                        self._catching_up.pop(p, None)
