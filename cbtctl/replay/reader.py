"""The Kafka adapter of the replay: read cbtstream's topics without a consumer group, and measure
the pipeline's consumer lag.

The reader never joins a consumer group (``group_id=None``, partitions assigned by hand), so a
replay can never take partitions away from the planner, the copier or the audit writer, and it
commits nothing. It reads up to the end offsets seen when it started: a consistent snapshot of the
log even while the pipeline keeps writing.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import TracebackType

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from cbtctl.replay.records import Coord, LogRecord
from cbtstream.config import KafkaSettings, Settings
from cbtstream.errors import CbtStreamError
from cbtstream.kafka import (
    KafkaUnavailable,
    client_kwargs,
    committed_offsets,
    copier_group_id,
    offset_clients,
    topic_name,
    topic_partitions,
)
from schemas.codec import EventDecodeError, decode
from schemas.events import DEFAULT_POOL
from schemas.topics import (
    AUDITED_TOPICS,
    CHANGEID_COMMITTED,
    DISK_SKIPPED,
    SNAPSHOT_REMOVED,
    SNAPSHOT_TAKEN,
    SYNC_FAILED,
    SYNC_PLANNED,
    SYNC_PROGRESS,
    TopicSpec,
)

#: Every topic that carries disk events (the dead-letter topic is not part of a disk's history).
DISK_TOPICS: tuple[TopicSpec, ...] = (
    SNAPSHOT_TAKEN, SYNC_PLANNED, CHANGEID_COMMITTED, SYNC_FAILED, SYNC_PROGRESS, SNAPSHOT_REMOVED,
    DISK_SKIPPED,
)
#: How long to wait for topic metadata before declaring a topic missing.
METADATA_TIMEOUT_S = 10.0


class ReplayError(CbtStreamError):
    """The log cannot be read as asked (missing topic, bad offsets)."""

    reason = "replay_error"


@dataclass(frozen=True)
class StartAt:
    """Where to start reading: the beginning (default), the first record at or after a time
    (``since_ms``, via offsets-for-times), and/or explicit offsets per (base topic, partition)
    that win over both."""

    since_ms: int | None = None
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)

    @property
    def from_beginning(self) -> bool:
        return self.since_ms is None and not self.offsets


def parse_offsets(items: list[str]) -> dict[tuple[str, int], int]:
    """``cbt.changeid.committed:0:42`` -> {("cbt.changeid.committed", 0): 42}."""
    out: dict[tuple[str, int], int] = {}
    for item in items:
        topic, _, rest = item.rpartition(":")
        topic, _, part = topic.rpartition(":")
        try:
            out[(topic, int(part))] = int(rest)
        except ValueError:
            raise ReplayError(f"bad offset {item!r}: expected TOPIC:PARTITION:OFFSET") from None
        if not topic or out[(topic, int(part))] < 0:
            raise ReplayError(f"bad offset {item!r}: expected TOPIC:PARTITION:OFFSET")
    return out


class LogReader:
    """Reads cbtstream's disk topics, group-less. ``async with LogReader(settings) as r``."""

    def __init__(self, settings: KafkaSettings, topics: tuple[TopicSpec, ...] = DISK_TOPICS
                 ) -> None:
        self._settings = settings
        self._topics = topics
        self._consumer = AIOKafkaConsumer(
            **client_kwargs(settings), group_id=None, enable_auto_commit=False,
            auto_offset_reset="earliest", max_partition_fetch_bytes=4 * 1024 * 1024)
        self._started = False

    async def start(self) -> None:
        if not self._started:
            try:
                await self._consumer.start()
            except KafkaError as exc:
                raise KafkaUnavailable(f"cannot connect to Kafka: {exc}") from exc
            self._started = True

    async def stop(self) -> None:
        if self._started:
            self._started = False
            await self._consumer.stop()

    async def __aenter__(self) -> LogReader:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    async def _partitions(self) -> dict[TopicPartition, TopicSpec]:
        out: dict[TopicPartition, TopicSpec] = {}
        for spec in self._topics:
            try:
                tps = await topic_partitions(self._consumer, topic_name(spec, self._settings),
                                             timeout_s=METADATA_TIMEOUT_S)
            except LookupError as exc:
                raise ReplayError(str(exc)) from exc
            out.update(dict.fromkeys(tps, spec))
        return out

    async def read(self, start: StartAt) -> list[LogRecord]:
        """Every record from ``start`` up to the end offsets as of now, decoded."""
        return [_record(r.spec, r.topic, r.partition, r.offset, r.timestamp_ms, r.key, r.value)
                for r in await self.read_raw(start)]

    async def read_raw(self, start: StartAt, *, cap: dict[TopicPartition, int] | None = None
                       ) -> list[RawRecord]:
        """Undecoded records from ``start`` up to the end offsets as of now, or up to ``cap``
        for the partitions it names (an offset such as a consumer group's committed one)."""
        try:
            return await self._read(start, cap or {})
        except KafkaError as exc:
            raise KafkaUnavailable(f"reading the log failed: {exc}") from exc

    async def _read(self, start: StartAt, cap: dict[TopicPartition, int]) -> list[RawRecord]:
        c = self._consumer
        tps = await self._partitions()
        c.assign(list(tps))
        begin = await c.beginning_offsets(list(tps))
        end = await c.end_offsets(list(tps))
        end = {tp: min(off, cap.get(tp, off)) for tp, off in end.items()}
        at: dict[TopicPartition, int] = dict(begin)
        if start.since_ms is not None:
            found = await c.offsets_for_times({tp: start.since_ms for tp in tps})
            at = {tp: (found[tp].offset if found.get(tp) is not None else end[tp])
                  for tp in tps}
        for (base, part), off in start.offsets.items():
            tp = TopicPartition(topic_name(_spec(base, self._topics), self._settings), part)
            if tp not in tps:
                raise ReplayError(f"no partition {part} in {tp.topic}")
            at[tp] = max(off, begin[tp])
        todo = {tp for tp in tps if at[tp] < end[tp]}
        for tp in tps:
            c.seek(tp, at[tp])
        records: list[RawRecord] = []
        while todo:
            batch = await c.getmany(*todo, timeout_ms=500)
            for tp, msgs in batch.items():
                spec = tps[tp]
                for m in msgs:
                    if m.offset >= end[tp]:
                        break
                    records.append(RawRecord(spec, tp.topic, tp.partition, m.offset,
                                             m.timestamp, m.key, m.value))
            for tp in list(todo):
                if await c.position(tp) >= end[tp]:
                    todo.discard(tp)
        return records


