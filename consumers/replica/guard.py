"""The replica guard: may this plan be written onto this replica, and how. Pure; no I/O.

Like ZFS ``receive``, which refuses an incremental stream whose base is not the destination's
latest snapshot, an incremental is applied only to a replica *known* to hold exactly its base.
The rules, in order (the copier runs them before any write):

0. **Host** (only with a trustworthy record of this disk and pipeline): in a ``host-local`` pool
   (``copier.storage``), a record written by another host (``ReplicaState.host``) is ``REFUSE``
   with ``replica_on_other_host``, naming both hosts: that host's replica is not on this host's
   storage (or the storage is shared and the pool says otherwise), and copying it again here
   would silently fork the disk's replica. In a ``shared`` pool another host's record is this
   replica's record. A record without a host (an older copier's) counts as this host's.
1. **Fence** (only with a trustworthy record of this disk and pipeline):
   * the plan is the sync the replica already holds, and the replica is clean on the same
     target: nothing to write; the recorded outcome is published again (``ALREADY_APPLIED``;
     not for a restore point the replica was rolled back to, which has no recorded outcome:
     the generation fence refuses its old plan);
   * its generation is below the newest generation that touched the replica, or equal to it
     without being the sync that left the replica dirty (a resume), or its snapshot is older
     than the snapshot the replica holds: ``REFUSE`` with ``stale_plan``, never a write. An
     offset reset, a hand-produced old plan or a fresh copier host cannot roll a replica back.
   * the replica is failed over (``ReplicaState.failed_over_at``, set by ``cbtstream
     failover``): ``REFUSE`` with ``replica_failed_over``, whatever the plan (a VM may be
     running from it); only ``failover --undo`` gives it back to the syncs.
2. **Base** (incremental plans): the plan stays incremental only if the replica is clean at
   exactly its ``base_change_id`` for the same disk (backing uuid, capacity) and the same target
   identity, or dirty from an interrupted *incremental* from the same base while still holding
   that base's tree (CBT areas are cumulative, so the new incremental repairs it). A replica
   rolled back to a restore point (``failover --at``; ``ReplicaState.rolled_back_from``) holds
   an older change ID than the plan's base: if it is of the plan's CBT epoch the copy stays
   incremental *from the replica's change ID* (``replica_rebased``; the changes since it are a
   superset of those since the base). Otherwise it is copied in full with the reason:
   ``replica_missing`` (no target), ``replica_replaced`` (another file/volume than recorded:
   compared by :meth:`TargetIdentity.same_object`, which leaves out the device number when the
   record was written by another host, so a host change in a shared pool costs no copy while a
   new inode still counts as replaced),
   ``replica_state_unknown`` (no record for an existing target, or a torn/foreign one),
   ``replica_mismatch`` (verify found a difference), ``replica_not_at_base`` (anything else).
3. Full plans are written as planned (a full copy rewrites every byte: allocated areas, zeroes
   elsewhere).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from consumers.replica.state import ReplicaState, ReplicaStatus, TargetIdentity, Unknown
from schemas.changeid import ChangeId
from schemas.events import FailureReason, FullReason, ReplicationType, SyncPlanned


class Action(StrEnum):
    WRITE = "write"
    ALREADY_APPLIED = "already_applied"
    REFUSE = "refuse"


@dataclass(frozen=True)
class Admission:
    action: Action
    replication_type: ReplicationType
    reason: FullReason
    detail: str = ""
    #: Start from the recorded tree (an incremental onto the held base), else from zeroes.
    use_held_tree: bool = False
    #: The change ID the incremental copies the changes since, when it is not the plan's base
    #: (``replica_rebased``: the replica holds an older restore point). None: the plan's base.
    base_change_id: str | None = None
    #: Why a ``REFUSE`` is refused (the ``SyncFailed`` reason); None otherwise.
    failure: FailureReason | None = None


@dataclass(frozen=True)
class CopierHost:
    """The copier asking: its host name (``copier.host_name``), its pool and what the pool's
    replica storage is (``copier.storage``)."""

    host: str
    pool: str
    storage: Literal["host-local", "shared"] = "host-local"


@dataclass(frozen=True)
class ReplicaView:
    """What the copier found: the record (or why it is unusable) and the target now."""

    record: ReplicaState | Unknown | None
    #: The target's identity now; None if the target does not exist (yet).
    target: TargetIdentity | None


def _full(reason: FullReason, detail: str) -> Admission:
    return Admission(Action.WRITE, ReplicationType.FULL, reason, detail)


def _same_target(state: ReplicaState, target: TargetIdentity | None, here: CopierHost | None
                 ) -> bool:
    return state.target.same_object(target, same_host=here is None
                                    or state.written_by(here.host))


def _refuse(plan: SyncPlanned, failure: FailureReason, detail: str) -> Admission:
    return Admission(Action.REFUSE, plan.replication_type, plan.reason, detail, failure=failure)


def on_other_host(plan: SyncPlanned, state: ReplicaState, here: CopierHost) -> Admission | None:
    """Rule 0. None: the record is this host's, or the pool's storage is shared."""
    if here.storage == "shared" or state.written_by(here.host):
        return None
    return _refuse(
        plan, FailureReason.REPLICA_ON_OTHER_HOST,
        f"the replica's record was written by host {state.host!r} and this copier is host "
        f"{here.host!r} in the host-local pool {here.pool!r}: that host's replica is not "
        f"this host's to write. Run this pool's plans on {state.host!r} (one member per "
        "storage), or set copier.storage = \"shared\" if every member of the pool sees the "
        "same replicas, or, to start this replica over here, drop the record with "
        f"'cbtstream targets --forget {state.disk_key}' on this host (the next sync is then a "
        "full copy)")


def fence(plan: SyncPlanned, state: ReplicaState, target: TargetIdentity | None,
          here: CopierHost | None = None) -> Admission | None:
    """Rule 1. None: the plan is newer than anything the replica has seen (or resumes it)."""
    held, writing = state.held, state.writing
    # A restore point the replica was rolled back to has no recorded outcome to publish again:
    # its plan falls through to the generation fence below.
    if (held is not None and held.sync_id == plan.sync_id and state.status == ReplicaStatus.CLEAN
            and state.rolled_back_from is None and _same_target(state, target, here)):
        return Admission(Action.ALREADY_APPLIED, plan.replication_type, plan.reason,
                         "the replica already holds this sync")
    high = state.high_generation
    resuming = (state.status == ReplicaStatus.DIRTY and writing is not None
                and writing.sync_id == plan.sync_id)
    if plan.generation < high or (plan.generation == high and high > 0 and not resuming
                                  and not (held is not None and held.sync_id == plan.sync_id)):
        return _refuse(plan, FailureReason.STALE_PLAN,
                       f"plan generation {plan.generation} is not newer than the replica's "
                       f"{high}: an old plan, delivered again")
    if (held is not None and held.snapshot_taken_at is not None
            and plan.snapshot_taken_at is not None
            and plan.snapshot_taken_at < held.snapshot_taken_at):
        return _refuse(plan, FailureReason.STALE_PLAN,
                       f"plan's snapshot ({plan.snapshot_taken_at.isoformat()}) is older than "
                       f"the one the replica holds ({held.snapshot_taken_at.isoformat()})")
    return None


def admit(plan: SyncPlanned, view: ReplicaView, pipeline: str,
          here: CopierHost | None = None) -> Admission:
    """Decide what to do with ``plan`` given the replica as found (the rules above), for the
    copier ``here`` (None: a tool that does not belong to a pool; every record is its own)."""
    record = view.record
    state = (record if isinstance(record, ReplicaState) and record.disk_key == plan.disk.key
             and record.pipeline == pipeline else None)
    foreign = isinstance(record, ReplicaState) and state is None
    if state is not None:
        elsewhere = on_other_host(plan, state, here) if here is not None else None
        if elsewhere is not None:
            return elsewhere
        fenced = fence(plan, state, view.target, here)
        if fenced is not None:
            return fenced
        if state.failed_over_at is not None:
            return _refuse(plan, FailureReason.REPLICA_FAILED_OVER,
                           f"the replica is failed over since {state.failed_over_at.isoformat()}"
                           f" ({state.failed_over_reason or 'no reason given'}): no sync writes "
                           "it until 'cbtstream failover --undo'")
    if plan.replication_type != ReplicationType.INCREMENTAL or plan.base_change_id is None:
        return Admission(Action.WRITE, ReplicationType.FULL, plan.reason)
    if view.target is None:
        return _full(FullReason.REPLICA_MISSING, "the replica does not exist")
    if isinstance(record, Unknown):
        return _full(FullReason.REPLICA_STATE_UNKNOWN, record.detail)
    if foreign:
        return _full(FullReason.REPLICA_STATE_UNKNOWN,
                     "the replica's record belongs to another disk or pipeline")
    if state is None:
        return _full(FullReason.REPLICA_STATE_UNKNOWN, "the replica has no state record")
    if not _same_target(state, view.target, here):
        return _full(FullReason.REPLICA_REPLACED,
                     f"target is {view.target.model_dump()}, recorded {state.target.model_dump()}")
    if state.status == ReplicaStatus.MISMATCH:
        return _full(FullReason.REPLICA_MISMATCH, state.mismatch_detail or "verify mismatch")
    if (state.backing_uuid != plan.disk.backing_uuid
            or state.capacity_bytes != plan.disk.capacity_bytes):
        return _full(FullReason.REPLICA_NOT_AT_BASE, "the replica is of another disk identity")
    held, writing = state.held, state.writing
    at_base = held is not None and held.change_id == plan.base_change_id
    if state.status == ReplicaStatus.CLEAN and at_base:
        return Admission(Action.WRITE, ReplicationType.INCREMENTAL, plan.reason,
                         use_held_tree=True)
    if (state.status == ReplicaStatus.DIRTY and at_base and writing is not None
            and writing.replication_type == ReplicationType.INCREMENTAL
            and writing.base_change_id == plan.base_change_id):
        return Admission(Action.WRITE, ReplicationType.INCREMENTAL, plan.reason,
                         "resuming onto an interrupted incremental from the same base",
                         use_held_tree=True)
    rebased = _rebased(plan, state)
    if rebased is not None:
        return rebased
    holds = held.change_id if held is not None else None
    return _full(FullReason.REPLICA_NOT_AT_BASE,
                 f"replica is {state.status.value} at {holds!r}, the plan's base is "
                 f"{plan.base_change_id!r}")


def _rebased(plan: SyncPlanned, state: ReplicaState) -> Admission | None:
    """Rule 2, a replica rolled back to a restore point (``failover --at``): clean at that
    point's change ID (or dirty from an interrupted copy rebased on it), which is of the same
    CBT epoch as the plan's snapshot. The changes since
    it (a superset of those since the plan's base) make the replica the snapshot, so the copy
    stays incremental from the replica's own change ID; another epoch is a full copy."""
    held, writing = state.held, state.writing
    if held is None or state.rolled_back_from is None or plan.change_id is None:
        return None
    resuming = (state.status == ReplicaStatus.DIRTY and writing is not None
                and writing.replication_type == ReplicationType.INCREMENTAL
                and writing.base_change_id == held.change_id)
    if state.status != ReplicaStatus.CLEAN and not resuming:
        return None
    try:
        same = ChangeId.parse(held.change_id).same_epoch(ChangeId.parse(plan.change_id))
    except ValueError:
        return None
    if not same:
        return None
    return Admission(Action.WRITE, ReplicationType.INCREMENTAL, FullReason.REPLICA_REBASED,
                     f"the replica was rolled back to {held.change_id} (from "
                     f"{state.rolled_back_from}): incremental from it, not from the plan's base "
                     f"{plan.base_change_id}", use_held_tree=True,
                     base_change_id=held.change_id)
