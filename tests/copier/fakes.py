"""In-process stand-ins for the copier's collaborators: a Kafka consumer over in-memory
partitions, an executor whose copies wait until the test lets them finish, and a publisher that
keeps what it was given. Only for the in-process tests of ``consumers/copier.py``; the
integration tests use the real parts."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from pydantic import BaseModel

from cbtstream.kafka import KafkaUnavailable
from consumers.executor import ProgressCallback, ProgressUpdate, SyncResult
from consumers.queued import sources
from schemas.codec import Headers, encode
from schemas.events import (
    FullReason,
    ReplicationType,
    SyncPlanned,
    SyncSuperseded,
    stable_event_id,
)
from tests.unit.factories import EPOCH_A, disk

TOPIC = "cbt.sync.planned"


def plan(device_key: int, n: int = 1, *, host: str | None = None,
         datastore: str = "ds1") -> SyncPlanned:
    """Plan number ``n`` of disk ``device_key`` (same arguments, same plan), of a VM on ESXi
    host ``host`` with the disk on ``datastore``."""
    return SyncPlanned(
        event_id=stable_event_id("test-plan", device_key, n),
        disk=disk(device_key, capacity=1 << 20,
                  backing_file=f"[{datastore}] pgtest1/pgtest1_{device_key}.vmdk"),
        sync_id=stable_event_id("test-sync", device_key, n),
        snapshot_event_id=stable_event_id("test-snap", device_key, n),
        vm_snapshot=f"snapshot-{n}",
        replication_type=ReplicationType.FULL,
        reason=FullReason.NO_PREVIOUS_COMMIT,
        previous_change_id=None,
        base_change_id=None,
        change_id=f"{EPOCH_A}/{n}",
        generation=n,
        esxi_host=host,
    )


def superseded(device_key: int) -> SyncSuperseded:
    return SyncSuperseded(disk=disk(device_key), snapshot_event_id=uuid.uuid4(),
                          vm_snapshot="snapshot-9", superseded_by=uuid.uuid4())


class FakeConsumer:
    """One topic's partitions as lists; positions, pauses, commits and rebalances as the test
    drives them. Shaped like the part of ``AIOKafkaConsumer`` the copier uses."""

    def __init__(self, partitions: int = 1, *, max_records: int = 500) -> None:
        self.tps = [TopicPartition(TOPIC, p) for p in range(partitions)]
        self.logs: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]] = {
            tp: [] for tp in self.tps}
        self.max_records = max_records
        self.positions: dict[TopicPartition, int] = {}
        self.committed: dict[TopicPartition, int] = {}
        self.commits: list[dict[TopicPartition, int]] = []
        self.paused: set[TopicPartition] = set()
        self.pauses = 0
        self.assigned: set[TopicPartition] = set()
        self.fetched: dict[TopicPartition, list[int]] = {tp: [] for tp in self.tps}
        self.listener: ConsumerRebalanceListener | None = None
        #: Called with every commit before it is applied (a test's invariant).
        self.on_commit: Callable[[dict[TopicPartition, int]], None] | None = None

    def append(self, event: BaseModel | bytes, partition: int = 0,
               key: bytes | None = None) -> int:
        tp = self.tps[partition]
        if isinstance(event, BaseModel):
            k, value, _ = encode(event)
            key = k
        else:
            value = event
        log = self.logs[tp]
        log.append(ConsumerRecord(tp.topic, tp.partition, len(log), 0, 0, key, value, None,
                                  len(key or b""), len(value), ()))
        return len(log) - 1

    # -- the consumer's interface ---------------------------------------------------------------
    def subscribe(self, topics: list[str], listener: ConsumerRebalanceListener) -> None:
        assert topics and topics[0].endswith(TOPIC)
        self.listener = listener

    async def start(self) -> None:
        self._assign(self.tps)

    async def stop(self) -> None:
        self.assigned = set()

    async def getmany(self, *, timeout_ms: int
                      ) -> dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]:
        out = {}
        for tp in sorted(self.assigned - self.paused, key=lambda t: t.partition):
            pos = self.positions[tp]
            records = self.logs[tp][pos:pos + self.max_records]
            if records:
                self.positions[tp] = pos + len(records)
                self.fetched[tp] += [r.offset for r in records]
                out[tp] = records
        if not out:  # nothing to fetch: wait a little, as the real one waits up to timeout_ms
            await asyncio.sleep(min(timeout_ms / 1000, 0.005))
        return out

    def pause(self, *partitions: TopicPartition) -> None:
        self.pauses += 1
        self.paused |= set(partitions)

    def resume(self, *partitions: TopicPartition) -> None:
        self.paused -= set(partitions)

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        assert set(offsets) <= self.assigned, "commit of a partition not assigned"
        if self.on_commit is not None:
            self.on_commit(offsets)
        self.commits.append(dict(offsets))
        self.committed.update(offsets)

    # -- the test's levers ----------------------------------------------------------------------
    def _assign(self, tps: list[TopicPartition]) -> None:
        self.assigned |= set(tps)
        self.paused -= set(tps)
        for tp in tps:  # a new assignment starts at the group's committed offset
            self.positions[tp] = self.committed.get(tp, 0)

    async def revoke(self, *partitions: int) -> None:
        tps = [self.tps[p] for p in partitions]
        assert self.listener is not None
        await self.listener.on_partitions_revoked(tps)
        self.assigned -= set(tps)

    async def assign(self, *partitions: int) -> None:
        tps = [self.tps[p] for p in partitions]
        self._assign(tps)
        assert self.listener is not None
        await self.listener.on_partitions_assigned(tps)


@dataclass
class GatedExecutor:
    """Copies that last until the test opens their gate (per sync id, or ``open_all``)."""

    guards_replicas: bool = False
    gates: dict[uuid.UUID, asyncio.Event] = field(default_factory=dict)
    open_all: bool = False
    #: (disk key, sync id) in the order the copies started.
    started: list[tuple[str, uuid.UUID]] = field(default_factory=list)
    cancelled: list[uuid.UUID] = field(default_factory=list)
    running: set[str] = field(default_factory=set)
    most_running: int = 0
    overlaps: list[str] = field(default_factory=list)
    #: Copies running per source (ESXi host, datastore: ``consumers.queued.sources``), and the
    #: most there ever were.
    per_source: dict[tuple[str, str], int] = field(default_factory=dict)
    most_per_source: dict[tuple[str, str], int] = field(default_factory=dict)

    def gate(self, p: SyncPlanned) -> asyncio.Event:
        return self.gates.setdefault(p.sync_id, asyncio.Event())

    def finish(self, p: SyncPlanned) -> None:
        self.gate(p).set()

    def is_running(self, p: SyncPlanned) -> bool:
        return p.disk.key in self.running

    def starts(self, p: SyncPlanned) -> int:
        return sum(1 for _, s in self.started if s == p.sync_id)

    async def execute(self, p: SyncPlanned, progress: ProgressCallback, *,
                      outcome_published: bool = False) -> SyncResult:
        key = p.disk.key
        if key in self.running:
            self.overlaps.append(key)  # two copies of one disk at once: never allowed
        self.running.add(key)
        self.most_running = max(self.most_running, len(self.running))
        for src in sources(p):
            self.per_source[src] = self.per_source.get(src, 0) + 1
            self.most_per_source[src] = max(self.most_per_source.get(src, 0),
                                            self.per_source[src])
        self.started.append((key, p.sync_id))
        try:
            progress(ProgressUpdate(0, 1 << 20))
            if not self.open_all:
                await self.gate(p).wait()
        except asyncio.CancelledError:
            self.cancelled.append(p.sync_id)
            raise
        finally:
            self.running.discard(key)
            for src in sources(p):
                self.per_source[src] -= 1
        return SyncResult(p.replication_type, p.reason, 1 << 20, 0, 1, "blake3:" + "0" * 64, 0.01)

    async def release(self, p: SyncPlanned) -> None:
        return None


class FakePublisher:
    """Keeps every published event; can refuse the outcome of chosen syncs a number of times
    (as a broker that stays away would), or hold it until the test lets it through."""

    def __init__(self) -> None:
        self.events: list[Any] = []
        self.raw: list[tuple[str, bytes | None, bytes]] = []
        self.refuse: dict[uuid.UUID, int] = {}
        self.hold: dict[uuid.UUID, asyncio.Event] = {}

    async def publish(self, event: BaseModel) -> tuple[int, int]:
        sync_id = getattr(event, "sync_id", None)
        if type(event).__name__ != "SyncProgress" and sync_id is not None:
            if self.refuse.get(sync_id, 0) > 0:
                self.refuse[sync_id] -= 1
                raise KafkaUnavailable("publish failed: broker away (test)")
            if sync_id in self.hold:
                await self.hold[sync_id].wait()
        self.events.append(event)
        return 0, len(self.events)

    async def publish_raw(self, topic: str, key: bytes | None, value: bytes,
                          headers: Headers) -> tuple[int, int]:
        self.raw.append((topic, key, value))
        return 0, len(self.raw)

    def of_type(self, name: str) -> list[Any]:
        return [e for e in self.events if type(e).__name__ == name]

    def outcome(self, p: SyncPlanned) -> Any:
        """The outcome published for plan ``p`` (None: none yet)."""
        found = [e for e in self.events if type(e).__name__ in ("ChangeIdCommitted", "SyncFailed")
                 and e.sync_id == p.sync_id]
        return found[-1] if found else None
