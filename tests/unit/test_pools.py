"""Copier pools in the planner (pure): a disk takes its configured pool at its first plan and
keeps it, a move makes the next plan a full copy into the new pool, and the pool survey tells
which running syncs wait for a pool without copiers."""

from __future__ import annotations

from datetime import timedelta

from cbtstream.config import PoolAssignment, PoolsSettings
from cbtstream.kafka import copier_group_id
from schemas import FullReason, ReplicationType, SyncPlanned
from streams.planner import commit_step, move_step, snapshot_step
from streams.pools import PoolMove, as_move, pools_in_use, survey
from streams.state import DiskState, to_json
from tests.unit.factories import EPOCH_A, T0, VM, commit_for, disk, snap

NOW = T0 + timedelta(minutes=1)


def _plan(outputs: list[object]) -> SyncPlanned:
    (plan,) = [o for o in outputs if isinstance(o, SyncPlanned)]
    return plan


def _seeded(pool: str) -> DiskState:
    step = snapshot_step(None, snap(disk(), f"{EPOCH_A}/1"), NOW, pool=pool)
    plan = _plan(step.outputs)
    assert plan.pool == pool and step.state is not None and step.state.pool == pool
    done = commit_step(step.state, commit_for(plan), NOW)
    assert done.state is not None and done.state.commit_pool == pool
    return done.state


def test_configured_pool_by_disk_then_vm_then_default() -> None:
    d = disk()
    pools = PoolsSettings(default="main", assign=(
        PoolAssignment(vm=VM.upper(), pool="vm-pool"),
        PoolAssignment(disk=d.key, pool="disk-pool")))
    assert pools.pool_for(d.key) == "disk-pool"
    assert pools.pool_for(f"{VM}/disk-2001") == "vm-pool"
    assert pools.pool_for("5012abcd-0000-0000-0000-000000000000/disk-1") == "main"


def test_a_disk_keeps_its_pool_when_the_configuration_changes() -> None:
    state = _seeded("a")
    step = snapshot_step(state, snap(disk(), f"{EPOCH_A}/2", minutes=5, snapshot="snapshot-2"),
                         NOW, pool="b")
    plan = _plan(step.outputs)
    assert plan.pool == "a"
    assert plan.replication_type == ReplicationType.INCREMENTAL
    pools = PoolsSettings(default="b")
    assert survey([to_json(step.state)], {"a": 1}, pools).mismatched == 1  # type: ignore[arg-type]


def test_a_move_makes_the_next_plan_full_in_the_new_pool() -> None:
    state = _seeded("a")
    moved = move_step(state, "b")
    assert moved.kind == "pool_moved" and moved.state is not None and moved.state.pool == "b"
    step = snapshot_step(moved.state, snap(disk(), f"{EPOCH_A}/2", minutes=5,
                                           snapshot="snapshot-2"), NOW, pool="a")
    plan = _plan(step.outputs)
    assert (plan.pool, plan.replication_type, plan.reason) == (
        "b", ReplicationType.FULL, FullReason.POOL_MOVED)
    committed = commit_step(step.state, commit_for(plan), NOW)
    assert committed.state is not None and committed.state.commit_pool == "b"
    # once the new pool holds the replica, incrementals again
    again = snapshot_step(committed.state, snap(disk(), f"{EPOCH_A}/3", minutes=10,
                                                snapshot="snapshot-3"), NOW, pool="a")
    assert _plan(again.outputs).replication_type == ReplicationType.INCREMENTAL
    assert move_step(committed.state, "b").kind == "idle"  # already there
    assert move_step(None, "b").kind == "idle"  # unknown disk: nothing to move


def test_rows_and_plans_from_before_pools_are_in_the_default_pool() -> None:
    state = _seeded("default").model_copy(update={"pool": None, "commit_pool": None})
    step = snapshot_step(state, snap(disk(), f"{EPOCH_A}/2", minutes=5, snapshot="snapshot-2"),
                         NOW, pool="default")
    plan = _plan(step.outputs)
    assert plan.pool == "default" and plan.replication_type == ReplicationType.INCREMENTAL
    assert copier_group_id("p.", "default") == "p.cbtstream-copier"
    assert copier_group_id("p.", "nfs") == "p.cbtstream-copier.nfs"


def test_survey_counts_running_syncs_of_pools_without_copiers() -> None:
    running = _plan(snapshot_step(None, snap(disk(), f"{EPOCH_A}/1"), NOW, pool="b").outputs)
    row_b = snapshot_step(None, snap(disk(), f"{EPOCH_A}/1"), NOW, pool="b").state
    row_a = snapshot_step(None, snap(disk(2001), f"{EPOCH_A}/1"), NOW, pool="a").state
    assert running.pool == "b" and row_a is not None and row_b is not None
    rows = [to_json(row_a), to_json(row_b), None]
    pools = PoolsSettings(default="a", assign=(PoolAssignment(disk=disk().key, pool="b"),))
    assert pools_in_use(rows, pools) == {"a", "b"}
    view = survey(rows, {"a": 2, "b": 0}, pools)
    assert view.unserved() == {"b"} and dict(view.waiting) == {"b": 1}
    assert view.mismatched == 0
    unknown = survey(rows, {}, pools)  # the broker did not answer: nobody is said to wait
    assert unknown.unserved() == set() and not unknown.waiting


def test_pool_moves_and_time_out_checks_share_the_checks_topic() -> None:
    move = PoolMove(disk_key=disk().key, pool="b", at=NOW, requested_by="ops")
    assert as_move(move.model_dump_json().encode()) == move
    assert as_move(b'{"disk_key": "x", "sync_id": "00000000-0000-0000-0000-000000000000"}') \
        is None


def test_time_waiting_for_a_pool_is_not_silence() -> None:
    from streams.timeouts import silent

    row = snapshot_step(None, snap(disk(), f"{EPOCH_A}/1"), NOW, pool="b").state
    assert row is not None and row.running is not None
    raw = to_json(row)
    timeout = timedelta(seconds=30)
    later = NOW + timedelta(minutes=10)
    check = silent(raw, later, timeout, {})
    assert check is not None and check.last_progress is None  # silent for 10 minutes
    # the pool had no copier until a minute ago: the returning copier gets a whole time-out
    assert silent(raw, later, timeout, {}, {"b": later - timedelta(seconds=20)}) is None
    # another pool's wait does not count, nor an old one
    assert silent(raw, later, timeout, {}, {"a": later}) is not None
    old = silent(raw, later, timeout, {}, {"b": later - timedelta(minutes=5)})
    assert old is not None and old.last_progress == later - timedelta(minutes=5)
