"""The replica guard (consumers/replica/guard.py): every rule, without I/O."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest

from consumers.replica.guard import Action, ReplicaView, admit
from consumers.replica.state import (
    HeldSync,
    ReplicaState,
    ReplicaStatus,
    TargetIdentity,
    TargetKind,
    Unknown,
    WritingSync,
)
from schemas import FullReason, ReplicationType, SyncPlanned
from streams.planner import on_commit, on_snapshot
from tests.unit.factories import EPOCH_A, T0, commit_for, disk, snap

PIPE = "cbtstream"
FILE = TargetIdentity(kind=TargetKind.FILE, location="/r/x.img", device=1, inode=7, size=1 << 30)


def _plans() -> tuple[SyncPlanned, SyncPlanned, SyncPlanned]:
    """Three consecutive plans of one disk: full, then two incrementals."""
    d = disk()
    s, out = on_snapshot(None, snap(d, f"{EPOCH_A}/1"), T0)
    p1 = out[0]
    s, _ = on_commit(s, commit_for(p1), T0)
    s, out = on_snapshot(s, snap(d, f"{EPOCH_A}/2", minutes=5, snapshot="snapshot-2"), T0)
    p2 = out[0]
    s, _ = on_commit(s, commit_for(p2), T0)
    _, out = on_snapshot(s, snap(d, f"{EPOCH_A}/3", minutes=10, snapshot="snapshot-3"), T0)
    assert isinstance(p1, SyncPlanned) and isinstance(p2, SyncPlanned)
    assert isinstance(out[0], SyncPlanned)
    return p1, p2, out[0]


def _held(plan: SyncPlanned) -> HeldSync:
    assert plan.change_id is not None
    return HeldSync(sync_id=plan.sync_id, generation=plan.generation, change_id=plan.change_id,
                    vm_snapshot=plan.vm_snapshot, snapshot_taken_at=plan.snapshot_taken_at,
                    replica_digest="blake3tree:1048576:00", tree_file="x.img.tree.1",
                    result={})


def _clean_at(plan: SyncPlanned, **kw: object) -> ReplicaState:
    fields: dict[str, object] = dict(
        pipeline=PIPE, disk_key=plan.disk.key, backing_uuid=plan.disk.backing_uuid,
        capacity_bytes=plan.disk.capacity_bytes, target=FILE, status=ReplicaStatus.CLEAN,
        held=_held(plan))
    fields.update(kw)
    return ReplicaState.model_validate(fields)


def _writing(plan: SyncPlanned) -> WritingSync:
    return WritingSync(sync_id=plan.sync_id, generation=plan.generation,
                       replication_type=plan.replication_type, base_change_id=plan.base_change_id,
                       snapshot_taken_at=plan.snapshot_taken_at)


def test_incremental_onto_its_base_stays_incremental() -> None:
    _, p2, p3 = _plans()
    a = admit(p3, ReplicaView(_clean_at(p2), FILE), PIPE)
    assert (a.action, a.replication_type, a.reason) == (
        Action.WRITE, ReplicationType.INCREMENTAL, FullReason.PREVIOUS_COMMIT)
    assert a.use_held_tree


@pytest.mark.parametrize(("view", "reason"), [
    ("missing", FullReason.REPLICA_MISSING),
    ("no_record", FullReason.REPLICA_STATE_UNKNOWN),
    ("torn", FullReason.REPLICA_STATE_UNKNOWN),
    ("foreign_pipeline", FullReason.REPLICA_STATE_UNKNOWN),
    ("replaced", FullReason.REPLICA_REPLACED),
    ("mismatch", FullReason.REPLICA_MISMATCH),
    ("other_backing", FullReason.REPLICA_NOT_AT_BASE),
    ("older_base", FullReason.REPLICA_NOT_AT_BASE),
    ("dirty_full", FullReason.REPLICA_NOT_AT_BASE),
])
def test_incremental_without_a_proven_base_is_copied_in_full(view: str, reason: FullReason
                                                             ) -> None:
    p1, p2, p3 = _plans()
    views = {
        "missing": ReplicaView(_clean_at(p2), None),
        "no_record": ReplicaView(None, FILE),
        "torn": ReplicaView(Unknown(detail="checksum"), FILE),
        "foreign_pipeline": ReplicaView(_clean_at(p2, pipeline="other"), FILE),
        "replaced": ReplicaView(_clean_at(p2), FILE.model_copy(update={"inode": 8})),
        "mismatch": ReplicaView(_clean_at(p2, status=ReplicaStatus.MISMATCH), FILE),
        "other_backing": ReplicaView(_clean_at(p2, backing_uuid="x"), FILE),
        "older_base": ReplicaView(_clean_at(p1), FILE),
        "dirty_full": ReplicaView(_clean_at(p2, status=ReplicaStatus.DIRTY, writing=_writing(
            p3).model_copy(update={"replication_type": ReplicationType.FULL,
                                   "base_change_id": None})), FILE),
    }
    a = admit(p3, views[view], PIPE)
    assert (a.action, a.replication_type, a.reason) == (Action.WRITE, ReplicationType.FULL,
                                                        reason), a.detail
    assert not a.use_held_tree


def test_resume_of_the_sync_that_left_the_replica_dirty() -> None:
    _, p2, p3 = _plans()
    state = _clean_at(p2, status=ReplicaStatus.DIRTY, writing=_writing(p3))
    a = admit(p3, ReplicaView(state, FILE), PIPE)
    assert (a.action, a.replication_type) == (Action.WRITE, ReplicationType.INCREMENTAL)


def test_old_plans_are_refused_never_written() -> None:
    p1, p2, p3 = _plans()
    # replica holds p3's result: p1 and p2 delivered again are stale
    state = _clean_at(p3)
    for old in (p1, p2):
        assert admit(old, ReplicaView(state, FILE), PIPE).action == Action.REFUSE
    # also while p3 is writing (dirty), and even if the target is gone
    dirty = _clean_at(p2, status=ReplicaStatus.DIRTY, writing=_writing(p3))
    assert admit(p2, ReplicaView(dirty, FILE), PIPE).action == Action.REFUSE
    assert admit(p1, ReplicaView(dirty, None), PIPE).action == Action.REFUSE
    # a plan without a generation (made before generations) is older than any replica record
    legacy = p3.model_copy(update={"generation": 0, "sync_id": uuid.uuid4()})
    assert admit(legacy, ReplicaView(state, FILE), PIPE).action == Action.REFUSE
    # a newer generation of an older snapshot (a table rebuilt, an old snapshot re-published)
    older_snap = p3.model_copy(update={"generation": p3.generation + 5, "sync_id": uuid.uuid4(),
                                       "snapshot_taken_at": T0 - timedelta(days=1)})
    assert admit(older_snap, ReplicaView(state, FILE), PIPE).action == Action.REFUSE


def test_the_plan_the_replica_holds_is_already_applied() -> None:
    _, p2, _ = _plans()
    assert admit(p2, ReplicaView(_clean_at(p2), FILE), PIPE).action == Action.ALREADY_APPLIED
    # the same plan onto a replaced target is written again (in full), not skipped
    a = admit(p2, ReplicaView(_clean_at(p2), FILE.model_copy(update={"inode": 9})), PIPE)
    assert a.action == Action.WRITE and a.replication_type == ReplicationType.FULL


def test_full_plans_are_written_in_full_with_their_reason() -> None:
    p1, _, _ = _plans()
    a = admit(p1, ReplicaView(None, None), PIPE)
    assert (a.action, a.replication_type, a.reason) == (
        Action.WRITE, ReplicationType.FULL, FullReason.NO_PREVIOUS_COMMIT)


def test_a_failed_over_replica_refuses_every_plan_until_failed_back() -> None:
    from schemas.events import FailureReason

    _, p2, p3 = _plans()
    held = _clean_at(p2).failed_over("VM booted in the DR site")
    full = p3.model_copy(update={"replication_type": ReplicationType.FULL,
                                 "base_change_id": None, "reason": FullReason.NO_PREVIOUS_COMMIT})
    for plan in (p3, full):  # incremental or full, from the planner or produced by hand
        a = admit(plan, ReplicaView(held, FILE), PIPE)
        assert a.action == Action.REFUSE and a.failure == FailureReason.REPLICA_FAILED_OVER
        assert "VM booted in the DR site" in a.detail
    # the plan it already holds is no write: its outcome is published again, as always
    assert admit(p2, ReplicaView(held, FILE), PIPE).action == Action.ALREADY_APPLIED
    back = held.failed_back()
    assert back.failed_over_at is None
    assert admit(p3, ReplicaView(back, FILE), PIPE).replication_type == (
        ReplicationType.INCREMENTAL)


def test_the_patrol_leaves_a_failed_over_replica_alone() -> None:
    from pathlib import Path

    from consumers.replica.location import ReplicaLocation
    from consumers.replica.patrol import next_due
    from consumers.replica.store import ReplicaStore
    from consumers.replica.verify import Found

    _, p2, _ = _plans()
    loc = ReplicaLocation(kind=TargetKind.FILE, location="/r/x.img",
                          store=ReplicaStore(Path("/r"), "x.img"), disk_key=p2.disk.key)
    clean = Found(p2.disk.key, loc, _clean_at(p2))
    over = Found(p2.disk.key, loc, _clean_at(p2).failed_over("DR test"))
    assert next_due([over]) is None  # the operator's: failback checks it
    assert next_due([over, clean]) is clean


def test_a_replica_rolled_back_to_a_point_is_rebased_not_copied_in_full() -> None:
    """failover --at: the replica holds p1's point while the disk's last commit is p2's; the
    next plan (base p2) stays incremental, from p1's change ID."""
    p1, p2, p3 = _plans()
    rolled = _clean_at(p1, rolled_back_from=p2.change_id)
    high = rolled.model_copy(update={"held": _held(p1).model_copy(
        update={"generation": p2.generation})})  # the rollback keeps the high water
    a = admit(p3, ReplicaView(high, FILE), PIPE)
    assert (a.action, a.replication_type, a.reason, a.base_change_id) == (
        Action.WRITE, ReplicationType.INCREMENTAL, FullReason.REPLICA_REBASED, p1.change_id)
    assert a.use_held_tree and p3.base_change_id == p2.change_id
    # without the rollback's mark the same record is an unexplained replica: a full copy
    plain = admit(p3, ReplicaView(_clean_at(p1), FILE), PIPE)
    assert (plain.replication_type, plain.reason) == (ReplicationType.FULL,
                                                     FullReason.REPLICA_NOT_AT_BASE)
    # another CBT epoch since the point: its change ID says nothing of the new snapshot
    other_epoch = p3.model_copy(update={"change_id": "52 aa bb cc dd ee ff 00-11 22 33 44 55 66 "
                                        "77 88/4"})
    a = admit(other_epoch, ReplicaView(high, FILE), PIPE)
    assert (a.replication_type, a.reason) == (ReplicationType.FULL,
                                             FullReason.REPLICA_NOT_AT_BASE)
    # an interrupted rebased copy resumes rebased
    resumed = _writing(p3).model_copy(update={"base_change_id": p1.change_id})
    dirty = high.model_copy(update={"status": ReplicaStatus.DIRTY, "writing": resumed})
    a = admit(p3, ReplicaView(dirty, FILE), PIPE)
    assert (a.replication_type, a.reason) == (ReplicationType.INCREMENTAL,
                                             FullReason.REPLICA_REBASED)
    # the point's own plan, delivered again, is not "already applied" (no outcome recorded
    # for it): the generation fence refuses it
    assert admit(p1, ReplicaView(high, FILE), PIPE).action == Action.REFUSE
