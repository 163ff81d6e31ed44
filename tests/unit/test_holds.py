"""The planner's rule for a failed-over VM (streams.holds) and the hold book's merge, without
Kafka: a snapshot is refused with a reason, nothing is planned, the row keeps its commit, a
redelivery publishes the same refusal, and a release ends the hold."""

from __future__ import annotations

import uuid
from datetime import timedelta

from cbtstream.config import KafkaSettings
from schemas.events import (
    FailureReason,
    HoldState,
    ReplicationHold,
    SyncFailed,
    SyncPlanned,
)
from streams import lifecycle
from streams.holds import HELD, HoldBook, hold_detail, refusal_id, refuse_snapshot
from streams.planner import on_commit, on_snapshot
from tests.unit.factories import EPOCH_A, T0, VM, commit_for, disk, snap


def _hold(state: HoldState, minutes: int = 0) -> ReplicationHold:
    return ReplicationHold(vm_instance_uuid=uuid.UUID(VM), state=state, reason="DR test",
                           occurred_at=T0 + timedelta(minutes=minutes))


def test_a_failed_over_vm_gets_no_plan_and_keeps_its_commit() -> None:
    d = disk()
    s, out = on_snapshot(None, snap(d, f"{EPOCH_A}/1"), T0)
    assert isinstance(out[0], SyncPlanned)
    s, _ = on_commit(s, commit_for(out[0]), T0)
    assert s is not None
    hold = _hold(HoldState.FAILED_OVER)
    s2 = snap(d, f"{EPOCH_A}/2", minutes=15, snapshot="snapshot-2").model_copy(
        update={"snapshot_device_keys": (2000,)})
    step = refuse_snapshot(s, s2, T0, hold_detail(hold))
    [refusal] = step.outputs
    assert isinstance(refusal, SyncFailed) and refusal.reason == FailureReason.VM_FAILED_OVER
    assert refusal.sync_id is None and "DR test" in refusal.detail
    assert step.state is not None and step.state.running is None
    assert step.state.change_id == s.change_id  # the replica's lineage is untouched
    # the snapshot is finished with: the lifecycle removes it
    assert [n.outcome for n in lifecycle.notices(step.ended)] == ["failed"]
    again = refuse_snapshot(step.state, s2, T0 + timedelta(minutes=1), hold_detail(hold))
    assert again.kind == "redelivered" and again.outputs == [refusal]


def test_the_latest_hold_of_a_vm_wins_and_a_release_ends_it() -> None:
    book = HoldBook(KafkaSettings())
    over, back = _hold(HoldState.FAILED_OVER), _hold(HoldState.RELEASED, minutes=30)
    book.apply(over.key.encode(), over.model_dump_json().encode())
    assert book.hold_of(VM) == over and book.hold_of(VM.upper()) == over
    book.apply(back.key.encode(), back.model_dump_json().encode())
    assert book.hold_of(VM) is None
    book.apply(over.key.encode(), over.model_dump_json().encode())  # an older record again
    assert book.hold_of(VM) is None
    book.apply(over.key.encode(), b"{not json")  # ignored, logged
    book.apply(over.key.encode(), None)  # a tombstone drops the VM's record
    assert book.records == {} and book.hold_of("not-a-uuid") is None


def test_the_audit_keeps_each_hold_under_its_vm() -> None:
    from consumers.audit.decoding import audited_event
    from consumers.audit.projection import EVENT_COLUMNS, event_row, project
    from schemas.topics import HOLDS

    hold = _hold(HoldState.FAILED_OVER)
    got = audited_event(HOLDS, hold.key.encode(), hold.model_dump_json().encode())
    assert got == hold
    row = dict(zip(EVENT_COLUMNS, event_row(HOLDS.name, 0, 7, hold), strict=True))
    assert row["vm_instance_uuid"] == uuid.UUID(VM) and row["disk_key"] is None
    assert project(hold) == []  # the events row is its record
    assert audited_event(HOLDS, hold.key.encode(), None) is None  # a tombstone: skipped


def test_a_cut_over_vm_is_refused_with_its_own_reason_and_id() -> None:
    d = disk()
    s0, out = on_snapshot(None, snap(d, f"{EPOCH_A}/1"), T0)
    assert isinstance(out[0], SyncPlanned)
    s, _ = on_commit(s0, commit_for(out[0]), T0)
    assert s is not None
    book = HoldBook(KafkaSettings())
    cut = _hold(HoldState.CUT_OVER)
    book.apply(cut.key.encode(), cut.model_dump_json().encode())
    hold = book.hold_of(VM)
    assert hold == cut and HELD[hold.state] == FailureReason.VM_CUT_OVER
    later = snap(d, f"{EPOCH_A}/2", minutes=15, snapshot="snapshot-2")
    step = refuse_snapshot(s, later, T0, hold_detail(hold), HELD[hold.state])
    [refusal] = step.outputs
    assert isinstance(refusal, SyncFailed) and refusal.reason == FailureReason.VM_CUT_OVER
    assert "cut over" in refusal.detail and "failover --undo" not in refusal.detail
    # not the id a failed-over refusal of the same snapshot has: the replay tells them apart
    assert refusal.event_id == refusal_id(later, FailureReason.VM_CUT_OVER) != refusal_id(later)
    assert step.state is not None and step.state.change_id == s.change_id


def test_the_audit_keeps_a_cutover_under_its_vm() -> None:
    from consumers.audit.decoding import audited_event
    from consumers.audit.projection import EVENT_COLUMNS, event_row, project
    from schemas.events import CutoverCompleted, CutoverDisk
    from schemas.topics import CUTOVERS, topic_for

    d = disk()
    done = CutoverCompleted(
        vm_instance_uuid=uuid.UUID(VM), vcenter="vc", vm_snapshot="snapshot-9", taken_at=T0,
        stopped_by="power_off", description=None, disks=(CutoverDisk(
            disk=d, change_id=f"{EPOCH_A}/9", sync_id=uuid.uuid4(), replica_location="/r/1",
            replica_digest="blake3tree2:65536:1048576:" + "0" * 64,
            source_digest="blake3tree2:65536:1048576:" + "0" * 64),))
    assert topic_for(done) is CUTOVERS
    assert audited_event(CUTOVERS, done.key.encode(), done.model_dump_json().encode()) == done
    row = dict(zip(EVENT_COLUMNS, event_row(CUTOVERS.name, 0, 3, done), strict=True))
    assert row["vm_instance_uuid"] == uuid.UUID(VM) and row["vm_snapshot"] == "snapshot-9"
    assert project(done) == []