@dataclass(frozen=True)
class RawRecord:
    """A record as read, before decoding."""

    spec: TopicSpec
    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None


def _spec(base: str, topics: tuple[TopicSpec, ...]) -> TopicSpec:
    for spec in topics:
        if spec.name == base:
            return spec
    raise ReplayError(f"{base!r} is not one of {', '.join(s.name for s in topics)}")


def _record(spec: TopicSpec, topic: str, partition: int, offset: int, ts: int,
            key: bytes | None, value: bytes | None) -> LogRecord:
    coord = Coord(topic, partition, offset)
    key_text = key.decode(errors="replace") if key is not None else None
    try:
        ev = decode(value, key=key, expect=spec.value_types)
    except EventDecodeError as exc:
        return LogRecord(coord, spec.name, ts, key_text, None, str(exc))
    return LogRecord(coord, spec.name, ts, key_text, ev)


# -- consumer lag ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stage:
    """One consumer group of the pipeline and the topics it consumes."""

    name: str
    group: str
    inputs: tuple[TopicSpec, ...]


@dataclass(frozen=True)
class PartitionLag:
    topic: str
    partition: int
    committed: int | None
    end: int
    lag: int


@dataclass(frozen=True)
class StageLag:
    stage: Stage
    partitions: tuple[PartitionLag, ...]

    @property
    def lag(self) -> int:
        return sum(p.lag for p in self.partitions)

    @property
    def started(self) -> bool:
        """The group has committed an offset for at least one of its input partitions."""
        return any(p.committed is not None for p in self.partitions)


def pipeline_stages(settings: Settings) -> tuple[Stage, ...]:
    """The consumer groups of the pipeline. The planner's group is the Faust app id; each
    copier pool the configuration names has its own group (``copier`` for the default pool,
    ``copier:<pool>`` for the others)."""
    prefix = settings.kafka.topic_prefix
    pools = sorted({DEFAULT_POOL, settings.pools.default, settings.copier.pool,
                    *(a.pool for a in settings.pools.assign)}, key=lambda p: (p != DEFAULT_POOL, p))
    return (
        Stage("planner", f"{prefix}{settings.streams.app_id}",
              (SNAPSHOT_TAKEN, CHANGEID_COMMITTED, SYNC_FAILED)),
        *(Stage("copier" if pool == DEFAULT_POOL else f"copier:{pool}",
                copier_group_id(prefix, pool), (SYNC_PLANNED,)) for pool in pools),
        Stage("audit", f"{prefix}cbtstream-audit", AUDITED_TOPICS),
    )


async def _nothing() -> dict[TopicPartition, int]:
    return {}


async def consumer_lag(settings: KafkaSettings, stages: tuple[Stage, ...]) -> list[StageLag]:
    """Committed offsets of each stage's group against the end offsets of its inputs. A
    partition the group never committed counts from its beginning (all of it is unread)."""
    try:
        async with offset_clients(settings) as (admin, consumer):
            names = {n: [topic_name(s, settings) for s in stage.inputs] for n, stage in
                     enumerate(stages)}
            # metadata of our topics only (a shared broker may hold thousands of others)
            await consumer._client.set_topics(sorted({t for ts in names.values() for t in ts}))
            tps = {n: [TopicPartition(t, p) for t in ts
                       for p in sorted(consumer.partitions_for_topic(t) or ())]
                   for n, ts in names.items()}
            every = sorted({tp for ts in tps.values() for tp in ts})
            # one round: every group's commits, and the ends of every partition, at once
            committed, end, begin = await asyncio.gather(
                asyncio.gather(*(committed_offsets(admin, stage.group, tps[n]) if tps[n]
                                 else _nothing() for n, stage in enumerate(stages))),
                consumer.end_offsets(every) if every else _nothing(),
                consumer.beginning_offsets(every) if every else _nothing())
            out = []
            for n, stage in enumerate(stages):
                parts = []
                for tp in tps[n]:
                    off = committed[n].get(tp)
                    parts.append(PartitionLag(tp.topic, tp.partition, off, end[tp],
                                              max(0, end[tp] - (off if off is not None
                                                                else begin[tp]))))
                out.append(StageLag(stage, tuple(parts)))
            return out
    except KafkaError as exc:
        raise KafkaUnavailable(f"reading consumer offsets failed: {exc}") from exc
