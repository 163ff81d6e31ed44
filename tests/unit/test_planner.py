"""Planner and commit guard: pure rules, tested exhaustively without a broker."""

from __future__ import annotations

from datetime import timedelta

import pytest

from schemas import FullReason, ReplicationType, SyncFailed, SyncPlanned, SyncSuperseded
from streams.guard import Verdict, check_commit
from streams.planner import decide, on_commit, on_failed, on_snapshot
from streams.state import DiskState
from tests.unit.factories import EPOCH_A, EPOCH_B, T0, commit_for, disk, snap

NOW = T0


def _plan(out: list[object]) -> SyncPlanned:
    (plan,) = [o for o in out if isinstance(o, SyncPlanned)]
    return plan


def _committed(d=None, change_id: str = f"{EPOCH_A}/5") -> DiskState:
    """A disk whose latest commit is ``change_id`` and that has nothing running."""
    d = d or disk()
    s, out = on_snapshot(None, snap(d, change_id), NOW)
    s, out2 = on_commit(s, commit_for(_plan(out)), NOW)
    assert s is not None and s.change_id == change_id and not out2
    return s


def test_first_snapshot_plans_full_no_previous_commit() -> None:
    s, out = on_snapshot(None, snap(disk(), f"{EPOCH_A}/1"), NOW)
    plan = _plan(out)
    assert plan.replication_type == ReplicationType.FULL
    assert plan.reason == FullReason.NO_PREVIOUS_COMMIT
    assert plan.base_change_id is None and plan.previous_change_id is None
    assert s.running is not None and s.running.sync_id == plan.sync_id


def test_second_snapshot_is_incremental_from_own_change_id() -> None:
    s = _committed()
    _, out = on_snapshot(s, snap(disk(), f"{EPOCH_A}/9", minutes=5, snapshot="snapshot-2"), NOW)
    plan = _plan(out)
    assert plan.replication_type == ReplicationType.INCREMENTAL
    assert plan.reason == FullReason.PREVIOUS_COMMIT
    assert plan.base_change_id == f"{EPOCH_A}/5"


def test_two_disks_each_get_their_own_change_id() -> None:
    """The seed's bug: disk-2000 must never be planned from disk-2001's change ID."""
    d0, d1 = disk(2000), disk(2001)
    s0, s1 = _committed(d0, f"{EPOCH_A}/3"), _committed(d1, f"{EPOCH_B}/7")
    _, o0 = on_snapshot(s0, snap(d0, f"{EPOCH_A}/4", minutes=5), NOW)
    _, o1 = on_snapshot(s1, snap(d1, f"{EPOCH_B}/8", minutes=5), NOW)
    assert _plan(o0).base_change_id == f"{EPOCH_A}/3"
    assert _plan(o1).base_change_id == f"{EPOCH_B}/7"


@pytest.mark.parametrize(
    ("new_disk", "change_id", "reason"),
    [
        (disk(), None, FullReason.CBT_NOT_ENABLED),
        (disk(), f"{EPOCH_B}/9", FullReason.EPOCH_CHANGED),
        (disk(), f"{EPOCH_A}/5", FullReason.SEQUENCE_NOT_INCREASING),
        (disk(), f"{EPOCH_A}/2", FullReason.SEQUENCE_NOT_INCREASING),
        (disk(backing_uuid="6000C29ffff"), f"{EPOCH_A}/9", FullReason.BACKING_UUID_CHANGED),
        (disk(backing_file="[ds2] other.vmdk"), f"{EPOCH_A}/9", FullReason.BACKING_FILE_CHANGED),
        (disk(capacity=2 << 30), f"{EPOCH_A}/9", FullReason.CAPACITY_CHANGED),
    ],
)
def test_untrusted_change_id_plans_full_with_reason(new_disk, change_id, reason) -> None:
    d = decide(disk(), f"{EPOCH_A}/5", snap(new_disk, change_id))
    assert d.replication_type == ReplicationType.FULL
    assert d.reason == reason
    assert d.base_change_id is None


def test_delta_file_suffix_is_the_same_disk() -> None:
    delta = disk(backing_file="[ds1] pgtest1/pgtest1_2000-000001.vmdk")
    d = decide(disk(), f"{EPOCH_A}/5", snap(delta, f"{EPOCH_A}/6"))
    assert d.replication_type == ReplicationType.INCREMENTAL


def test_redelivered_snapshot_republishes_its_plan() -> None:
    ev = snap(disk(), f"{EPOCH_A}/1")
    s, out = on_snapshot(None, ev, NOW)
    s2, out2 = on_snapshot(s, ev, NOW + timedelta(minutes=3))
    assert len(out) == 1 and out2 == out and s2 == s


def test_snapshot_waits_while_sync_runs_and_newer_supersedes() -> None:
    d = disk()
    s, out = on_snapshot(None, snap(d, f"{EPOCH_A}/1"), NOW)
    first = _plan(out)
    s, out = on_snapshot(s, snap(d, f"{EPOCH_A}/2", minutes=1, snapshot="snapshot-2"), NOW)
    assert out == [] and s.waiting is not None
    s2_id = s.waiting.event_id
    s, out = on_snapshot(s, snap(d, f"{EPOCH_A}/3", minutes=2, snapshot="snapshot-3"), NOW)
    (sup,) = out
    assert isinstance(sup, SyncSuperseded) and sup.snapshot_event_id == s2_id
    assert sup.vm_snapshot == "snapshot-2"
    # the running sync commits -> the waiting (newest) snapshot is planned incrementally
    s, out = on_commit(s, commit_for(first), NOW)
    plan = _plan(out)
    assert plan.vm_snapshot == "snapshot-3"
    assert plan.replication_type == ReplicationType.INCREMENTAL
    assert plan.base_change_id == f"{EPOCH_A}/1"
    assert s is not None and s.waiting is None and s.running is not None


