"""The copier orders plans per disk, not per partition (issue 20), end to end on the real stack:
one partition, so every disk shares it.

* Head of line: a large rate-limited seeding copy next to many small disks of other VMs, all
  snapshotted at once, with a short silent-sync time-out. The small disks finish while the large
  one copies, no sync times out, and no VM snapshot is removed before every plan that needs it
  has committed. (Before the change the small disks waited behind the large copy, their syncs
  timed out, and their snapshots were removed while their plans still waited in the copier.)
* Concurrency: twelve disks of one partition run ``copier.max_parallel_disks`` (4) at a time,
  as their own progress reports show, and the others report themselves queued meanwhile.

Every replica is compared byte for byte with its snapshot.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path

import pytest

from cbtctl.demo.run import stack_settings
from cbtctl.demo.scenario import Scenario, files_equal, random_name
from cbtctl.demo.workload import MiB, Write, initial_fill
from cbtctl.watcher import Outcome, Watcher
from cbtstream.config import Settings
from cbtstream.kafka import create_topics
from cbtstream.vsphere.simctl import SimulatorControl
from schemas.events import (
    ChangeIdCommitted,
    FailureReason,
    SnapshotRemoved,
    SnapshotTaken,
    SyncFailed,
    SyncProgress,
)
from tests.e2e.conftest import Pipeline, vm_scenario
from tests.support import isolated_settings

pytestmark = pytest.mark.integration

#: The silent-sync time-out of these tests: far below the large copy's duration, so a plan that
#: waited silently behind it would be re-issued and then timed out.
TIMEOUT_S = 5.0
#: The per-disk read rate: the large disk takes about 24 s, a small one a fraction of a second.
RATE = 4 * MiB


@pytest.fixture
async def kafka_settings(stack_settings: Settings, tmp_path: Path) -> AsyncIterator[Settings]:
    """Isolated topics with a single partition: every disk of the test shares it."""
    settings = isolated_settings(stack_settings, tmp_path, kafka={"partitions": 1})
    await create_topics(settings.kafka)
    yield settings


@pytest.fixture
def e2e_settings(kafka_settings: Settings, tmp_path: Path) -> Settings:
    s = stack_settings(kafka_settings)
    copier = s.copier.model_copy(update={
        "state_dir": tmp_path / "copier", "checkpoint_bytes": 8 * MiB,
        "max_bytes_per_s": RATE, "max_parallel_disks": 4})
    streams = s.streams.model_copy(update={"sync_timeout_s": TIMEOUT_S,
                                           "sync_check_interval_s": 0.5})
    return s.model_copy(update={"copier": copier, "streams": streams})


def _fill(sc: Scenario, fraction: float) -> list[Write]:
    assert sc.vm is not None
    return [w for d in sc.vm.disks for w in initial_fill(sc.rng, d.key, d.capacity, fraction)]


def _outcomes(sc: Scenario, snapshot: str) -> dict[int, Outcome]:
    assert sc.watcher is not None
    return dict(sc.watcher.outcomes(snapshot))


def _removed_before_commits(sc: Scenario, snapshot: str) -> bool:
    """The VM snapshot was removed before every disk's plan of it had committed."""
    assert sc.watcher is not None and sc.vm is not None
    committed: set[int] = set()
    for ev in sc.watcher.events:
        if isinstance(ev, ChangeIdCommitted) and ev.vm_snapshot == snapshot:
            committed.add(ev.disk.device_key)
        if isinstance(ev, SnapshotRemoved) and ev.vm_snapshot == snapshot:
            return committed != {d.key for d in sc.vm.disks}
    return False


def _removed_all(w: Watcher, snapshot: str) -> Callable[[], bool]:
    return lambda: len(w.removed(snapshot)) == 2


def _replicas_equal(sc: Scenario) -> bool:
    assert sc.vm is not None
    return all(files_equal(sc.replica(d.key), sc.model(d.key)) for d in sc.vm.disks)


