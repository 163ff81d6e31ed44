"""The topic catalogue: every topic of cbtstream is defined here, once.

All topics are keyed by the disk key ``<vm instance uuid>/disk-<device key>`` (except the
dead-letter topic, keyed by the original record's key, the fences, keyed ``fence/<id>``, the
holds, keyed ``vm/<instance uuid>``, and the scheduler's events and the VM descriptions, keyed
by VM instance uuid) and have the same
partition count, so the Faust table (keyed by disk key) co-partitions with every source topic.
Values are single-line JSON.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import BaseModel

from schemas.events import (
    ChangeIdCommitted,
    ChangeIdFence,
    CutoverCompleted,
    DeadLetter,
    DiskSkipped,
    ReplicaMismatch,
    ReplicationHold,
    ReplicaVerified,
    ScheduleEvent,
    SnapshotRemoved,
    SnapshotTaken,
    SyncFailed,
    SyncPlanned,
    SyncProgress,
    SyncSuperseded,
    VmDescribed,
)

_DAY_MS = 24 * 3600 * 1000


@dataclass(frozen=True)
class TopicSpec:
    """A topic: its base name, the event types it carries and its creation config."""

    name: str
    value_types: tuple[type[BaseModel], ...]
    config: dict[str, str] = field(default_factory=dict)
    description: str = ""

    def full_name(self, prefix: str = "") -> str:
        return f"{prefix}{self.name}"


SNAPSHOT_TAKEN = TopicSpec(
    "cbt.snapshot.taken",
    (SnapshotTaken,),
    {"cleanup.policy": "delete", "retention.ms": str(30 * _DAY_MS)},
    "One event per disk of each VM snapshot (input from producers and upstream systems).",
)
SYNC_PLANNED = TopicSpec(
    "cbt.sync.planned",
    (SyncPlanned, SyncSuperseded),
    # Kept forever: auditors check that every commit had a plan.
    {"cleanup.policy": "delete", "retention.ms": "-1"},
    "The planner's decision per disk snapshot: incremental from a change ID, or full + reason.",
)
CHANGEID_COMMITTED = TopicSpec(
    "cbt.changeid.committed",
    (ChangeIdCommitted,),
    # The audit log: never deleted, never compacted.
    {"cleanup.policy": "delete", "retention.ms": "-1", "retention.bytes": "-1"},
    "A disk's replica is durable up to a change ID. The audit log of record.",
)
SYNC_FAILED = TopicSpec(
    "cbt.sync.failed",
    (SyncFailed,),
    {"cleanup.policy": "delete", "retention.ms": str(90 * _DAY_MS)},
    "Syncs or commits that did not happen, with a reason.",
)
SYNC_PROGRESS = TopicSpec(
    "cbt.sync.progress",
    (SyncProgress,),
    {"cleanup.policy": "delete", "retention.ms": str(1 * _DAY_MS)},
    "Periodic progress of running syncs.",
)
SNAPSHOT_REMOVED = TopicSpec(
    "cbt.snapshot.removed",
    (SnapshotRemoved,),
    {"cleanup.policy": "delete", "retention.ms": str(90 * _DAY_MS)},
    "The VM snapshot behind a disk's sync was removed in vSphere.",
)
REPLICA_VERIFIED = TopicSpec(
    "cbt.replica.verified",
    (ReplicaVerified, ReplicaMismatch),
    {"cleanup.policy": "delete", "retention.ms": str(365 * _DAY_MS)},
    "Results of `cbtstream verify`: a replica re-hashed and compared with its last commit.",
)
DISK_SKIPPED = TopicSpec(
    "cbt.disk.skipped",
    (DiskSkipped,),
    {"cleanup.policy": "delete", "retention.ms": str(90 * _DAY_MS)},
    "Disks a VM snapshot did not capture (independent disks, physical RDMs): never synced.",
)
DEADLETTER = TopicSpec(
    "cbt.deadletter",
    (DeadLetter,),
    # Room for a dead letter keeping an input record of up to ~1 MiB whole (schemas.codec).
    {"cleanup.policy": "delete", "retention.ms": str(90 * _DAY_MS),
     "max.message.bytes": str(8 * 1024 * 1024)},
    "Records that could not be decoded or validated, with their origin and the error.",
)

FENCES = TopicSpec(
    "cbt.changeid.fences",
    (ChangeIdFence,),
    # Compacted: the latest record per fence id lives forever, so a restarted planner reads
    # every fence back (a revoked fence is a record with revoked=true, kept for the history).
    {"cleanup.policy": "compact"},
    "Operator fences: change IDs issued before a time within a scope are untrusted.",
)

SCHEDULE_EVENTS = TopicSpec(
    "cbt.schedule.events",
    (ScheduleEvent,),
    # Keyed by VM instance uuid; the site schedulers' consumer group splits VMs by its
    # partitions, and a scheduler reads its partitions back (a few RPOs) as its memory.
    {"cleanup.policy": "delete", "retention.ms": str(30 * _DAY_MS)},
    "The site scheduler's per-VM reports: snapshot taken or failed, rpo_at_risk, rpo_missed.",
)

VM_DESCRIBED = TopicSpec(
    "cbt.vm.described",
    (VmDescribed,),
    # Keyed by VM instance uuid. A year, like the verify results: a failover needs the newest
    # description of each VM, and a VM whose replication stopped (its last snapshot weeks or
    # months old) may still be failed over to its last replica; the log is small (one record
    # per VM snapshot, not per disk) and the audit keeps every description beyond that.
    {"cleanup.policy": "delete", "retention.ms": str(365 * _DAY_MS)},
    "Each VM snapshot's VM description (firmware, CPUs, memory, guest OS, disks, NICs), read "
    "right after the snapshot, for failover; kept a year (a VM's last replica may be older "
    "than any shorter retention).",
)

HOLDS = TopicSpec(
    "cbt.vm.holds",
    (ReplicationHold,),
    # Compacted, like the fences: the latest record per VM lives forever, so a restarted
    # planner knows every VM that is failed over (a release is a record, kept for the history).
    {"cleanup.policy": "compact"},
    "Operator holds: a VM failed over (nothing planned or written for it) or released.",
)

CUTOVERS = TopicSpec(
    "cbt.vm.cutovers",
    (CutoverCompleted,),
    # Compacted: the latest cutover per VM lives forever (what the target platform was handed).
    {"cleanup.policy": "compact"},
    "Cut-over VMs: each disk's replica and digest, proven against the final snapshot, and the "
    "VM's description for the target platform.",
)

#: Topics that carry no disk events (the replay's disk history does not read them): fences,
#: read whole by the planner; the scheduler's per-VM events; the VM descriptions (keyed by VM);
#: the holds (failover), read whole by the planner; the cutovers. The audit stores them too.
CONTROL_TOPICS: tuple[TopicSpec, ...] = (FENCES, SCHEDULE_EVENTS, VM_DESCRIBED, HOLDS,
                                          CUTOVERS)

ALL_TOPICS: tuple[TopicSpec, ...] = (
    SNAPSHOT_TAKEN,
    SYNC_PLANNED,
    CHANGEID_COMMITTED,
    SYNC_FAILED,
    SYNC_PROGRESS,
    SNAPSHOT_REMOVED,
    REPLICA_VERIFIED,
    DISK_SKIPPED,
    DEADLETTER,
)


#: What the audit consumer stores (and the topics whose lag is its lag): the disk topics and the
#: control topics, because auditors ask who fenced what when and which RPOs were missed. The
#: replay's disk history stays :data:`ALL_TOPICS`.
AUDITED_TOPICS: tuple[TopicSpec, ...] = (*ALL_TOPICS, *CONTROL_TOPICS)


def topic_for(event: BaseModel) -> TopicSpec:
    """The topic an event is published to."""
    for spec in (*ALL_TOPICS, *CONTROL_TOPICS):
        if isinstance(event, spec.value_types):
            return spec
    raise LookupError(f"no topic carries {type(event).__name__}")
