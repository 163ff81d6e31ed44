"""External copiers' store calls (streams/external.py): which disk, which commit, who owns it."""

from __future__ import annotations

from schemas import ReplicationType
from streams.external import Ownership, StoreRequest, check_external, locate, store
from streams.guard import Verdict
from streams.planner import on_commit, on_snapshot
from streams.state import DiskState, new_state
from tests.unit.factories import EPOCH_A, EPOCH_B, T0, commit_for, disk, snap

D0, D1 = disk(2000), disk(2001)
PATH = D0.vm_path
NONE = Ownership()


def _rows(cid0: str | None = f"{EPOCH_A}/3", cid1: str | None = f"{EPOCH_B}/7"
          ) -> list[DiskState]:
    rows = []
    for d, cid in ((D0, cid0), (D1, cid1)):
        s = new_state(d)
        if cid is not None:
            s, out = on_snapshot(None, snap(d, cid), T0)
            s, _ = on_commit(s, commit_for(out[0]), T0)  # type: ignore[arg-type]
            assert s is not None
        rows.append(s)
    return rows


def _req(**kw: object) -> StoreRequest:
    fields: dict[str, object] = dict(job_id="job-1", change_id=f"{EPOCH_A}/4",
                                     previous_change_id=f"{EPOCH_A}/3", vm_path=PATH,
                                     disk_id="disk-2000")
    fields.update(kw)
    return StoreRequest(**fields)  # type: ignore[arg-type]


def test_a_store_call_lands_on_its_own_disk_only() -> None:
    answer, ev = store(_rows(), _req(), T0, NONE)
    assert answer.status == 200 and ev is not None
    assert ev.disk.key == D0.key and ev.replication_type == ReplicationType.INCREMENTAL
    assert ev.origin == "external" and ev.origin_job_id == "job-1"
    assert answer.body["disk_id"] == "disk-2000" and answer.body["change_id"] == f"{EPOCH_A}/4"


def test_the_seeds_two_failure_modes_are_refused() -> None:
    # 1. no disk_id on a multi-disk VM: no default disk-2000, a 409 with the VM's disk ids
    answer, ev = store(_rows(), _req(disk_id=None), T0, NONE)
    assert answer.status == 409 and ev is None
    assert answer.body["disk_ids"] == ["disk-2000", "disk-2001"]
    # 2. an unknown disk_id is never written to the VM's first disk
    answer, ev = store(_rows(), _req(disk_id="disk-2005"), T0, NONE)
    assert answer.status == 404 and ev is None


def test_stale_previous_and_broken_lineage_are_409_with_the_current_change_id() -> None:
    answer, ev = store(_rows(), _req(previous_change_id=f"{EPOCH_A}/2"), T0, NONE)
    assert answer.status == 409 and ev is None
    assert answer.body["current_change_id"] == f"{EPOCH_A}/3"
    # another epoch is only accepted as a declared full copy
    answer, _ = store(_rows(), _req(change_id=f"{EPOCH_B}/1"), T0, NONE)
    assert answer.status == 409
    answer, ev = store(_rows(), _req(change_id=f"{EPOCH_B}/1", replication_type="full"), T0, NONE)
    assert answer.status == 200 and ev is not None
    assert ev.replication_type == ReplicationType.FULL and ev.reason == "external_full_copy"


def test_first_commit_of_a_disk_needs_no_previous() -> None:
    answer, ev = store(_rows(cid0=None), _req(previous_change_id=None), T0, NONE)
    assert answer.status == 200 and ev is not None and ev.reason == "no_previous_commit"
    answer, _ = store(_rows(cid0=None), _req(), T0, NONE)  # claims a previous the disk lacks
    assert answer.status == 409


def test_store_calls_are_idempotent_and_known_job_ids_find_the_vm() -> None:
    rows = _rows()
    _, ev = store(rows, _req(), T0, NONE)
    assert ev is not None
    applied = rows[0].model_copy(update={"change_id": ev.change_id, "commit_event_id": ev.event_id,
                                         "commit_sync_id": ev.sync_id, "owner": "external",
                                         "external_job_id": "job-1"})
    again, ev2 = store([applied, rows[1]], _req(), T0, NONE)
    assert again.status == 200 and ev2 is None  # the same answer, no second event
    # a later call of that job names no vm_path: the job id finds the VM
    found = locate([applied, rows[1]], _req(vm_path=None, disk_id="disk-2001"))
    assert isinstance(found, DiskState) and found.disk.key == D1.key


def test_handed_over_or_running_disks_refuse_external_commits() -> None:
    rows = _rows()
    answer, _ = store(rows, _req(), T0, Ownership(handover=(D0.vm_instance_uuid,)))
    assert answer.status == 409 and "handed over" in str(answer.body["details"])
    running, _ = on_snapshot(rows[0], snap(D0, f"{EPOCH_A}/9", minutes=9, snapshot="s-9"), T0)
    answer, _ = store([running, rows[1]], _req(), T0, NONE)
    assert answer.status == 409 and "syncing" in str(answer.body["details"])
    _, ev = store(rows, _req(), T0, NONE)
    assert ev is not None and check_external(None, ev, NONE).verdict == Verdict.REFUSE


def test_the_table_applies_an_external_commit_and_then_leaves_the_disk_to_its_copier() -> None:
    from streams.external import apply_external, skip_snapshot

    rows = _rows()
    _, ev = store(rows, _req(), T0, NONE)
    assert ev is not None
    step = apply_external(rows[0], ev, T0, NONE)
    state = step.state
    assert step.outputs == [] and state is not None
    assert (state.change_id, state.owner, state.external_job_id) == (f"{EPOCH_A}/4", "external",
                                                                      "job-1")
    again = apply_external(state, ev, T0, NONE)  # redelivered: a duplicate
    assert again.state == state and again.outputs == [] and again.kind == "duplicate"
    # a stale store call that raced past the API check is refused by the table itself
    _, stale = store(rows, _req(job_id="job-0", change_id=f"{EPOCH_A}/5"), T0, NONE)
    assert stale is not None
    refused = apply_external(state, stale, T0, NONE)
    assert refused.state == state
    assert [f.reason for f in refused.outputs] == ["lineage_mismatch"]  # type: ignore[union-attr]
    # cbtstream does not plan the disk while its external copier owns it ...
    assert NONE.owned_externally(state)
    skipped = skip_snapshot(state, snap(D0, f"{EPOCH_A}/6", minutes=6, snapshot="s-6"), T0)
    assert [type(o).__name__ for o in skipped.outputs] == ["SyncSuperseded"]
    assert skipped.state is not None and skipped.state.running is None
    assert len(skipped.ended) == 1  # the lifecycle sees the disk finish with the snapshot
    # ... until an operator hands it over
    assert not Ownership(handover=(D0.key,)).owned_externally(state)
    # disks listed as external are left to their copier from the first snapshot on
    assert Ownership(external=(D1.vm_instance_uuid,)).owned_externally(rows[1])
    assert not NONE.owned_externally(rows[1])
