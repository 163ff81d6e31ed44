"""The events of the pipeline. Every event is frozen, versioned and carries the disk it is about.

Flow: ``SnapshotTaken`` (one per disk of a VM snapshot) -> ``SyncPlanned`` (or ``SyncSuperseded``)
-> ``SyncProgress``* -> ``ChangeIdCommitted`` or ``SyncFailed`` -> ``SnapshotRemoved``.
Undecodable input goes to the dead-letter topic as ``DeadLetter``. Not about one disk: the
fences (``ChangeIdFence``), the scheduler's ``ScheduleEvent``, ``VmDescribed`` (a VM's
description at each of its snapshots) and ``ReplicationHold`` (a VM failed over).

A change ID never travels without the :class:`~schemas.disk.DiskRef` of the disk it belongs to,
and every change ID field is validated as ``<epoch>/<sequence>``.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    field_validator,
    model_validator,
)

from schemas.changeid import ChangeId
from schemas.disk import MAX_TEXT, DiskRef
from schemas.vm import VmDescription

SCHEMA_VERSION: Literal[1] = 1
#: Namespace of the deterministic event ids (uuid5); any fixed UUID works, this one is ours.
_ID_NAMESPACE = uuid.UUID("6c6f8e52-3b9a-4d8e-9f4e-2f0b4c1d7a10")


def stable_event_id(kind: str, *parts: object) -> uuid.UUID:
    """A deterministic event id, so a retried publish of the same fact has the same id and
    consumers can drop the duplicate."""
    return uuid.uuid5(_ID_NAMESPACE, "\x1f".join([kind, *map(str, parts)]))


def utcnow() -> datetime:
    return datetime.now(UTC)


class ReplicationType(StrEnum):
    """What a sync copies: every allocated block (full) or only changed blocks (incremental)."""

    FULL = "full"
    INCREMENTAL = "incremental"


#: A copier pool's name: it appears in consumer group names and metric labels.
POOL_NAME = r"^[a-z0-9][a-z0-9_-]{0,62}$"
#: The pool of plans made before pools existed, and of disks no configuration assigns.
DEFAULT_POOL = "default"


class FullReason(StrEnum):
    """Why a sync is what it is. Incremental syncs carry ``previous_commit``."""

    PREVIOUS_COMMIT = "previous_commit"
    NO_PREVIOUS_COMMIT = "no_previous_commit"
    CBT_NOT_ENABLED = "cbt_not_enabled"
    EPOCH_CHANGED = "epoch_changed"
    SEQUENCE_NOT_INCREASING = "sequence_not_increasing"
    BACKING_UUID_CHANGED = "backing_uuid_changed"
    BACKING_FILE_CHANGED = "backing_file_changed"
    CAPACITY_CHANGED = "capacity_changed"
    BASE_CHANGE_ID_REJECTED = "base_change_id_rejected"
    ALLOCATED_AREAS_FAILED = "allocated_areas_failed"
    # The copier's replica guard (consumers/replica): an incremental plan whose base the replica
    # does not provably hold is copied in full instead.
    REPLICA_MISSING = "replica_missing"
    REPLICA_REPLACED = "replica_replaced"
    REPLICA_NOT_AT_BASE = "replica_not_at_base"
    REPLICA_STATE_UNKNOWN = "replica_state_unknown"
    REPLICA_MISMATCH = "replica_mismatch"
    # An external copier (the seed's migratekit, through the change-ID API) declared a full copy.
    EXTERNAL_FULL_COPY = "external_full_copy"
    # An operator fence (``cbtstream fence``, ``ChangeIdFence``) says the committed change ID
    # cannot be trusted (e.g. a CBT bug such as VMware KB 317933 before a patch).
    FENCED = "fenced"
    # An operator moved the disk to another copier pool (``cbtstream pools move``): the new
    # pool holds no replica of it yet.
    POOL_MOVED = "pool_moved"
    # Incremental, but from the change ID the replica holds rather than the disk's last commit:
    # the replica was rolled back to a restore point (``cbtstream failover --at``), so the
    # changes since that point are copied (same CBT epoch; a superset of those since the commit).
    REPLICA_REBASED = "replica_rebased"


def _check_change_id(value: str | None) -> str | None:
    if value is not None:
        ChangeId.parse(value)
    return value


class _Event(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = SCHEMA_VERSION
    event_id: uuid.UUID = Field(default_factory=uuid.uuid4)
    occurred_at: AwareDatetime = Field(default_factory=utcnow)
    disk: DiskRef

    @property
    def key(self) -> str:
        return self.disk.key


class SnapshotTaken(_Event):
    """One disk of a VM snapshot, with that disk's change ID as of the snapshot."""

    event_type: Literal["SnapshotTaken"] = "SnapshotTaken"
    vcenter: str = Field(max_length=MAX_TEXT, description="vCenter/ESXi the snapshot lives on.")
    vm_snapshot: str = Field(
        min_length=1, max_length=128, description="Snapshot managed object id, e.g. snapshot-42."
    )
    snapshot_name: str = Field(default="", max_length=MAX_TEXT)
    change_id: str | None = Field(
        description="backing.changeId of this disk in the snapshot's config; null if CBT is off."
    )
    taken_at: AwareDatetime
    snapshot_device_keys: tuple[int, ...] | None = Field(
        default=None,
        max_length=256,
        description="Device keys of every disk in this VM snapshot. When set, the pipeline "
        "removes the snapshot once every one of them is synced (or failed, or superseded); "
        "null: the publisher manages the snapshot's lifetime.",
    )

    esxi_host: str | None = Field(
        default=None, max_length=MAX_TEXT,
        description="Name of the ESXi host the VM ran on when the snapshot was taken (fences "
        "may name it); null when unknown (upstream publishers).")
    policy: str | None = Field(
        default=None, min_length=1, max_length=128,
        description="The protection policy that asked for this snapshot (`cbtstream schedule`); "
        "null for a snapshot taken by hand or by an upstream publisher.")
    rpo_s: float | None = Field(
        default=None, gt=0,
        description="That policy's recovery point objective in seconds: the disk's status is "
        "measured against it (null: against the planner's streams.rpo_s).")

    _v_change_id = field_validator("change_id")(_check_change_id)


