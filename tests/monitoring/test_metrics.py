"""The series the dashboard and the alert rules need that the events alone do not give: the
copier's queued and running copies, the worker's view of its ``disks`` table (disks by state,
each disk's last commit and VM, the oldest snapshot still needed) and its orphan reconciles
(pure, no I/O)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from cbtstream.config import Settings
from cbtstream.errors import CbtStreamError
from cbtstream.metrics import Metrics
from schemas.events import FailureReason, ReplicationType, SyncFailed
from streams.metrics import PlannerMetrics, disk_state, row_partition
from streams.orphans import register_orphans
from streams.state import DiskState, RunningSync
from tests.unit.factories import EPOCH_A, T0, disk, snap

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(m: Metrics) -> Samples:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(m.render().decode()) for s in fam.samples}


def series(s: Samples, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {labels: v for (n, labels), v in s.items() if n == name}


def running(key: int, minutes: int) -> RunningSync:
    d = disk(key)
    return RunningSync(sync_id=uuid.uuid4(), snapshot_event_id=uuid.uuid4(),
                       vm_snapshot="snapshot-9", previous_change_id=None, change_id=f"{EPOCH_A}/9",
                       replication_type=ReplicationType.FULL, disk=d,
                       taken_at=T0 + timedelta(minutes=minutes),
                       planned_at=T0 + timedelta(minutes=minutes))


def test_copies_are_read_at_each_scrape() -> None:
    m = Metrics()
    held = {"queued": 0, "running": 0}
    m.count_copies(lambda: held["queued"], lambda: held["running"])
    assert series(samples(m), "cbtstream_copies") == {(("state", "queued"),): 0,
                                                      (("state", "running"),): 0}
    held.update(queued=7, running=4)
    assert series(samples(m), "cbtstream_copies") == {(("state", "queued"),): 7,
                                                      (("state", "running"),): 4}


def test_rows_give_states_last_commits_vms_and_the_oldest_needed_snapshot() -> None:
    committed = DiskState(disk=disk(2000), change_id=f"{EPOCH_A}/3", committed_at=T0,
                          read={"cbt.changeid.committed#1": 5})
    busy = DiskState(disk=disk(2001), change_id=f"{EPOCH_A}/3", committed_at=T0,
                     running=running(2001, 30), waiting=snap(disk(2001), None, minutes=40))
    failed = DiskState(disk=disk(2002), last_failure="nbd_error")
    new = DiskState(disk=disk(2003))
    assert [disk_state(r) for r in (committed, busy, failed, new)] == [
        "synced", "running", "failed", "new"]

    pm = PlannerMetrics()
    pm.observe_rows([committed, busy, failed, new], now=T0 + timedelta(hours=1))
    s = samples(pm.metrics)
    assert series(s, "cbtstream_disks") == {(("state", st),): 1.0
                                            for st in ("running", "failed", "synced", "new")}
    assert series(s, "cbtstream_disk_last_commit_timestamp_seconds") == {
        (("disk_key", disk(2000).key),): T0.timestamp(),
        (("disk_key", disk(2001).key),): T0.timestamp()}
    info = series(s, "cbtstream_disk_info")
    assert len(info) == 4 and set(info.values()) == {1.0}
    assert (("disk_key", disk(2002).key), ("vm_instance_uuid", disk().vm_instance_uuid),
            ("vm_name", "pgtest1")) in info
    # the running sync's snapshot (taken at +30 min) is older than the waiting one (+40 min)
    assert series(s, "cbtstream_snapshot_oldest_age_seconds") == {(): 30 * 60.0}

    # the next scrape replaces the series: a disk gone from the rows disappears
    pm.observe_rows([committed], now=T0 + timedelta(hours=1))
    s = samples(pm.metrics)
    assert series(s, "cbtstream_disks")[(("state", "running"),)] == 0
    assert list(series(s, "cbtstream_disk_info")) == [
        (("disk_key", disk(2000).key), ("vm_instance_uuid", disk().vm_instance_uuid),
         ("vm_name", "pgtest1"))]
    assert len(series(s, "cbtstream_disk_last_commit_timestamp_seconds")) == 1
    assert series(s, "cbtstream_snapshot_oldest_age_seconds") == {(): 0.0}


def test_row_partition_comes_from_the_inputs_it_recorded() -> None:
    assert row_partition(DiskState(disk=disk(), read={"t.cbt.snapshot.taken#3": 17})) == 3
    assert row_partition(DiskState(disk=disk())) is None


def test_orphan_reconciles() -> None:
    pm = PlannerMetrics()
    s = samples(pm.metrics)
    # every result and the gauge exist from the start, so rules can tell 0 from "no worker"
    assert series(s, "cbtstream_orphan_reconciles_total") == {
        (("result", r),): 0.0 for r in ("done", "failed", "skipped")}
    assert series(s, "cbtstream_orphan_snapshots") == {(): 0.0}
    pm.observe_reconcile("done", 2)
    pm.observe_reconcile("failed")
    s = samples(pm.metrics)
    assert series(s, "cbtstream_orphan_snapshots") == {(): 2.0}
    assert series(s, "cbtstream_orphan_reconciles_total")[(("result", "failed"),)] == 1.0


def test_the_planners_own_failures_count_as_failed_syncs() -> None:
    pm = PlannerMetrics()
    timed_out = SyncFailed(disk=disk(), sync_id=uuid.uuid4(), vm_snapshot="snapshot-1",
                           reason=FailureReason.SYNC_TIMED_OUT)
    pm.observe_step("sync-checks", "timed_out", [timed_out])
    pm.observe_step("sync-checks", "redelivered", [timed_out])  # republished: not again
    assert series(samples(pm.metrics), "cbtstream_syncs_total") == {
        (("outcome", "failed"), ("reason", "sync_timed_out"), ("replication_type", "")): 1.0}


class _App:
    """What ``register_orphans`` uses of a Faust app: a page and a task."""

    def __init__(self) -> None:
        self.tasks: list[Callable[[], Awaitable[None]]] = []

    def page(self, path: str, name: str) -> Callable[[Any], Any]:
        return lambda view: view

    def task(self, fn: Callable[[], Awaitable[None]]) -> None:
        self.tasks.append(fn)


@dataclass
class _Found:
    orphans: list[str]


class _Reaper:
    """Finds two orphans, then fails."""

    def __init__(self) -> None:
        self.calls = 0

    async def reconcile(self, needed: Collection[tuple[str, str]], publisher: Any) -> _Found:
        self.calls += 1
        if self.calls > 1:
            raise CbtStreamError("vSphere unreachable")
        return _Found(["snapshot-1", "snapshot-2"])

    async def stop(self) -> None:
        return None


async def test_the_worker_counts_its_orphan_reconciles() -> None:
    pm = PlannerMetrics()
    app, reaper = _App(), _Reaper()
    whole = iter([False, True, True])

    async def needs() -> set[tuple[str, str]] | None:
        return set() if next(whole, True) else None

    async def send(event: Any) -> None:
        return None

    failed = asyncio.Event()

    def observe(result: str, orphans: int | None) -> None:
        pm.observe_reconcile(result, orphans)
        if result == "failed":
            failed.set()

    settings = Settings(streams={"orphan_interval_s": 0.01})
    register_orphans(app, settings, needs, send, reaper, observe)
    task = asyncio.create_task(app.tasks[0]())
    try:
        await asyncio.wait_for(failed.wait(), 10)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    s = samples(pm.metrics)
    runs = series(s, "cbtstream_orphan_reconciles_total")
    assert runs[(("result", "skipped"),)] == 1 and runs[(("result", "done"),)] == 1
    assert runs[(("result", "failed"),)] == 1
    assert series(s, "cbtstream_orphan_snapshots") == {(): 2.0}  # a failure keeps the last count
