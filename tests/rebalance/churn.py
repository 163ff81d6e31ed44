"""Churn reproducer (issue 13): several planner workers restarted over and over with SIGTERM and
SIGKILL mixed, overlapping, never waiting for readiness, while ``SnapshotTaken`` events flow and
a ``copier --noop`` commits every plan; then a check of the whole log.

Only the CLI and the topics are used (no import of ``streams``), so the same driver measures any
version of the worker: run it from a checkout of another commit to get that version's figures.

What is checked (:meth:`Figures.problems`):

* every ``SnapshotTaken`` got exactly one outcome, a ``SyncPlanned`` or a ``SyncSuperseded``,
  never both ("lost": none at all; split into those below the group's committed offset, i.e.
  committed past an unprocessed record, and those above it, never delivered);
* every plan got a commit (the copier commits every plan it reads);
* every disk ended at its last snapshot with nothing running (else "stuck");
* no sync both committed and failed, no ``lineage_mismatch`` ("contradictory");
* the snapshot-to-outcome latency (p50/p99) and the time from the end of the churn until the
  last outcome ("drain");
* SIGTERM stops took at most ``stop_limit_s``; the partition watchdog never acted.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import statistics
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from cbtctl.demo.processes import Proc
from cbtstream.config import Settings
from cbtstream.kafka import client_kwargs, topic_name
from schemas.codec import decode, encode
from schemas.events import ChangeIdCommitted, SyncFailed, SyncPlanned, SyncSuperseded
from schemas.topics import CHANGEID_COMMITTED, SNAPSHOT_TAKEN, SYNC_FAILED, SYNC_PLANNED
from tests.load.loadgen import Fleet
from tests.support import free_port


@dataclass(frozen=True)
class Churn:
    """The size of one run."""

    workers: int = 3
    restarts: int = 10
    #: seconds between two restarts (one random worker each)
    interval_s: float = 4.0
    disks: int = 60
    #: SnapshotTaken per second while the churn lasts
    rate: float = 40.0
    #: share of restarts that SIGKILL (the rest SIGTERM, not waited for)
    kill_share: float = 0.5
    #: how long to wait after the churn for every snapshot to get its outcome
    drain_timeout_s: float = 120.0
    stop_limit_s: float = 10.0
    seed: int = 13


@dataclass
class Figures:
    """What one run measured."""

    sent: int = 0
    outcomes: int = 0
    lost_committed: int = 0
    lost_pending: int = 0
    both: int = 0
    plans_without_commit: int = 0
    stuck_disks: int = 0
    contradictory: int = 0
    lineage_mismatch: int = 0
    timed_out: int = 0
    p50_s: float = 0.0
    p99_s: float = 0.0
    max_s: float = 0.0
    drain_s: float | None = None
    restarts: int = 0
    sigterm_stops: list[float] = field(default_factory=list)
    watchdog_actions: int = 0
    #: "source records skipped" warnings of the workers (only the fixed worker logs them)
    skip_warnings: int = 0
    #: SIGTERM stops that hit the worker's deadline (streams.shutdown_timeout_s) and exited
    forced_stops: int = 0
    worker_exits: int = 0
    stop_limit_s: float = 10.0
    examples: list[str] = field(default_factory=list)

    @property
    def lost(self) -> int:
        return self.lost_committed + self.lost_pending

    def summary(self) -> str:
        stops = sorted(self.sigterm_stops)
        stop = f"{stops[len(stops) // 2]:.1f}/{stops[-1]:.1f}s" if stops else "-"
        drain = f"{self.drain_s:.1f}s" if self.drain_s is not None else "not drained"
        return (f"{self.sent} snapshots, {self.restarts} restarts: lost {self.lost} "
                f"({self.lost_committed} below the committed offset, {self.lost_pending} "
                f"never delivered), planned+superseded {self.both}, plans without commit "
                f"{self.plans_without_commit}, stuck disks {self.stuck_disks}, contradictory "
                f"{self.contradictory} (lineage_mismatch {self.lineage_mismatch}), timed out "
                f"{self.timed_out}; outcome latency p50 {self.p50_s:.1f}s p99 {self.p99_s:.1f}s "
                f"max {self.max_s:.1f}s; drain {drain}; SIGTERM stop median/max {stop}; "
                f"watchdog actions {self.watchdog_actions}; skipped-record warnings "
                f"{self.skip_warnings}; SIGTERM stops past the deadline {self.forced_stops}; "
                f"worker exits {self.worker_exits}")

    def problems(self) -> list[str]:
        out = []
        for name in ("lost", "both", "plans_without_commit", "stuck_disks", "contradictory",
                     "lineage_mismatch", "watchdog_actions", "skip_warnings"):
            if getattr(self, name):
                out.append(f"{name}={getattr(self, name)}")
        if self.drain_s is None:
            out.append("backlog not drained")
        if self.sigterm_stops and max(self.sigterm_stops) > self.stop_limit_s:
            out.append(f"SIGTERM stop took {max(self.sigterm_stops):.1f}s")
        return out + self.examples[:5]


@dataclass
class Record:
    topic: str
    partition: int
    offset: int
    ts: float
    event: Any


class Log:
    """Follows our topics from the beginning (no group): every record with its timestamp."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.names = {topic_name(spec, settings.kafka): spec.name for spec in (
            SNAPSHOT_TAKEN, SYNC_PLANNED, CHANGEID_COMMITTED, SYNC_FAILED)}
        self.consumer = AIOKafkaConsumer(**client_kwargs(settings.kafka), group_id=None,
                                         enable_auto_commit=False, max_poll_records=5000)
        self.records: list[Record] = []
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.consumer.start()
        parts = []
        for name in self.names:
            ps = self.consumer.partitions_for_topic(name)
            while not ps:
                await self.consumer._client.force_metadata_update()
                ps = self.consumer.partitions_for_topic(name)
            parts += [TopicPartition(name, p) for p in ps]
        self.consumer.assign(parts)
        await self.consumer.seek_to_beginning()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            batch = await self.consumer.getmany(timeout_ms=200)
            for tp, recs in batch.items():
                for r in recs:
                    ev = decode(r.value, key=r.key)
                    self.records.append(Record(self.names[tp.topic], tp.partition, r.offset,
                                               r.timestamp / 1000.0, ev))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.consumer.stop()


