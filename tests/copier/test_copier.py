"""The copier's Kafka loop in process (``consumers/copier.py``), with a fake consumer, a gated
executor and a fake publisher (``tests/copier/fakes.py``): plans of one disk in offset order,
disks of one partition concurrently, commits below the lowest unfinished plan, pause and resume,
revocation, a failed record run again, dead letters, the queued reports, and the per-ESXi-host
and per-datastore limits."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from aiokafka import TopicPartition

from cbtstream.config import CopierSettings, Settings, StreamsSettings
from consumers.copier import PUBLISH_RETRY_DELAYS, Copier
from schemas.events import ChangeIdCommitted, SyncProgress
from tests.copier.fakes import FakeConsumer, FakePublisher, GatedExecutor, plan, superseded


async def _no_sleep(_: float) -> None:
    await asyncio.sleep(0)


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def running(tmp_path: Path, consumer: FakeConsumer, executor: GatedExecutor,
                  publisher: FakePublisher, **copier: Any) -> AsyncIterator[Copier]:
    settings = Settings(
        copier=CopierSettings(state_dir=tmp_path / "copier", progress_interval_s=0.05,
                              **copier),
        streams=StreamsSettings(sync_timeout_s=1800))
    c = Copier(settings, executor, publisher, consumer=consumer, sleep=_no_sleep)
    task = asyncio.create_task(c.run())
    try:
        yield c
    finally:
        c.request_stop()
        executor.open_all = True
        for gate in executor.gates.values():
            gate.set()
        await asyncio.wait_for(task, 10)


def _committed(publisher: FakePublisher, *plans: Any) -> Callable[[], bool]:
    return lambda: all(isinstance(publisher.outcome(p), ChangeIdCommitted) for p in plans)


async def test_a_disks_plans_run_in_offset_order_while_other_disks_pass(tmp_path: Path) -> None:
    consumer, ex, pub = FakeConsumer(), GatedExecutor(), FakePublisher()
    a1, a2, b = plan(1, 1), plan(1, 2), plan(2, 1)
    for p in (a1, a2, b):
        consumer.append(p)
    async with running(tmp_path, consumer, ex, pub):
        await until(lambda: ex.is_running(a1) and ex.is_running(b))
        ex.finish(b)  # disk 2 is behind disk 1 in the partition, not behind its copy
        await until(_committed(pub, b))
        pub.hold[a1.sync_id] = asyncio.Event()
        ex.finish(a1)
        await asyncio.sleep(0.1)
        assert ex.starts(a2) == 0, "a disk's next plan started before its previous outcome"
        pub.hold[a1.sync_id].set()
        await until(lambda: ex.starts(a2) == 1)
        ex.finish(a2)
        await until(_committed(pub, a1, a2))
        await until(lambda: consumer.committed.get(consumer.tps[0]) == 3)
    assert [s for k, s in ex.started if k == a1.disk.key] == [a1.sync_id, a2.sync_id]
    assert ex.overlaps == []


async def test_disks_of_one_partition_run_concurrently_up_to_the_limit(tmp_path: Path) -> None:
    consumer, ex, pub = FakeConsumer(), GatedExecutor(), FakePublisher()
    plans = [plan(k) for k in range(1, 7)]
    for p in plans:
        consumer.append(p)
    async with running(tmp_path, consumer, ex, pub, max_parallel_disks=4):
        await until(lambda: len(ex.running) == 4)
        await asyncio.sleep(0.1)
        assert len(ex.started) == 4 and ex.most_running == 4
        ex.finish(plans[2])
        await until(lambda: len(ex.started) == 5)
        assert ex.started[4][1] == plans[4].sync_id  # the oldest waiting plan is next
        for p in plans:
            ex.finish(p)
        await until(_committed(pub, *plans))
    assert ex.most_running == 4


async def test_offsets_are_committed_only_below_the_lowest_unfinished_plan(
        tmp_path: Path) -> None:
    consumer, ex, pub = FakeConsumer(), GatedExecutor(), FakePublisher()
    big, small = plan(1), [plan(k) for k in range(2, 5)]
    for p in (big, *small):
        consumer.append(p)
    consumer.append(superseded(9))
    tp = consumer.tps[0]
    async with running(tmp_path, consumer, ex, pub, max_parallel_disks=4):
        for p in small:
            ex.finish(p)
        await until(_committed(pub, *small))
        await asyncio.sleep(0.1)
        assert consumer.committed.get(tp, 0) == 0, "committed past a plan still copying"
        ex.finish(big)
        await until(lambda: consumer.committed.get(tp) == 5)


async def test_a_partition_is_paused_while_too_many_plans_wait(tmp_path: Path) -> None:
    consumer, ex, pub = FakeConsumer(max_records=2), GatedExecutor(), FakePublisher()
    plans = [plan(k) for k in range(1, 13)]
    for p in plans:
        consumer.append(p)
    tp = consumer.tps[0]
    async with running(tmp_path, consumer, ex, pub, max_parallel_disks=1,
                       max_waiting_per_partition=4):
        await until(lambda: tp in consumer.paused)
        await asyncio.sleep(0.1)
        held = len(consumer.fetched[tp])
        assert held <= 4 + 1 + 2, consumer.fetched  # the bound, the running one, one poll
        assert tp in consumer.paused
        ex.open_all = True
        ex.finish(plans[0])
        await until(_committed(pub, *plans))
        await until(lambda: consumer.committed.get(tp) == 12)
        assert tp not in consumer.paused
    assert consumer.fetched[tp] == list(range(12))  # each record read once, in order


async def test_a_revoked_partition_cancels_its_copies_and_the_next_owner_redoes_them(
        tmp_path: Path) -> None:
    consumer, ex, pub = FakeConsumer(), GatedExecutor(), FakePublisher()
    x, y, x2 = plan(1, 1), plan(2, 1), plan(1, 2)
    for p in (x, y, x2):
        consumer.append(p)
    tp = consumer.tps[0]
    async with running(tmp_path, consumer, ex, pub, max_parallel_disks=2):
        await until(lambda: ex.is_running(x) and ex.is_running(y))
        ex.finish(y)
        await until(_committed(pub, y))
        await consumer.revoke(0)
        assert ex.cancelled == [x.sync_id]
        assert ex.starts(x2) == 0
        assert consumer.committed.get(tp, 0) == 0  # x (offset 0) never finished
        await consumer.assign(0)  # taken back: read again from the committed offset
        await until(lambda: ex.starts(x) == 2)
        assert ex.starts(y) == 1  # its outcome was published: skipped (the ledger)
        ex.open_all = True
        ex.finish(x)
        await until(_committed(pub, x, x2))
        await until(lambda: consumer.committed.get(tp) == 3)
    assert ex.overlaps == []


async def test_a_revoke_commits_what_finished_below_the_first_unfinished(
        tmp_path: Path) -> None:
    consumer, ex, pub = FakeConsumer(), GatedExecutor(), FakePublisher()
    done = [plan(k) for k in range(1, 4)]
    slow = plan(9)
    for p in (*done, slow):
        consumer.append(p)
    for k in range(10, 20):  # plans waiting behind a full copier: the batch is not due yet
        consumer.append(plan(k))
    tp = consumer.tps[0]
    async with running(tmp_path, consumer, ex, pub, max_parallel_disks=1):
        for p in done:
            ex.finish(p)
        await until(lambda: ex.is_running(slow))
        await asyncio.sleep(0.05)
        assert consumer.committed.get(tp, 0) == 0  # not due: the partition still has waiting
        await consumer.revoke(0)
        assert consumer.committed.get(tp) == 3  # handed over: what finished is committed


async def test_a_record_whose_outcome_cannot_be_published_runs_again_and_holds_the_commits(
        tmp_path: Path) -> None:
    consumer, ex, pub = FakeConsumer(), GatedExecutor(open_all=True), FakePublisher()
    a, b = plan(1), plan(2)
    consumer.append(a)
    consumer.append(b)
    tp = consumer.tps[0]
    pub.refuse[a.sync_id] = len(PUBLISH_RETRY_DELAYS) + 1  # every attempt of the first run

    def check(offsets: dict[TopicPartition, int]) -> None:
        assert offsets[tp] <= 0 or pub.outcome(a) is not None, "committed past a lost outcome"

    consumer.on_commit = check
    async with running(tmp_path, consumer, ex, pub):
        await until(_committed(pub, a, b))
        await until(lambda: consumer.committed.get(tp) == 2)
    assert ex.starts(a) == 2 and ex.starts(b) == 1


async def test_bad_records_go_to_the_dead_letters_and_hold_no_disk(tmp_path: Path) -> None:
    consumer, ex, pub = FakeConsumer(), GatedExecutor(open_all=True), FakePublisher()
    consumer.append(b"not an event", key=b"x")
    a = plan(1)
    consumer.append(a)
    consumer.append(superseded(2))
    async with running(tmp_path, consumer, ex, pub):
        await until(_committed(pub, a))
        await until(lambda: consumer.committed.get(consumer.tps[0]) == 3)
    assert len(pub.raw) == 1 and pub.raw[0][0].endswith("cbt.deadletter")


async def test_plans_held_but_not_started_are_reported_queued(tmp_path: Path) -> None:
    consumer, ex, pub = FakeConsumer(), GatedExecutor(), FakePublisher()
    a, b, c = plan(1), plan(2), plan(3)
    for p in (a, b, c, a):  # a delivered twice (a re-issue): it is running, not queued
        consumer.append(p)

    def queued(p: Any) -> list[SyncProgress]:
        return [e for e in pub.of_type("SyncProgress")
                if e.sync_id == p.sync_id and e.state == "queued"]

    async with running(tmp_path, consumer, ex, pub, max_parallel_disks=1,
                       queue_report_interval_s=0.02):
        await until(lambda: len(queued(b)) >= 2 and len(queued(c)) >= 2)
        assert queued(a) == []
        assert {e.queue_position for e in queued(b)} == {1}
        assert {e.queue_position for e in queued(c)} == {2}
        ex.finish(a)
        await until(lambda: ex.is_running(b))
        await until(lambda: [e.state for e in pub.of_type("SyncProgress")
                             if e.sync_id == b.sync_id][-1] == "running")
        await until(lambda: {e.queue_position for e in queued(c)[-2:]} == {1})
        ex.open_all = True
        ex.finish(b)
        await until(_committed(pub, a, b, c))
    assert ex.starts(a) == 1  # the re-issue was skipped: its outcome was published


async def test_copies_of_one_esxi_host_stay_within_its_limit_and_others_pass(
        tmp_path: Path) -> None:
    consumer, ex, pub = FakeConsumer(), GatedExecutor(), FakePublisher()
    busy = [plan(k, host="esx-1") for k in range(1, 6)]
    other = [plan(k, host="esx-2") for k in range(6, 8)]
    for p in (*busy, *other):  # the other host's plans are behind the busy host's in Kafka
        consumer.append(p)

    def queued(p: Any) -> list[SyncProgress]:
        return [e for e in pub.of_type("SyncProgress")
                if e.sync_id == p.sync_id and e.state == "queued"]

    async with running(tmp_path, consumer, ex, pub, max_parallel_disks=6,
                       max_copies_per_esxi_host=2, max_copies_per_datastore=0,
                       queue_report_interval_s=0.02):
        await until(lambda: len(ex.running) == 4)
        await until(lambda: all(queued(p) for p in busy[2:]))
        await asyncio.sleep(0.05)
        assert {k for k, _ in ex.started} == {p.disk.key for p in (*busy[:2], *other)}
        assert {e.wait_reason for p in busy[2:] for e in queued(p)} == {
            "esxi host esx-1 at its limit of 2"}
        ex.open_all = True
        for p in (*busy, *other):
            ex.finish(p)
        await until(_committed(pub, *busy, *other))
    assert ex.most_per_source[("esxi host", "esx-1")] == 2
    assert [s for _, s in ex.started if s in {p.sync_id for p in busy}] == [
        p.sync_id for p in busy]  # one host's plans in arrival order


async def test_copies_of_one_datastore_stay_within_its_limit(tmp_path: Path) -> None:
    consumer, ex, pub = FakeConsumer(), GatedExecutor(), FakePublisher()
    on_ds1 = [plan(k, host=f"esx-{k}") for k in range(1, 5)]
    on_ds2 = plan(9, host="esx-1", datastore="ds2")
    for p in (*on_ds1, on_ds2):
        consumer.append(p)
    async with running(tmp_path, consumer, ex, pub, max_parallel_disks=8,
                       max_copies_per_datastore=1, queue_report_interval_s=0.02):
        await until(lambda: ex.is_running(on_ds1[0]) and ex.is_running(on_ds2))
        await until(lambda: any(e.wait_reason == "datastore ds1 at its limit of 1"
                                for e in pub.of_type("SyncProgress")))
        for p in on_ds1:
            await until(functools.partial(ex.is_running, p))
            assert len(ex.running) == 2
            ex.finish(p)
        ex.finish(on_ds2)
        await until(_committed(pub, *on_ds1, on_ds2))
    assert ex.most_per_source[("datastore", "ds1")] == 1