class SyncPlanned(_Event):
    """The planner's decision for one snapshot of one disk."""

    event_type: Literal["SyncPlanned"] = "SyncPlanned"
    sync_id: uuid.UUID
    snapshot_event_id: uuid.UUID
    vm_snapshot: str = Field(min_length=1, max_length=128)
    replication_type: ReplicationType
    reason: FullReason
    previous_change_id: str | None = Field(
        description="The disk's latest committed change ID when planned (null: none)."
    )
    base_change_id: str | None = Field(
        description="Change ID to query changed areas from; null for a full sync."
    )
    change_id: str | None = Field(description="The snapshot's change ID, committed on success.")
    generation: int = Field(
        default=0,
        ge=0,
        le=(1 << 62),
        description="Per-disk plan generation: strictly increases with every plan of the disk. "
        "A copier never writes a plan older than what its replica holds. 0: a plan made "
        "before generations existed (older than any replica state).",
    )
    snapshot_taken_at: AwareDatetime | None = Field(
        default=None, description="taken_at of the snapshot this plan copies."
    )
    pool: str = Field(
        default=DEFAULT_POOL, pattern=POOL_NAME,
        description="The copier pool that holds the disk's replica: only its copiers run the "
        "plan ('default' in plans made before pools existed).",
    )
    esxi_host: str | None = Field(
        default=None, max_length=MAX_TEXT,
        description="The ESXi host the VM ran on at the snapshot (SnapshotTaken.esxi_host): "
        "copiers limit their concurrent copies per host; null when unknown.",
    )

    _v_prev = field_validator("previous_change_id")(_check_change_id)
    _v_base = field_validator("base_change_id")(_check_change_id)
    _v_new = field_validator("change_id")(_check_change_id)


class SyncSuperseded(_Event):
    """A waiting snapshot of a disk was replaced by a newer one before its sync started."""

    event_type: Literal["SyncSuperseded"] = "SyncSuperseded"
    snapshot_event_id: uuid.UUID
    vm_snapshot: str = Field(min_length=1, max_length=128)
    superseded_by: uuid.UUID = Field(description="event_id of the newer SnapshotTaken.")


