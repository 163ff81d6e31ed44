"""The replica guard across hosts (consumers/replica/guard.py, rule 0 and target identity): a host
change in a shared pool costs no copy, a host-local pool refuses another host's record, a
replaced file is still found, and records written before hosts and ids existed behave as before.
Pure; no I/O."""

from __future__ import annotations

import uuid

import pytest

from consumers.replica.guard import Action, CopierHost, ReplicaView, admit
from consumers.replica.state import (
    ReplicaState,
    TargetIdentity,
    TargetKind,
    WritingSync,
    first_state,
)
from consumers.replica.store import decode_record, encode_record
from schemas import FullReason, ReplicationType, SyncPlanned
from schemas.events import FailureReason
from tests.unit.test_replica_guard import PIPE, _clean_at, _plans

#: The same NFS file seen from two hosts: same path, inode and size; another st_dev.
ON_A = TargetIdentity(kind=TargetKind.FILE, location="/r/x.img", device=41, inode=7, size=1 << 30)
ON_B = ON_A.model_copy(update={"device": 57})
#: The same LUN seen from two hosts: another st_rdev.
LUN_A = TargetIdentity(kind=TargetKind.BLOCK, location="/dev/disk/by-id/wwn-0x5000", device=2049,
                       size=1 << 30)
LUN_B = LUN_A.model_copy(update={"device": 2065})

A_SHARED = CopierHost("host-a", "nfs", "shared")
B_SHARED = CopierHost("host-b", "nfs", "shared")
B_LOCAL = CopierHost("host-b", "local", "host-local")


def _by(plan: SyncPlanned, host: str | None, target: TargetIdentity = ON_A) -> ReplicaState:
    """A clean record at ``plan``, written by ``host`` (None: an older copier's record)."""
    return _clean_at(plan, target=target, host=host,
                     replica_id=uuid.uuid4() if host is not None else None)


def test_a_host_change_in_a_shared_pool_stays_incremental() -> None:
    _, p2, p3 = _plans()
    a = admit(p3, ReplicaView(_by(p2, "host-a"), ON_B), PIPE, B_SHARED)
    assert (a.action, a.replication_type, a.reason) == (
        Action.WRITE, ReplicationType.INCREMENTAL, FullReason.PREVIOUS_COMMIT), a.detail
    assert a.use_held_tree
    # a block device: the same LUN under another device number on the other host
    a = admit(p3, ReplicaView(_by(p2, "host-a", LUN_A), LUN_B), PIPE, B_SHARED)
    assert (a.action, a.replication_type) == (Action.WRITE, ReplicationType.INCREMENTAL)


def test_the_plan_a_replica_holds_is_already_applied_from_another_host() -> None:
    _, p2, _ = _plans()
    a = admit(p2, ReplicaView(_by(p2, "host-a"), ON_B), PIPE, B_SHARED)
    assert a.action == Action.ALREADY_APPLIED


@pytest.mark.parametrize("found", [
    ON_B.model_copy(update={"inode": 8}),                 # another file (new inode)
    ON_B.model_copy(update={"size": 2 << 30}),            # another size
    ON_B.model_copy(update={"location": "/r/y.img"}),     # another path
    LUN_B.model_copy(update={"location": ON_A.location}),  # a block device where a file was
])
def test_a_replaced_target_is_found_from_another_host(found: TargetIdentity) -> None:
    _, p2, p3 = _plans()
    a = admit(p3, ReplicaView(_by(p2, "host-a"), found), PIPE, B_SHARED)
    assert (a.action, a.replication_type, a.reason) == (
        Action.WRITE, ReplicationType.FULL, FullReason.REPLICA_REPLACED)


def test_on_the_recording_host_the_device_number_still_counts() -> None:
    _, p2, p3 = _plans()
    for record, found in ((_by(p2, "host-a"), ON_B), (_by(p2, "host-a", LUN_A), LUN_B)):
        a = admit(p3, ReplicaView(record, found), PIPE, A_SHARED)
        assert (a.replication_type, a.reason) == (ReplicationType.FULL,
                                                  FullReason.REPLICA_REPLACED)