def test_older_snapshot_than_committed_is_superseded_not_copied() -> None:
    s = _committed()
    _, out = on_snapshot(s, snap(disk(), f"{EPOCH_A}/4", minutes=-10), NOW)
    assert len(out) == 1 and isinstance(out[0], SyncSuperseded)


def test_failure_releases_disk_and_starts_waiting() -> None:
    d = disk()
    s, out = on_snapshot(None, snap(d, f"{EPOCH_A}/1"), NOW)
    first = _plan(out)
    s, _ = on_snapshot(s, snap(d, f"{EPOCH_A}/2", minutes=1), NOW)
    failed = SyncFailed(disk=d, sync_id=first.sync_id, reason="source_error")
    s, out = on_failed(s, failed, NOW)
    plan = _plan(out)
    assert plan.replication_type == ReplicationType.FULL  # nothing committed yet
    assert s is not None and s.last_failure == "source_error"
    # another failure of the finished sync is a duplicate: the row stays, what followed the
    # first failure (the plan now running) is published again
    s2, out2 = on_failed(s, SyncFailed(disk=d, sync_id=first.sync_id, reason="x"), NOW)
    assert s2 == s and out2 == [plan]


def test_guard_accepts_exact_lineage_and_drops_duplicates() -> None:
    s, out = on_snapshot(None, snap(disk(), f"{EPOCH_A}/1"), NOW)
    c = commit_for(_plan(out))
    assert check_commit(s, c).verdict == Verdict.ACCEPT
    s2, _ = on_commit(s, c, NOW)
    assert check_commit(s2, c).verdict == Verdict.DUPLICATE
    s3, out3 = on_commit(s2, c, NOW)
    assert s3 == s2 and out3 == []


def test_guard_refuses_foreign_change_id_as_lineage_mismatch() -> None:
    d0, d1 = disk(2000), disk(2001)
    s0 = _committed(d0, f"{EPOCH_A}/3")
    s0, out = on_snapshot(s0, snap(d0, f"{EPOCH_A}/4", minutes=5), NOW)
    plan = _plan(out)
    bad = commit_for(plan, previous_change_id=f"{EPOCH_B}/7")  # disk-2001's change ID
    s0b, out = on_commit(s0, bad, NOW)
    (failed,) = out
    assert isinstance(failed, SyncFailed) and failed.reason == "lineage_mismatch"
    assert s0b is not None and s0b.change_id == f"{EPOCH_A}/3"  # never applied
    assert s0b.running is None
    _ = d1


@pytest.mark.parametrize(
    "overrides",
    [
        {"change_id": f"{EPOCH_A}/99"},
        {"replication_type": ReplicationType.INCREMENTAL},
        {"sync_id": "00000000-0000-0000-0000-000000000001"},
        {"disk": disk(capacity=123)},
    ],
)
def test_guard_refuses_commit_that_does_not_match_plan(overrides) -> None:
    s, out = on_snapshot(None, snap(disk(), f"{EPOCH_A}/1"), NOW)
    c = commit_for(_plan(out), **overrides)
    assert check_commit(s, c).verdict == Verdict.REFUSE


def test_guard_refuses_commit_for_unknown_disk() -> None:
    _, out = on_snapshot(None, snap(disk(), f"{EPOCH_A}/1"), NOW)
    assert check_commit(None, commit_for(_plan(out))).verdict == Verdict.REFUSE


def test_guard_allows_fallback_from_incremental_to_full() -> None:
    s = _committed()
    s, out = on_snapshot(s, snap(disk(), f"{EPOCH_A}/9", minutes=5), NOW)
    c = commit_for(_plan(out), replication_type=ReplicationType.FULL,
                   reason=FullReason.BASE_CHANGE_ID_REJECTED)
    assert check_commit(s, c).verdict == Verdict.ACCEPT


def test_watchdog_flags_only_idle_partitions_with_pending_records() -> None:
    from streams.watchdog import stalled

    assert stalled(committed=2, highwater=3, in_flight=False, previous=2)
    assert not stalled(committed=2, highwater=3, in_flight=False, previous=1)  # progressing
    assert not stalled(committed=3, highwater=3, in_flight=False, previous=3)  # caught up
    assert not stalled(committed=2, highwater=3, in_flight=True, previous=2)  # being handled
    assert not stalled(committed=None, highwater=3, in_flight=False, previous=None)


def test_plan_generations_strictly_increase_and_survive_a_table_rebuild() -> None:
    """Each plan of a disk gets a larger generation than the one before; a table rebuilt from
    nothing still issues generations above those of plans made before (snapshot time bound)."""
    d = disk()
    s, out = on_snapshot(None, snap(d, f"{EPOCH_A}/1"), NOW)
    g1 = _plan(out).generation
    assert g1 > 0 and s.plan_generation == g1 and s.running is not None
    assert s.running.generation == g1
    s, out = on_commit(s, commit_for(_plan(out)), NOW)
    # a snapshot with the same time (clock skew) still gets a larger generation
    assert s is not None
    _, out2 = on_snapshot(s, snap(d, f"{EPOCH_A}/2", snapshot="snapshot-2").model_copy(
        update={"taken_at": T0 + timedelta(microseconds=1)}), NOW)
    g2 = _plan(out2).generation
    assert g2 > g1
    # rebuilt table: a fresh row, a newer snapshot -> generation above both
    _, out3 = on_snapshot(None, snap(d, f"{EPOCH_A}/3", minutes=1, snapshot="snapshot-3"), NOW)
    assert _plan(out3).generation > g2
    assert _plan(out3).snapshot_taken_at == T0 + timedelta(minutes=1)
