"""The table's status (streams/status.py), the merge of the workers' parts (streams/gather.py,
streams/shards.py, streams/orphans.py): pure rules, no worker."""

from __future__ import annotations

import time
import uuid
from datetime import timedelta

import pytest

from cbtstream.kafka import key_partition
from schemas.events import ReplicationType, SyncProgress
from streams.gather import Shard, coverage
from streams.orphans import merge_needs, needs_part
from streams.shards import select
from streams.state import DiskState, RunningSync
from streams.status import Policy, disk_status, merge_summaries, summarize
from tests.unit.factories import T0, VM, disk, snap

NOW = T0 + timedelta(days=2)
POLICY = Policy(rpo_s=86400, at_risk=0.75, silent_after_s=180, unserved=frozenset({"idle"}),
                live={"default": 1, "idle": 0})


def committed(key: int = 2000, *, age: timedelta = timedelta(hours=1), vm: str = VM,
              **extra: object) -> DiskState:
    return DiskState(disk=disk(key, vm=vm), change_id=f"52 8a-7a 73/{key}", commits=1,
                     committed_at=NOW - age, commit_taken_at=NOW - age,
                     replication_type=ReplicationType.FULL, **extra)  # type: ignore[arg-type]


def running(row: DiskState, *, pool: str = "default", planned: timedelta = timedelta(0)
            ) -> DiskState:
    sync = RunningSync(sync_id=uuid.uuid4(), snapshot_event_id=uuid.uuid4(),
                       vm_snapshot="snapshot-9", previous_change_id=row.change_id,
                       change_id="52 8a-7a 73/99", replication_type=ReplicationType.INCREMENTAL,
                       disk=row.disk, taken_at=NOW - planned, planned_at=NOW - planned,
                       pool=pool)
    return row.model_copy(update={"running": sync, "pool": pool})


def report(row: DiskState, state: str = "running", ago: float = 5) -> tuple[SyncProgress,
                                                                          object]:
    assert row.running is not None
    p = SyncProgress(disk=row.disk, sync_id=row.running.sync_id, bytes_done=10,
                     bytes_total=100, rate_bytes_per_s=1.0, state=state,  # type: ignore[arg-type]
                     queue_position=2 if state == "queued" else None,
                     wait_reason="a copy slot" if state == "queued" else None)
    return p, NOW - timedelta(seconds=ago)


def test_states_of_a_disk() -> None:
    row = running(committed())
    assert disk_status(row, None, NOW, POLICY)["state"] == "planned"
    run = disk_status(row, report(row), NOW, POLICY)  # type: ignore[arg-type]
    assert run["state"] == "running" and run["running"]["bytes_done"] == 10
    queued = disk_status(row, report(row, "queued"), NOW, POLICY)  # type: ignore[arg-type]
    assert queued["state"] == "queued"
    assert (queued["running"]["queue_position"], queued["running"]["bytes_done"]) == (2, None)
    old = running(committed(), planned=timedelta(hours=1))
    assert disk_status(old, report(old, ago=600), NOW, POLICY)["state"] == "silent"  # type: ignore[arg-type]
    idle = running(committed(), pool="idle", planned=timedelta(hours=1))
    assert disk_status(idle, None, NOW, POLICY)["state"] == "waiting_for_pool"
    failed = committed().model_copy(update={"last_failure": "sync_timed_out"})
    assert disk_status(failed, None, NOW, POLICY)["failure"] == {"reason": "sync_timed_out"}
    assert disk_status(committed(), None, NOW, POLICY)["state"] == "synced"
    assert disk_status(DiskState(disk=disk()), None, NOW, POLICY)["state"] == "new"


@pytest.mark.parametrize(("age", "rpo"), [(timedelta(hours=1), "met"),
                                           (timedelta(hours=20), "at_risk"),
                                           (timedelta(hours=25), "missed")])
def test_recovery_point_against_the_rpo(age: timedelta, rpo: str) -> None:
    d = disk_status(committed(age=age), None, NOW, POLICY)
    assert d["rpo"] == rpo and d["age_s"] == age.total_seconds()
    assert disk_status(DiskState(disk=disk()), None, NOW, POLICY)["rpo"] == "none"


def test_summaries_of_disjoint_parts_merge_into_the_summary_of_all() -> None:
    rows = [committed(2000, age=timedelta(hours=30)), committed(2001),
            running(committed(2002), pool="idle", planned=timedelta(hours=1)),
            DiskState(disk=disk(2003))]
    disks = [disk_status(r, None, NOW, POLICY) for r in rows]
    whole = summarize(disks, POLICY)
    merged = merge_summaries([summarize(disks[:1], POLICY), summarize(disks[1:], POLICY)])
    assert merged == whole
    assert whole["states"]["synced"] == 2 and whole["copies"]["waiting_for_pool"] == 1
    assert whole["rpo"] == {"met": 2, "at_risk": 0, "missed": 1, "none": 1}
    assert whole["oldest_commit"]["disk"] == f"{VM}/disk-2000"
    assert whole["pools"]["idle"] == {"disks": 1, "live_copiers": 0, "copies": {
        "queued": 0, "running": 0, "silent": 0, "planned": 0, "waiting_for_pool": 1}}