def test_a_host_local_pool_refuses_another_hosts_record_before_any_write() -> None:
    p1, p2, p3 = _plans()
    record = _by(p2, "host-a")
    # an incremental, the plan the replica holds, a full copy: all refused, naming both hosts
    for plan in (p3, p2, p1.model_copy(update={"generation": 9, "sync_id": uuid.uuid4()})):
        a = admit(plan, ReplicaView(record, ON_A), PIPE, B_LOCAL)
        assert (a.action, a.failure) == (Action.REFUSE, FailureReason.REPLICA_ON_OTHER_HOST)
        assert "'host-a'" in a.detail and "'host-b'" in a.detail and "'local'" in a.detail
        assert f"--forget {plan.disk.key}" in a.detail
    # even if the replica is gone: the record says another host has it
    assert admit(p3, ReplicaView(record, None), PIPE, B_LOCAL).action == Action.REFUSE


def test_a_host_local_pool_writes_its_own_records_and_untrusted_ones_as_before() -> None:
    _, p2, p3 = _plans()
    a = admit(p3, ReplicaView(_by(p2, "host-b"), ON_A), PIPE, B_LOCAL)
    assert (a.action, a.replication_type) == (Action.WRITE, ReplicationType.INCREMENTAL)
    # another pipeline's record of the disk is not trusted, so it is no other host's either
    foreign = _by(p2, "host-a").model_copy(update={"pipeline": "other"})
    a = admit(p3, ReplicaView(foreign, ON_A), PIPE, B_LOCAL)
    assert (a.action, a.reason) == (Action.WRITE, FullReason.REPLICA_STATE_UNKNOWN)


def test_a_stale_plan_is_refused_as_stale() -> None:
    p1, p2, _ = _plans()
    a = admit(p1, ReplicaView(_by(p2, "host-a"), ON_B), PIPE, B_SHARED)
    assert (a.action, a.failure) == (Action.REFUSE, FailureReason.STALE_PLAN)


def test_a_record_written_before_hosts_existed_loads_and_behaves_as_before() -> None:
    _, p2, p3 = _plans()
    body = _clean_at(p2, target=ON_A).model_dump(mode="json")
    del body["host"], body["replica_id"]
    record = decode_record(encode_record(ReplicaState.model_validate(body)))
    assert isinstance(record, ReplicaState)
    assert (record.host, record.replica_id) == (None, None)
    # any host reads it as its own: incremental on the same file, host-local or not ...
    for here in (B_LOCAL, B_SHARED, None):
        a = admit(p3, ReplicaView(record, ON_A), PIPE, here)
        assert (a.action, a.replication_type) == (Action.WRITE, ReplicationType.INCREMENTAL)
        # ... and every identity field still counts, the device number too
        a = admit(p3, ReplicaView(record, ON_B), PIPE, here)
        assert (a.replication_type, a.reason) == (ReplicationType.FULL,
                                                  FullReason.REPLICA_REPLACED)


def test_the_replica_id_is_minted_once_and_kept_the_host_follows_the_writer() -> None:
    _, p2, p3 = _plans()
    writing = WritingSync(sync_id=p3.sync_id, generation=p3.generation,
                          replication_type=p3.replication_type,
                          base_change_id=p3.base_change_id, snapshot_taken_at=None)
    first = first_state(PIPE, p3.disk.key, "u", 1 << 30, ON_A, writing, "host-a")
    assert first.replica_id is not None and first.host == "host-a"
    later = first.dirty(writing, ON_B, "host-b")
    assert (later.replica_id, later.host) == (first.replica_id, "host-b")
    held = _by(p2, None).held
    assert held is not None
    assert later.clean(held, ON_B, "host-c").replica_id == first.replica_id
    # an older record gets its id from the next sync that writes it, and keeps it
    old = _clean_at(p2)
    assert old.replica_id is None
    minted = old.dirty(writing, ON_A, "host-a")
    assert minted.replica_id is not None
    assert minted.dirty(writing, ON_A, "host-a").replica_id == minted.replica_id
    assert minted.verified().host == "host-a"  # verify keeps the writer's host