class SyncProgress(_Event):
    """Periodic news of a sync a copier holds: running (bytes so far), or queued (held but not
    started: waiting for a copy slot, or for the disk's previous plan). Either one tells the
    planner the sync is not silent."""

    event_type: Literal["SyncProgress"] = "SyncProgress"
    sync_id: uuid.UUID
    bytes_done: int = Field(ge=0)
    bytes_total: int = Field(ge=0)
    rate_bytes_per_s: float = Field(ge=0)
    state: Literal["queued", "running"] = Field(
        default="running",
        description="'running': the copy has started; 'queued': the copier holds the plan and "
        "has not started it (bytes are then 0). Readers older than this field reject events "
        "carrying it: upgrade readers (planner, audit, tools) before copiers.",
    )
    queue_position: int | None = Field(
        default=None, ge=1, le=1 << 31,
        description="With state 'queued': the plan's place in its copier's queue (1: next).",
    )
    wait_reason: str | None = Field(
        default=None, max_length=MAX_TEXT,
        description="With state 'queued': what the plan waits for (a copy slot, the disk's "
        "previous plan, its ESXi host's or datastore's limit).",
    )

    @model_validator(mode="after")
    def _position_when_queued(self) -> SyncProgress:
        if (self.queue_position is not None) != (self.state == "queued"):
            raise ValueError("queue_position is given exactly when the state is 'queued'")
        return self


class ChangeIdCommitted(_Event):
    """The replica of a disk is durable up to ``change_id``: the next sync may start from it."""

    event_type: Literal["ChangeIdCommitted"] = "ChangeIdCommitted"
    sync_id: uuid.UUID
    vm_snapshot: str = Field(min_length=1, max_length=128)
    previous_change_id: str | None
    change_id: str
    replication_type: ReplicationType
    reason: FullReason
    bytes_copied: int = Field(ge=0, description="Bytes of data written to the target.")
    bytes_zeroed: int = Field(default=0, ge=0, description="Bytes written as zeroes/holes.")
    extents: int = Field(ge=0, description="Changed extents reported by vSphere.")
    digest: str = Field(
        max_length=200,
        description="Digest of what this sync wrote: 'sha256:<hex>' (before replica trees) or "
        "'blake3:<hex>' over the hash-tree leaves it touched.",
    )
    duration_s: float = Field(ge=0)
    replica_digest: str | None = Field(
        default=None,
        max_length=200,
        description="Root of the whole replica's hash tree as of this snapshot "
        "('blake3tree2:<leaf bytes>:<piece bytes>:<hex>'; before version 2 "
        "'blake3tree:<leaf bytes>:<hex>'); `cbtstream verify` recomputes it from the replica.",
    )
    bytes_read: int | None = Field(
        default=None, ge=0,
        description="Bytes this sync read from the snapshot's export: the changed data, the "
        "gaps merged into its reads, and any unit of the hash tree copied whole (null: not "
        "counted, e.g. an external copier). bytes_read / bytes_changed is its read "
        "amplification.",
    )
    bytes_changed: int | None = Field(
        default=None, ge=0,
        description="Bytes in the changed areas the sync copied (vSphere's changed areas, or the "
        "allocated ones for a full copy; clipped to the disk, overlaps joined). Null: not "
        "counted.",
    )
    generation: int = Field(default=0, ge=0, le=(1 << 62), description="The plan's generation.")
    origin: Literal["cbtstream", "external"] = Field(
        default="cbtstream",
        description="Who copied: cbtstream's copier, or an external copier that stored its change "
        "ID through the API (POST /api/v1/replications/{job_id}/changeid).",
    )
    origin_job_id: str | None = Field(
        default=None, max_length=256, description="The external copier's job id."
    )
    origin_client: str | None = Field(
        default=None, max_length=256, description="Who posted it (the API client's address)."
    )

    _v_prev = field_validator("previous_change_id")(_check_change_id)
    _v_new = field_validator("change_id")(_check_change_id)