def test_each_disk_is_measured_against_its_policys_rpo() -> None:
    """A disk a policy snapshotted is measured against that policy's RPO, one no policy did
    against the site's; the summary counts both per policy; an RPO asked for applies to all."""
    gold = dict(policy="gold", rpo_s=900.0)
    rows = [committed(2000, age=timedelta(minutes=10), **gold),   # 600 s of 900: met
            committed(2001, age=timedelta(minutes=12), **gold),   # 720 s > 675: at risk
            committed(2002, age=timedelta(minutes=20), **gold),   # 1200 s > 900: missed
            committed(2003, age=timedelta(hours=2))]              # 2 h of the site's day: met
    disks = [disk_status(r, None, NOW, POLICY) for r in rows]
    assert [d["rpo"] for d in disks] == ["met", "at_risk", "missed", "met"]
    assert (disks[0]["policy"], disks[0]["policy_rpo_s"]) == ("gold", 900.0)
    assert (disks[3]["policy"], disks[3]["policy_rpo_s"]) == (None, None)
    whole = summarize(disks, POLICY)
    assert whole["policies"] == {
        "-": {"rpo_s": 86400, "disks": 1, "rpo": {"met": 1, "at_risk": 0, "missed": 0, "none": 0}},
        "gold": {"rpo_s": 900.0, "disks": 3,
                 "rpo": {"met": 1, "at_risk": 1, "missed": 1, "none": 0}}}
    assert merge_summaries([summarize(disks[:2], POLICY), summarize(disks[2:], POLICY)]) == whole
    asked = Policy(rpo_s=3600, override=True)
    assert [disk_status(r, None, NOW, asked)["rpo"] for r in rows] == ["met"] * 3 + ["missed"]
    assert summarize([disk_status(r, None, NOW, asked) for r in rows], asked)[
        "policies"]["gold"]["rpo_s"] == 3600


def test_a_row_takes_the_policy_of_its_newest_scheduled_snapshot() -> None:
    d = disk(2000)
    first = snap(d, "52 8a-7a 73/1", minutes=0).model_copy(update={"policy": "gold",
                                                                    "rpo_s": 900.0})
    row = DiskState(disk=d).with_snapshot(first)
    assert (row.policy, row.rpo_s) == ("gold", 900.0)
    by_hand = snap(d, "52 8a-7a 73/2", minutes=5)  # `cbtstream snapshot`: no policy
    assert (row.with_snapshot(by_hand).policy, row.with_snapshot(by_hand).rpo_s) == ("gold", 900.0)
    moved = snap(d, "52 8a-7a 73/3", minutes=10).model_copy(update={"policy": "silver",
                                                                     "rpo_s": 3600.0})
    row = row.with_snapshot(moved)
    assert (row.policy, row.rpo_s) == ("silver", 3600.0)
    # an older snapshot delivered late does not take the row back to its policy
    assert row.with_snapshot(first.model_copy(update={"event_id": uuid.uuid4()})).policy == "silver"


def test_coverage_wants_every_partition_once_from_ready_workers() -> None:
    a = Shard("http://a", frozenset({0, 1}), True, {})
    b = Shard("http://b", frozenset({2}), True, {})
    assert coverage([a, b], 3) is None
    assert "no worker" in str(coverage([a], 3))
    assert "claimed by" in str(coverage([a, b, Shard("http://c", frozenset({1}), True, {})], 3))
    assert "recovering" in str(coverage([a, Shard("http://b", frozenset({2}), False, {})], 3))


def test_needs_are_known_only_when_every_part_is_whole() -> None:
    row = running(committed())
    parts = [needs_part([row], True), needs_part([committed(2001)], True)]
    assert merge_needs(parts) == {(VM, "snapshot-9")}
    assert merge_needs([parts[0], needs_part([], False)]) is None


def test_select_rows_by_disk_vm_path_and_job() -> None:
    other = "5012abcd-9999-2222-3333-444455556666"
    rows = [committed(2000), committed(2001), committed(2000, vm=other)]
    assert len(select(rows, {"vm": VM})) == 2
    assert len(select(rows, {"vm": f"{VM},{other}"})) == 3
    assert len(select(rows, {"vm_path": "/DC/vm/pgtest1"})) == 3
    assert select(rows, {"disk": f"{other}/disk-2000"}) == [rows[2]]
    assert select(rows, {}) == []
    job = rows[1].model_copy(update={"external_job_id": "job-1"})
    assert select([rows[0], job], {"job": "job-1"}) == [job]


def test_key_partition_is_kafkas_murmur2() -> None:
    from aiokafka.partitioner import DefaultPartitioner

    for i in range(50):
        key = f"{VM}/disk-{2000 + i}".encode()
        assert key_partition(key, 6) == DefaultPartitioner()(key, list(range(6)), [])


def test_status_of_fifteen_thousand_disks_prints_its_time() -> None:
    """Not a speed assertion: the time is printed (``-s``); the real-worker figure is
    ``python -m cbtctl.bench.status``."""
    rows = [running(committed(2000 + i % 3, vm=f"5012abcd-{i:04x}-2222-3333-444455556666"))
            if i % 10 == 0 else committed(2000 + i % 3,
                                          vm=f"5012abcd-{i:04x}-2222-3333-444455556666")
            for i in range(15_000)]
    t0 = time.perf_counter()
    disks = [disk_status(r, None, NOW, POLICY) for r in rows]
    summary = summarize(disks, POLICY)
    print(f"\nstatus of {len(rows)} rows: {time.perf_counter() - t0:.3f} s")
    assert summary["disks"] == 15_000 and summary["copies"]["planned"] == 1500
