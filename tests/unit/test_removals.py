"""Snapshot removals (streams.removals, streams.lifecycle): bounded, retried, recorded as a
``removed`` notice, never started for a snapshot a disk still needs. The remover here is a
stand-in that counts calls; the vSphere path is tested against the simulator
(tests/vsphere/test_cbt.py, the pipeline tests)."""

from __future__ import annotations

import asyncio

from cbtstream.errors import CbtStreamError
from streams import lifecycle
from streams.lifecycle import Notice, SnapshotRow
from streams.removals import Removals
from tests.unit.factories import disk


def row(snapshot: str, finished: tuple[int, ...] = (2000, 2001)) -> SnapshotRow:
    r: SnapshotRow | None = None
    for k in finished:
        r = lifecycle.apply(r, Notice(kind="finished", disk=disk(k), vm_snapshot=snapshot,
                                      expected=(2000, 2001), outcome="committed"))
    assert r is not None
    return r


class Flaky(CbtStreamError):
    retriable = True


class Remover:
    """Counts calls; fails the first ``fail`` calls per snapshot; may hold calls open."""

    def __init__(self, fail: int = 0, gate: asyncio.Event | None = None) -> None:
        self.calls: list[str] = []
        self.fail = fail
        self.gate = gate
        self.running = 0
        self.peak = 0

    async def remove(self, vm_instance_uuid: str, vm_snapshot: str) -> None:
        self.calls.append(vm_snapshot)
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.calls.count(vm_snapshot) <= self.fail:
                raise Flaky("vCenter busy")
        finally:
            self.running -= 1


class Announced(list[Notice]):
    """The notices the removals sent, in order (the lifecycle topic of these tests)."""

    async def __call__(self, notice: Notice) -> None:
        self.append(notice)


async def settle(r: Removals) -> None:
    for _ in range(200):
        if r.in_flight() == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("removals still in flight")


def test_removed_notice_marks_the_row_and_keeps_the_disks() -> None:
    r = row("snapshot-1")
    assert lifecycle.releasable(r)
    done = lifecycle.apply(r, Notice(kind="removed", disk=disk(2000), vm_snapshot="snapshot-1"))
    assert done.removed and not lifecycle.releasable(done)
    assert done.finished == r.finished and set(done.disks) == {2000, 2001}


async def test_a_snapshot_a_disk_still_needs_is_never_submitted() -> None:
    remover = Remover()
    announced = Announced()
    removals = Removals(remover, announced, concurrency=4, backoff_s=0)
    assert not removals.submit(b"k", row("snapshot-1", finished=(2000,)))
    await settle(removals)
    assert remover.calls == [] and announced == []


async def test_removal_is_announced_once_and_bounded() -> None:
    gate = asyncio.Event()
    remover = Remover(gate=gate)
    announced = Announced()
    removals = Removals(remover, announced, concurrency=3, backoff_s=0)
    rows = [(f"k{i}".encode(), row(f"snapshot-{i}")) for i in range(10)]
    assert removals.sweep(rows) == 10
    assert removals.sweep(rows) == 0  # in flight: not submitted twice
    await asyncio.sleep(0.05)
    assert remover.peak == 3  # never more than the bound at once
    gate.set()
    await settle(removals)
    assert sorted(remover.calls) == sorted(f"snapshot-{i}" for i in range(10))
    assert sorted(n.vm_snapshot for n in announced) == sorted(remover.calls)
    assert {n.kind for n in announced} == {"removed"} and removals.done == 10


async def test_transient_failures_are_retried_and_exhausted_ones_wait_for_the_sweep() -> None:
    remover = Remover(fail=2)
    announced = Announced()
    removals = Removals(remover, announced, concurrency=2, backoff_s=0)
    removals.submit(b"a", row("snapshot-a"))
    await settle(removals)
    assert remover.calls == ["snapshot-a"] * 3 and [n.vm_snapshot for n in announced] == [
        "snapshot-a"]

    remover = Remover(fail=5)
    announced.clear()
    removals = Removals(remover, announced, concurrency=2, backoff_s=0)
    removals.submit(b"b", row("snapshot-b"))
    await settle(removals)
    assert announced == [] and removals.failed == 1 and len(remover.calls) == 3
    # the row is still releasable in the table: the next sweep tries again
    assert removals.sweep([(b"b", row("snapshot-b"))]) == 1
    await settle(removals)
    assert len(remover.calls) == 6


async def test_stop_cancels_removals_in_flight_without_announcing() -> None:
    gate = asyncio.Event()
    remover = Remover(gate=gate)
    announced = Announced()
    removals = Removals(remover, announced, concurrency=2, backoff_s=0)
    removals.sweep([(b"a", row("snapshot-a")), (b"b", row("snapshot-b"))])
    await asyncio.sleep(0.01)
    await removals.stop()
    assert announced == [] and removals.in_flight() == 0


async def test_a_stopping_worker_lets_running_removals_finish_then_cancels_the_rest() -> None:
    gate = asyncio.Event()
    announced = Announced()
    r = Removals(Remover(gate=gate), announced, concurrency=4)
    r.submit(b"a", row("snapshot-1"))
    r.submit(b"b", row("snapshot-2"))
    await asyncio.sleep(0)
    asyncio.get_running_loop().call_later(0.1, gate.set)  # vCenter answers in 0.1 s
    await r.stop(grace_s=2.0)
    assert sorted(n.vm_snapshot for n in announced) == ["snapshot-1", "snapshot-2"]
    assert r.done == 2 and r.in_flight() == 0
    # a removal that does not end within the grace is cancelled: its row stays releasable
    stuck = Removals(Remover(gate=asyncio.Event()), announced, concurrency=4)
    stuck.submit(b"c", row("snapshot-3"))
    await asyncio.sleep(0)
    await asyncio.wait_for(stuck.stop(grace_s=0.2), 2)
    assert stuck.done == 0 and stuck.in_flight() == 0
    assert "snapshot-3" not in [n.vm_snapshot for n in announced]