class FailureReason(StrEnum):
    """The ``SyncFailed`` reasons that the pipeline decides itself. A copier's own failures
    carry the reason of the error that ended the copy (``not_found``, ``nbd_error``...), which is
    why ``SyncFailed.reason`` stays a string."""

    #: The planner's commit guard refused a commit (``streams/guard.py``).
    LINEAGE_MISMATCH = "lineage_mismatch"
    #: The copier's replica guard refused a plan older than what the replica holds
    #: (``consumers/replica/guard.py``).
    STALE_PLAN = "stale_plan"
    #: The planner ended a running sync that showed no outcome and no progress.
    SYNC_TIMED_OUT = "sync_timed_out"
    #: A copier of a host-local pool found the replica's record written by another host
    #: (``consumers/replica/guard.py``): the disk's replica is not on this host.
    REPLICA_ON_OTHER_HOST = "replica_on_other_host"
    #: The planner refused a snapshot of a VM that is failed over (``ReplicationHold``): no
    #: plan is made while the operator runs the VM from its replicas.
    VM_FAILED_OVER = "vm_failed_over"
    #: The copier refused a plan whose replica is failed over (its record says so): the replica
    #: is the operator's until ``cbtstream failover --undo``.
    REPLICA_FAILED_OVER = "replica_failed_over"
    #: The planner refused a snapshot of a VM that was cut over (``ReplicationHold``
    #: ``cut_over``): the replicas hold its final state and belong to the target platform.
    VM_CUT_OVER = "vm_cut_over"


def lineage_refusal_id(commit_event_id: uuid.UUID) -> uuid.UUID:
    """The id of the ``SyncFailed(lineage_mismatch)`` that refuses the commit
    ``commit_event_id``: the planner emits it, the audit and replay find the refusal by it."""
    return stable_event_id("SyncFailed", FailureReason.LINEAGE_MISMATCH, commit_event_id)


class SyncFailed(_Event):
    """A sync (or a commit) did not happen; ``reason`` says why, nothing was committed."""

    event_type: Literal["SyncFailed"] = "SyncFailed"
    sync_id: uuid.UUID | None = None
    vm_snapshot: str | None = Field(default=None, max_length=128)
    reason: str = Field(max_length=64)
    detail: str = Field(default="", max_length=4096)
    retriable: bool = False


class SkipReason(StrEnum):
    """Why a VM snapshot did not capture a disk: it keeps changing after the snapshot and has no
    CBT, so copying it "from the snapshot" would be wrong."""

    INDEPENDENT_PERSISTENT = "independent_persistent"
    INDEPENDENT_NONPERSISTENT = "independent_nonpersistent"
    PHYSICAL_RDM = "physical_rdm"


class DiskSkipped(_Event):
    """A disk of a VM that its snapshot does not capture (independent disk, physical RDM): no
    sync is planned for it, and the snapshot's lifecycle does not wait for it (it is not in
    ``SnapshotTaken.snapshot_device_keys``)."""

    event_type: Literal["DiskSkipped"] = "DiskSkipped"
    vcenter: str = Field(max_length=MAX_TEXT)
    vm_snapshot: str = Field(min_length=1, max_length=128)
    snapshot_name: str = Field(default="", max_length=MAX_TEXT)
    reason: SkipReason
    taken_at: AwareDatetime
    esxi_host: str | None = Field(default=None, max_length=MAX_TEXT)


class RemovalReason(StrEnum):
    """Why cbtstream removed a VM snapshot."""

    #: Every disk of the snapshot finished with it (the snapshot lifecycle).
    SYNCED = "synced"
    #: No running or waiting sync needed it and it was older than the threshold (orphan hunt).
    ORPHANED = "orphaned"


class SnapshotRemoved(_Event):
    """The VM snapshot a disk was synced from was removed in vSphere (one event per disk)."""

    event_type: Literal["SnapshotRemoved"] = "SnapshotRemoved"
    vm_snapshot: str = Field(min_length=1, max_length=128)
    reason: RemovalReason = RemovalReason.SYNCED


class _ReplicaCheck(_Event):
    sync_id: uuid.UUID | None = Field(description="The sync whose result the replica holds.")
    change_id: str | None = Field(description="The change ID the replica holds.")
    expected_digest: str | None = Field(
        max_length=200, description="Replica digest of the latest commit (the expected state)."
    )
    replica_digest: str | None = Field(
        max_length=200, description="Digest recomputed from the replica's bytes (null: unread)."
    )
    source_digest: str | None = Field(
        default=None, max_length=200,
        description="Digest of the snapshot's NBD export, with `verify --source` (else null).",
    )
    target: str = Field(default="", max_length=MAX_TEXT, description="The replica's location.")

    _v_change_id = field_validator("change_id")(_check_change_id)


class ReplicaVerified(_ReplicaCheck):
    """``cbtstream verify`` re-hashed a replica: it equals the snapshot its last commit names."""

    event_type: Literal["ReplicaVerified"] = "ReplicaVerified"