def _cycle(change_id: str) -> int:
    return int(change_id.rsplit("/", 1)[1])


class Outcomes:
    """The log, digested."""

    def __init__(self, records: list[Record]) -> None:
        self.snapshots: dict[uuid.UUID, Record] = {}
        self.first_outcome: dict[uuid.UUID, float] = {}
        self.planned: dict[uuid.UUID, SyncPlanned] = {}
        self.superseded: set[uuid.UUID] = set()
        #: the SyncSuperseded of each superseded snapshot (for the examples of "both")
        self.superseded_by: dict[uuid.UUID, tuple[SyncSuperseded, float]] = {}
        self.plan_ts: dict[uuid.UUID, float] = {}
        self.plan_syncs: set[uuid.UUID] = set()
        self.commits: dict[uuid.UUID, ChangeIdCommitted] = {}
        self.failed: dict[uuid.UUID, list[SyncFailed]] = {}
        self.last_commit: dict[str, str] = {}
        for r in records:
            ev = r.event
            if r.topic == SNAPSHOT_TAKEN.name:
                self.snapshots.setdefault(ev.event_id, r)
            elif isinstance(ev, SyncPlanned):
                self.planned.setdefault(ev.snapshot_event_id, ev)
                self.plan_ts.setdefault(ev.snapshot_event_id, r.ts)
                self.plan_syncs.add(ev.sync_id)
                self.first_outcome.setdefault(ev.snapshot_event_id, r.ts)
            elif isinstance(ev, SyncSuperseded):
                self.superseded.add(ev.snapshot_event_id)
                self.superseded_by.setdefault(ev.snapshot_event_id, (ev, r.ts))
                self.first_outcome.setdefault(ev.snapshot_event_id, r.ts)
            elif isinstance(ev, ChangeIdCommitted):
                self.commits[ev.sync_id] = ev
                seen = self.last_commit.get(ev.disk.key)
                if seen is None or _cycle(ev.change_id) > _cycle(seen):
                    self.last_commit[ev.disk.key] = ev.change_id
            elif isinstance(ev, SyncFailed) and ev.sync_id is not None:
                self.failed.setdefault(ev.sync_id, []).append(ev)

    def drained(self, sent: int) -> bool:
        return (len(self.snapshots) >= sent
                and all(s in self.first_outcome for s in self.snapshots)
                and self.plan_syncs <= set(self.commits) | set(self.failed))