async def test_small_disks_do_not_wait_behind_a_large_copy(
        scenario: Scenario, pipeline: Pipeline, sim: SimulatorControl, tmp_path: Path) -> None:
    settings = pipeline.settings
    big = scenario
    await big.create_vm(random_name("e2e-hol-big"), [96 * MiB])
    await big.write(_fill(big, 1.0))  # dense: about 24 s at the rate limit
    smalls = [await vm_scenario(settings, sim, tmp_path / f"small-{i}", pipeline.check,
                                "e2e-hol-small", [4 * MiB, 4 * MiB], seed=i) for i in range(6)]
    try:
        for sc in smalls:
            await sc.write(_fill(sc, 0.3))
        pipeline.start_copier()
        big_taken = await big.snapshot()
        big_snap = big_taken[0].vm_snapshot
        assert big.watcher is not None
        await big.watcher.wait_for(lambda: bool(big.watcher and big.watcher.plans(big_snap)), 60,
                                   alive=pipeline.check)
        # Every small VM snapshotted at once, planned behind the large disk's plan.
        taken: list[list[SnapshotTaken]] = await asyncio.gather(*(sc.snapshot() for sc in smalls))
        for sc, evs in zip(smalls, taken, strict=True):
            await sc.wait(evs[0].vm_snapshot, [e.disk.device_key for e in evs])
        await big.wait(big_snap, [big_taken[0].disk.device_key])

        # measured before any assertion, for the record (before/after figures of issue 20)
        small_latency = []
        timed_out = 0
        failed = []
        for sc, evs in zip(smalls, taken, strict=True):
            snap = evs[0].vm_snapshot
            assert sc.watcher is not None
            timed_out += sum(1 for e in sc.watcher.events if isinstance(e, SyncFailed)
                             and e.reason == FailureReason.SYNC_TIMED_OUT)
            for key, out in _outcomes(sc, snap).items():
                if isinstance(out, ChangeIdCommitted):
                    small_latency.append((out.occurred_at - evs[0].taken_at).total_seconds())
                else:
                    failed.append((key, getattr(out, "reason", type(out).__name__)))
        big_out = _outcomes(big, big_snap)[big_taken[0].disk.device_key]
        big_s = (big_out.occurred_at - big_taken[0].taken_at).total_seconds() \
            if isinstance(big_out, ChangeIdCommitted) else float("nan")
        early_removals = sum(_removed_before_commits(sc, evs[0].vm_snapshot)
                             for sc, evs in zip(smalls, taken, strict=True))
        print(f"\nHEAD-OF-LINE small disks committed {len(small_latency)}/12, max snapshot-to-"
              f"commit {max(small_latency, default=float('nan')):.1f}s; large disk "
              f"{big_s:.1f}s; sync_timed_out {timed_out}; failed {failed}; VM snapshots "
              f"removed before their plans committed {early_removals}")

        assert timed_out == 0 and failed == []
        assert early_removals == 0
        assert isinstance(big_out, ChangeIdCommitted)
        assert len(small_latency) == 12
        # as if the large disk were not there: every small disk done long before it
        assert max(small_latency) < big_s / 2, (small_latency, big_s)
        assert max(o.occurred_at for sc, evs in zip(smalls, taken, strict=True)
                   for o in _outcomes(sc, evs[0].vm_snapshot).values()) < big_out.occurred_at
        for sc in (big, *smalls):
            assert _replicas_equal(sc)
        for sc, evs in zip(smalls, taken, strict=True):  # each VM snapshot is removed after all
            w, snap = sc.watcher, evs[0].vm_snapshot
            assert w is not None
            await w.wait_for(_removed_all(w, snap), 30, alive=pipeline.check)
    finally:
        for sc in smalls:
            await sc.close()


async def test_one_partition_copies_max_parallel_disks_at_once(
        scenario: Scenario, pipeline: Pipeline) -> None:
    await scenario.create_vm(random_name("e2e-par"), [8 * MiB] * 12)
    await scenario.write(_fill(scenario, 1.0))  # about 2 s per disk at the rate limit
    pipeline.start_copier()
    evs = await scenario.snapshot()
    snap = evs[0].vm_snapshot
    keys = [e.disk.device_key for e in evs]
    await scenario.wait(snap, keys)
    watcher = scenario.watcher
    assert watcher is not None
    outcomes = watcher.outcomes(snap)
    assert all(isinstance(outcomes[k], ChangeIdCommitted) for k in keys)
    assert _replicas_equal(scenario)

    # Each copy runs from its first running report to its commit (the copier's own clock).
    plans = {p.sync_id: k for k, p in watcher.plans(snap).items()}
    start: dict[int, datetime] = {}
    queued: list[SyncProgress] = []
    for ev in watcher.events:
        if isinstance(ev, SyncProgress) and ev.sync_id in plans:
            if ev.state == "queued":
                queued.append(ev)
            else:
                start.setdefault(plans[ev.sync_id], ev.occurred_at)
    spans = [(start[k], outcomes[k].occurred_at) for k in keys if k in start]
    edges = sorted([(t0, 1) for t0, _ in spans] + [(t1, -1) for _, t1 in spans])
    at_once = most = 0
    for _, step in edges:
        at_once += step
        most = max(most, at_once)
    print(f"\nPARALLEL 12 disks in 1 partition: at most {most} copies at once; "
          f"{len(queued)} queued reports, positions "
          f"{sorted({q.queue_position or 0 for q in queued})}")
    assert len(spans) == 12, "a copy never reported running"
    assert most == 4
    assert queued and min(q.queue_position or 0 for q in queued) == 1