class ReplicaMismatch(_ReplicaCheck):
    """A replica differs from what its last commit says it holds; the next sync copies it in full
    (``replica_mismatch``)."""

    event_type: Literal["ReplicaMismatch"] = "ReplicaMismatch"
    detail: str = Field(default="", max_length=4096)
    first_bad_offset: int | None = Field(default=None, ge=0)
    bad_leaves: int = Field(default=0, ge=0, description="MiBs of the replica that differ (its "
                            "hash tree's 1 MiB pieces; 1 MiB leaves in a version 1 tree).")


class FenceScope(StrEnum):
    """What a change-ID fence covers."""

    VM = "vm"
    HOST = "host"
    VCENTER = "vcenter"
    ALL = "all"


class ChangeIdFence(BaseModel):
    """An operator's statement that change IDs issued before ``before`` within a scope cannot
    be trusted (a CBT bug such as VMware KB 317933 until a patch date). Keyed
    ``fence/<fence_id>`` on the compacted ``cbt.changeid.fences``; the latest record per fence
    wins, and ``revoked`` ends a fence."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = SCHEMA_VERSION
    event_type: Literal["ChangeIdFence"] = "ChangeIdFence"
    event_id: uuid.UUID = Field(default_factory=uuid.uuid4)
    occurred_at: AwareDatetime = Field(default_factory=utcnow)
    fence_id: uuid.UUID
    scope: FenceScope
    target: str | None = Field(
        default=None, max_length=MAX_TEXT,
        description="VM (instance uuid, inventory path or name), ESXi host name, or vCenter "
        "host[:port]; null for scope all.")
    before: AwareDatetime = Field(
        description="Change IDs of snapshots taken before this time are untrusted.")
    reason: str = Field(min_length=1, max_length=MAX_TEXT)
    revoked: bool = False

    @model_validator(mode="after")
    def _target_and_time(self) -> ChangeIdFence:
        if (self.target is None) != (self.scope == FenceScope.ALL):
            raise ValueError("a fence names a target unless its scope is 'all'")
        if self.before > self.occurred_at:
            raise ValueError("a fence's time must not be in the future: every sync would be "
                             "full until then")
        return self

    @property
    def key(self) -> str:
        return f"fence/{self.fence_id}"


class HoldState(StrEnum):
    """A VM's replication hold (``ReplicationHold.state``)."""

    #: The operator runs the VM from its replicas: nothing is planned or written for it.
    FAILED_OVER = "failed_over"
    #: Replication resumes (``cbtstream failover --undo``).
    RELEASED = "released"
    #: The VM was cut over (``cbtstream cutover``): its final snapshot is on its replicas, which
    #: now belong to the target platform. Nothing is planned or written for it again.
    CUT_OVER = "cut_over"