async def publish(settings: Settings, fleet: Fleet, rate: float, until: asyncio.Event,
                  sent: dict[int, int]) -> int:
    """Snapshots round-robin over the disks at ``rate``/s until ``until`` is set; ``sent`` gets
    each disk's last cycle. Returns the number published."""
    producer = AIOKafkaProducer(**client_kwargs(settings.kafka), acks="all",
                                enable_idempotence=True, linger_ms=5)
    topic = topic_name(SNAPSHOT_TAKEN, settings.kafka)
    await producer.start()
    n = 0
    t0 = time.monotonic()
    futs = []
    try:
        while not until.is_set():
            i = n % fleet.disks
            cycle = n // fleet.disks + 1
            key, value, headers = encode(fleet.snapshot(i, cycle))
            futs.append(await producer.send(topic, key=key, value=value, headers=headers))
            sent[i] = cycle
            n += 1
            delay = t0 + n / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        await asyncio.gather(*futs)
    finally:
        await producer.stop()
    return n


class Workers:
    """``count`` worker slots, each its own web port and data dir; a slot is restarted by
    signalling its process (SIGTERM not awaited, SIGKILL) and starting a new one at once."""

    def __init__(self, settings: Settings, tmp: Path, count: int) -> None:
        self.settings = settings
        self.tmp = tmp
        self.procs: list[Proc] = []
        self.watchers: list[threading.Thread] = []
        self.sigterm_stops: list[float] = []
        self.exits = 0
        self.runs = 0
        for slot in range(count):
            self.procs.append(self._start(slot))

    def _start(self, slot: int) -> Proc:
        self.runs += 1
        data = self.settings.model_dump()
        data["streams"] |= {"web_port": free_port(),
                            "data_dir": self.tmp / f"faust-{slot}-{self.runs}"}
        s = Settings.model_validate(data)
        return Proc(["worker"], s, self.tmp / "logs" / f"worker-{slot}-{self.runs}.log")

    def restart(self, slot: int, kill: bool) -> None:
        old = self.procs[slot]
        if not old.alive:
            self.exits += 1
            old.kill()  # closes its log
        elif kill:
            old.kill()
        else:
            os.killpg(old.proc.pid, signal.SIGTERM)
            t = threading.Thread(target=self._watch_stop, args=(old, time.monotonic()),
                                 daemon=True)
            t.start()
            self.watchers.append(t)
        self.procs[slot] = self._start(slot)

    def _watch_stop(self, proc: Proc, since: float) -> None:
        """Time one SIGTERM until the process exits (SIGKILL after 30 s, counted as 30 s)."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.proc.wait(30)
        self.sigterm_stops.append(time.monotonic() - since)
        proc.kill()  # closes its log

    def reap(self, wait: float = 30.0) -> None:
        for t in self.watchers:
            t.join(wait)

    def logs(self) -> list[Path]:
        return sorted((self.tmp / "logs").glob("worker-*.log"))

    def stop(self) -> None:
        for p in self.procs:
            p.stop()
        self.reap()


async def committed_offsets(settings: Settings) -> dict[tuple[str, int], int]:
    group = f"{settings.kafka.topic_prefix}{settings.streams.app_id}"
    admin = AIOKafkaAdminClient(**client_kwargs(settings.kafka))
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
        return {(tp.topic, tp.partition): m.offset for tp, m in offsets.items()}
    finally:
        await admin.close()


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q * 100) - 1]


async def run(settings: Settings, tmp: Path, churn: Churn) -> Figures:
    """One churn run against the broker of ``settings`` (topics already created)."""
    rng = random.Random(churn.seed)
    fleet = Fleet(uuid.uuid4().hex, churn.disks)
    log = Log(settings)
    await log.start()
    copier = Proc(["copier", "--noop"], settings, tmp / "logs" / "copier.log")
    workers = Workers(settings, tmp, churn.workers)
    figures = Figures(stop_limit_s=churn.stop_limit_s)
    last_cycle: dict[int, int] = {}
    done = asyncio.Event()
    producer = asyncio.create_task(publish(settings, fleet, churn.rate, done, last_cycle))
    try:
        for _ in range(churn.restarts):
            await asyncio.sleep(churn.interval_s * rng.uniform(0.5, 1.5))
            workers.restart(rng.randrange(churn.workers), kill=rng.random() < churn.kill_share)
            figures.restarts += 1
        await asyncio.sleep(churn.interval_s)
        done.set()
        figures.sent = await producer
        t_end = time.time()  # Kafka timestamps are wall clock
        deadline = time.monotonic() + churn.drain_timeout_s
        while time.monotonic() < deadline:
            if not copier.alive:
                raise RuntimeError(f"copier exited:\n{copier.output()[-3000:]}")
            out = Outcomes(list(log.records))
            if out.drained(figures.sent):
                # from the end of the churn and the load until the last outcome was written
                figures.drain_s = max(0.0, max(out.first_outcome.values()) - t_end)
                break
            await asyncio.sleep(0.5)
        await asyncio.sleep(2)  # let the last commits land, then judge everything
        offsets = await committed_offsets(settings)
        _judge(figures, Outcomes(list(log.records)), fleet, last_cycle, offsets,
               topic_name(SNAPSHOT_TAKEN, settings.kafka))
    finally:
        if not done.is_set():
            done.set()
            with contextlib.suppress(Exception):
                await producer
        workers.stop()
        copier.stop()
        await log.stop()
    figures.sigterm_stops = workers.sigterm_stops
    figures.worker_exits = workers.exits
    texts = [p.read_text(errors="replace") for p in workers.logs()]
    figures.watchdog_actions = sum(t.count("source partition stalled") for t in texts)
    figures.skip_warnings = sum(t.count('"source records skipped"') for t in texts)
    figures.forced_stops = sum(t.count("clean stop took longer") for t in texts)
    return figures


def _judge(f: Figures, out: Outcomes, fleet: Fleet, last_cycle: dict[int, int],
           offsets: dict[tuple[str, int], int], snapshot_topic: str) -> None:
    latencies = []
    for sid, rec in out.snapshots.items():
        planned, sup = sid in out.planned, sid in out.superseded
        if planned and sup:
            f.both += 1
            if len(f.examples) < 5:
                s, ts = out.superseded_by[sid]
                plan = out.planned[sid]
                f.examples.append(
                    f"planned and superseded: {rec.event.disk.key} {rec.event.vm_snapshot} "
                    f"p{rec.partition}@{rec.offset} taken {rec.ts:.1f}, "
                    f"planned {out.plan_ts[sid]:.1f} (committed: {plan.sync_id in out.commits}), "
                    f"superseded {ts:.1f} by "
                    f"{'itself' if s.superseded_by == sid else s.superseded_by}")
        if not planned and not sup:
            committed = offsets.get((snapshot_topic, rec.partition), -1)
            if rec.offset < committed:
                f.lost_committed += 1
            else:
                f.lost_pending += 1
            if len(f.examples) < 5:
                f.examples.append(f"no outcome: {rec.event.disk.key} {rec.event.vm_snapshot} "
                                  f"p{rec.partition}@{rec.offset} (committed {committed})")
            continue
        latencies.append(out.first_outcome[sid] - rec.ts)
    f.outcomes = len(latencies)
    f.plans_without_commit = len(out.plan_syncs - set(out.commits) - set(out.failed))
    f.contradictory = len(set(out.commits) & set(out.failed))
    f.lineage_mismatch = sum(1 for fs in out.failed.values() for x in fs
                             if x.reason == "lineage_mismatch")
    f.timed_out = sum(1 for fs in out.failed.values() for x in fs
                      if x.reason == "sync_timed_out")
    for i, cycle in last_cycle.items():
        if out.last_commit.get(fleet.key(i)) != fleet.change_id(i, cycle):
            f.stuck_disks += 1
    latencies.sort()
    f.p50_s = _quantile(latencies, 0.5)
    f.p99_s = _quantile(latencies, 0.99)
    f.max_s = latencies[-1] if latencies else 0.0