class ReplicationHold(BaseModel):
    """An operator's hold on a VM's replication (``cbtstream failover``). While a VM is failed
    over the planner plans nothing for its disks (each snapshot of them is refused with
    ``SyncFailed(vm_failed_over)``), and its replicas' records say failed over, so a copier
    refuses any plan for them, also one produced again by hand. Keyed ``vm/<instance uuid>``
    on the compacted ``cbt.vm.holds``: the latest record per VM wins; ``released`` ends the
    hold. Not a disk event."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = SCHEMA_VERSION
    event_type: Literal["ReplicationHold"] = "ReplicationHold"
    event_id: uuid.UUID = Field(default_factory=uuid.uuid4)
    occurred_at: AwareDatetime = Field(default_factory=utcnow)
    vm_instance_uuid: uuid.UUID
    state: HoldState
    reason: str = Field(min_length=1, max_length=MAX_TEXT)

    @property
    def key(self) -> str:
        return f"vm/{self.vm_instance_uuid}"


class ScheduleKind(StrEnum):
    """What a scheduler reports about one VM in one cycle (``ScheduleEvent.kind``)."""

    #: The VM was snapshotted (its ``SnapshotTaken`` events are published).
    SNAPSHOT_TAKEN = "snapshot_taken"
    #: The snapshot (or publishing its events) failed; ``reason`` says why.
    SNAPSHOT_FAILED = "snapshot_failed"
    #: The VM was due but its previous snapshot is still being copied: not snapshotted again.
    RPO_AT_RISK = "rpo_at_risk"
    #: The VM's replica is provably older than its RPO (see ``point_at``).
    RPO_MISSED = "rpo_missed"


class ScheduleEvent(BaseModel):
    """What the site scheduler (``cbtstream schedule``) did or found for one VM in one cycle.
    Keyed by the VM's instance uuid on ``cbt.schedule.events``: the partition of a VM is the
    one its scheduler owns (``producers/site.py``), and that scheduler's own events are its
    memory after a restart or a rebalance. Not a disk event."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = SCHEMA_VERSION
    event_type: Literal["ScheduleEvent"] = "ScheduleEvent"
    event_id: uuid.UUID = Field(default_factory=uuid.uuid4)
    occurred_at: AwareDatetime = Field(default_factory=utcnow)
    kind: ScheduleKind
    vm_instance_uuid: uuid.UUID
    vm_name: str = Field(default="", max_length=MAX_TEXT)
    vm_path: str = Field(default="", max_length=MAX_TEXT)
    vcenter: str = Field(max_length=MAX_TEXT)
    policy: str = Field(min_length=1, max_length=128)
    rpo_s: float = Field(gt=0, description="The policy's recovery point objective.")
    cycle_at: AwareDatetime = Field(
        description="Start of the schedule slot (the policy's interval on a grid from the Unix "
        "epoch) the event belongs to.")
    vm_snapshot: str | None = Field(
        default=None, max_length=128,
        description="snapshot_taken: the new VM snapshot; rpo_at_risk: the one still being "
        "copied; rpo_missed: the one whose age proves the miss, if any.")
    point_at: AwareDatetime | None = Field(
        default=None,
        description="rpo_at_risk / rpo_missed: the creation time of the VM's oldest snapshot "
        "still being copied, else of its last snapshot taken: the replica holds nothing newer.")
    reason: str | None = Field(default=None, max_length=64,
                               description="snapshot_failed: the error's reason code.")
    detail: str = Field(default="", max_length=4096)

    @property
    def key(self) -> str:
        return str(self.vm_instance_uuid)


class VmDescribed(BaseModel):
    """The description of a VM (:class:`~schemas.vm.VmDescription`: firmware, CPUs, memory,
    guest OS, disks in controller order, NICs with MAC and network) read right after one of its
    snapshots was taken, so a failover finds the machine as it was replicated. One per VM
    snapshot, published before the snapshot's ``SnapshotTaken`` events; its id is
    :func:`vm_described_id`, so publishing it again is a duplicate. Keyed by the VM's instance
    uuid on ``cbt.vm.described``. Not a disk event."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = SCHEMA_VERSION
    event_type: Literal["VmDescribed"] = "VmDescribed"
    event_id: uuid.UUID = Field(default_factory=uuid.uuid4)
    occurred_at: AwareDatetime = Field(default_factory=utcnow)
    vm_instance_uuid: uuid.UUID
    vcenter: str = Field(max_length=MAX_TEXT, description="vCenter/ESXi the snapshot lives on.")
    vm_snapshot: str = Field(
        min_length=1, max_length=128,
        description="The VM snapshot the description goes with (SnapshotTaken.vm_snapshot).")
    snapshot_name: str = Field(default="", max_length=MAX_TEXT)
    taken_at: AwareDatetime = Field(description="The snapshot's creation time.")
    description: VmDescription = Field(
        description="Read from the live VM right after the snapshot was created (its disks' "
        "backing files are then the snapshot's new delta files).")

    @model_validator(mode="after")
    def _same_vm(self) -> VmDescribed:
        if self.description.vm_instance_uuid != str(self.vm_instance_uuid):
            raise ValueError("the description is of another VM than vm_instance_uuid")
        return self

    @property
    def key(self) -> str:
        return str(self.vm_instance_uuid)


def vm_described_id(vcenter: str, vm_instance_uuid: str | uuid.UUID,
                    vm_snapshot: str) -> uuid.UUID:
    """The id of a VM snapshot's ``VmDescribed``: one fact per VM snapshot, whenever it is
    read or published again."""
    return stable_event_id("VmDescribed", vcenter, str(vm_instance_uuid).lower(), vm_snapshot)


class CutoverDisk(BaseModel):
    """One disk of a cut-over VM: where its replica is, what it holds, and the proof."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    disk: DiskRef
    change_id: str | None = Field(description="The change ID of the final snapshot.")
    sync_id: uuid.UUID = Field(description="The final sync that wrote the replica.")
    replica_location: str = Field(
        max_length=MAX_TEXT, description="The replica: file path, block device or NBD URI.")
    replica_digest: str = Field(
        max_length=200, description="The replica's hash tree root, as re-hashed at cutover.")
    source_digest: str = Field(
        max_length=200, description="The root of the final snapshot's export, hashed at "
        "cutover: equal to replica_digest, or the cutover does not complete.")


class CutoverCompleted(BaseModel):
    """A VM was cut over (``cbtstream cutover``): stopped, its final snapshot copied to every
    replica and each replica proven equal to that snapshot's export. From here on the replicas
    belong to the target platform (the VM's ``ReplicationHold`` says ``cut_over``: later
    snapshots are refused with ``vm_cut_over``, copiers refuse to write the replicas). Carries
    what the target platform needs to start the machine: each disk's replica and digest, in the
    description's controller order, and the VM's description read at the final snapshot.
    Keyed by the VM's instance uuid on ``cbt.vm.cutovers``. Not a disk event."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = SCHEMA_VERSION
    event_type: Literal["CutoverCompleted"] = "CutoverCompleted"
    event_id: uuid.UUID = Field(default_factory=uuid.uuid4)
    occurred_at: AwareDatetime = Field(default_factory=utcnow)
    vm_instance_uuid: uuid.UUID
    vcenter: str = Field(max_length=MAX_TEXT)
    vm_snapshot: str = Field(min_length=1, max_length=128,
                             description="The final snapshot (SnapshotTaken.vm_snapshot).")
    taken_at: AwareDatetime = Field(description="The final snapshot's creation time.")
    stopped_by: Literal["shutdown", "power_off", "was_off"] = Field(
        description="How the VM was stopped before its final snapshot.")
    reason: str = Field(default="", max_length=MAX_TEXT)
    disks: tuple[CutoverDisk, ...] = Field(min_length=1)
    description: VmDescription | None = Field(
        description="The VM's description read at the final snapshot (null: it could not be "
        "read; the newest VmDescribed of the VM then serves).")
    timeline: dict[str, float] = Field(
        default_factory=dict,
        description="Seconds from the start of the cutover to the end of each step "
        "(stopped, snapshot, synced, verified, held).")

    @property
    def key(self) -> str:
        return str(self.vm_instance_uuid)


class DeadLetter(BaseModel):
    """A record that could not be decoded or validated, kept whole with where it came from."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = SCHEMA_VERSION
    event_type: Literal["DeadLetter"] = "DeadLetter"
    event_id: uuid.UUID = Field(default_factory=uuid.uuid4)
    occurred_at: AwareDatetime = Field(default_factory=utcnow)
    original_topic: str
    original_partition: int
    original_offset: int
    original_key: str | None = Field(description="Key as text, or base64 if not UTF-8.")
    original_key_encoding: Literal["utf-8", "base64"] = "utf-8"
    original_value: str | None
    original_value_encoding: Literal["utf-8", "base64"] = "utf-8"
    error: str = Field(max_length=8192)
    stage: str = Field(description="Which consumer rejected it.")


DiskEvent = Annotated[
    SnapshotTaken
    | SyncPlanned
    | SyncSuperseded
    | SyncProgress
    | ChangeIdCommitted
    | SyncFailed
    | SnapshotRemoved
    | ReplicaVerified
    | ReplicaMismatch
    | DiskSkipped,
    Field(discriminator="event_type"),
]
Event = SnapshotTaken | SyncPlanned | SyncSuperseded | SyncProgress | ChangeIdCommitted | SyncFailed | SnapshotRemoved | ReplicaVerified | ReplicaMismatch | DiskSkipped | DeadLetter  # noqa: E501

EVENT_TYPES: dict[str, type[BaseModel]] = {
    cls.__name__: cls
    for cls in (
        SnapshotTaken,
        SyncPlanned,
        SyncSuperseded,
        SyncProgress,
        ChangeIdCommitted,
        SyncFailed,
        SnapshotRemoved,
        ReplicaVerified,
        ReplicaMismatch,
        DiskSkipped,
        DeadLetter,
        ChangeIdFence,
        ScheduleEvent,
        VmDescribed,
        ReplicationHold,
        CutoverCompleted,
    )
}

DISK_EVENT_ADAPTER: TypeAdapter[DiskEvent] = TypeAdapter(DiskEvent)
