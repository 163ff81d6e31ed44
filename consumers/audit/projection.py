"""How one event becomes rows of the audit tables: pure functions from an event to SQL statements.

Nothing here talks to a database; :mod:`consumers.audit.repository` executes what these functions
return, for the live consumer and for rebuilds alike, so the two cannot diverge.

Idempotency: the repository inserts the ``events`` row first (``on conflict (event_id) do
nothing``) and applies an event's projection only when that insert created the row, in the same
transaction. ``SyncProgress`` is the exception: it is not logged in ``events`` (high volume); its
projection keeps the newest progress per sync and is idempotent by itself. A queued report
(``state="queued"``: a copier holds the plan and has not started it) is not progress: it only
touches the job's rows, and the job stays ``planned`` until the copy runs.

Order independence: topics are consumed concurrently, so a commit may be read before its plan, or
a refusal before the commit it refuses. Every projection column therefore merges commutatively:
times with least/greatest, plan fields set only by the plan, commit fields recomputed from
``cbt_history`` (:data:`RECOMPUTE_VM_DISK`, :data:`RECOMPUTE_JOB`), and ``status`` and
``replication_type`` are generated columns. Replaying the same events in any order gives the same
rows (except ``events.ingested_at``).

Refused commits: the planner answers a commit its guard refuses with
``SyncFailed(reason="lineage_mismatch")`` whose event id is
``schemas.events.lineage_refusal_id(<commit event id>)``. ``cbt_history`` stores
that derived id for each commit; whichever of the two events arrives second marks the history row
``refused``, and the job's and disk's commit columns are recomputed from the commits that are not
refused, so a refused change ID never shows as ``vm_disks.disk_change_id``.

Control events (``ScheduleEvent``, ``ChangeIdFence``, ``VmDescribed``) are not about a disk: their
``events`` row has no disk key (a ``ScheduleEvent`` and a ``VmDescribed`` name their VM), and each
is one row of its own table (``schedule_events``, ``fence_events``, ``vm_descriptions``), written
once and never updated, so their order does not matter either. The fence in force is the newest
row of its ``fence_id``; a VM's description for a failover is its newest row by ``taken_at``.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from schemas.disk import DiskRef, parse_disk_key
from schemas.events import (
    ChangeIdCommitted,
    ChangeIdFence,
    CutoverCompleted,
    DeadLetter,
    Event,
    FailureReason,
    ReplicationHold,
    ScheduleEvent,
    SnapshotRemoved,
    SyncFailed,
    SyncPlanned,
    SyncProgress,
    VmDescribed,
    lineage_refusal_id,
)

#: Everything the audit stores: the disk events, the dead letters and the control events
#: (``schemas.events.Event`` does not name the control events: it is what disk readers decode).
AuditedEvent = (Event | ChangeIdFence | ScheduleEvent | VmDescribed | ReplicationHold
                | CutoverCompleted)


@dataclass(frozen=True)
class Stmt:
    """One SQL statement and its positional arguments."""

    sql: str
    args: tuple[Any, ...] = ()


#: Columns of ``events`` in the order of :func:`event_row` (and of the bulk insert's arrays).
EVENT_COLUMNS = (
    "event_id", "event_type", "disk_key", "vm_instance_uuid", "sync_id", "vm_snapshot", "topic",
    '"partition"', '"offset"', "occurred_at", "body",
)
_ARRAY_TYPES = ("uuid", "text", "text", "uuid", "uuid", "text", "text", "int4", "int8",
                "timestamptz", "text")
#: Bulk insert of a batch's events (one array per column); returns the ids inserted now, i.e. the
#: events whose projection must be applied.
INSERT_EVENTS = (
    f"INSERT INTO events ({', '.join(EVENT_COLUMNS)}) "
    "SELECT c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10::jsonb "
    f"FROM unnest({', '.join(f'${i + 1}::{t}[]' for i, t in enumerate(_ARRAY_TYPES))}) "
    "AS u(c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10) "
    "ON CONFLICT (event_id) DO NOTHING RETURNING event_id"
)


def newest_progress_only(events: list[AuditedEvent]) -> list[AuditedEvent]:
    """Drop every ``SyncProgress`` of a batch but the newest of its sync and state (the
    projection keeps only the newest anyway; progress is the high-volume topic). Per state, so
    a queued report never hides the running one it follows or precedes."""
    newest: dict[tuple[uuid.UUID, str], SyncProgress] = {}
    for e in events:
        if isinstance(e, SyncProgress):
            kept = newest.get((e.sync_id, e.state))
            if kept is None or (e.occurred_at, str(e.event_id)) > (kept.occurred_at,
                                                                   str(kept.event_id)):
                newest[(e.sync_id, e.state)] = e
    return [e for e in events
            if not isinstance(e, SyncProgress) or newest[(e.sync_id, e.state)] is e]


def stored_in_events(event: AuditedEvent) -> bool:
    return not isinstance(event, SyncProgress)


def event_row(topic: str, partition: int, offset: int,
              event: AuditedEvent) -> tuple[Any, ...]:
    """The ``events`` row of an event (columns of :data:`EVENT_COLUMNS`). Control events have
    no disk key; a ``ScheduleEvent`` and a ``VmDescribed`` name their VM, a fence nothing (its
    target may be a host)."""
    disk_key: str | None = None
    vm: str | None = None
    if isinstance(event, DeadLetter):
        disk_key = event.original_key
        try:
            vm = parse_disk_key(disk_key or "")[0]
        except ValueError:
            disk_key = vm = None
    elif isinstance(event, ScheduleEvent | VmDescribed | ReplicationHold | CutoverCompleted):
        vm = str(event.vm_instance_uuid)
    elif not isinstance(event, ChangeIdFence):
        disk_key, vm = event.disk.key, event.disk.vm_instance_uuid
    sync_id = getattr(event, "sync_id", None)
    vm_snapshot = getattr(event, "vm_snapshot", None)
    return (
        event.event_id, event.event_type, disk_key, uuid.UUID(vm) if vm else None, sync_id,
        vm_snapshot, topic, partition, offset, event.occurred_at, event.model_dump_json(),
    )


# -- statements -----------------------------------------------------------------------------------
_UPSERT_JOB = """
INSERT INTO replication_jobs (id, source_vm_path, source_vm_name, vm_instance_uuid, disk_key,
                              disk_id, vm_snapshot, created_at, updated_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8)
ON CONFLICT (id) DO UPDATE SET
    created_at = least(replication_jobs.created_at, excluded.created_at),
    updated_at = greatest(replication_jobs.updated_at, excluded.updated_at)
"""
_UPSERT_PLANNED_JOB = """
INSERT INTO replication_jobs (id, source_vm_path, source_vm_name, vm_instance_uuid, disk_key,
                              disk_id, vm_snapshot, created_at, updated_at, snapshot_event_id,
                              planned, planned_type, planned_reason)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8, $9, true, $10, $11)
ON CONFLICT (id) DO UPDATE SET
    source_vm_path = excluded.source_vm_path,
    source_vm_name = excluded.source_vm_name,
    vm_snapshot = excluded.vm_snapshot,
    snapshot_event_id = excluded.snapshot_event_id,
    planned = true,
    planned_type = excluded.planned_type,
    planned_reason = excluded.planned_reason,
    created_at = least(replication_jobs.created_at, excluded.created_at),
    updated_at = greatest(replication_jobs.updated_at, excluded.updated_at)
"""
_UPSERT_DISK = """
INSERT INTO vm_disks (job_id, disk_id, disk_key, vm_instance_uuid, device_key, vm_snapshot,
                      capacity_bytes, backing_uuid, backing_file, created_at, updated_at,
                      snapshot_removed_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10, (
    SELECT min(e.occurred_at) FROM events e
    WHERE e.event_type = 'SnapshotRemoved' AND e.disk_key = $3 AND e.vm_snapshot = $6))
ON CONFLICT (job_id, disk_id) DO UPDATE SET
    created_at = least(vm_disks.created_at, excluded.created_at),
    updated_at = greatest(vm_disks.updated_at, excluded.updated_at)
"""
_PLAN_DISK = """
UPDATE vm_disks SET vm_snapshot = $2, planned_change_id = $3, base_change_id = $4,
    previous_change_id = $5, capacity_bytes = $6, backing_uuid = $7, backing_file = $8,
    snapshot_removed_at = coalesce(snapshot_removed_at, (
        SELECT min(e.occurred_at) FROM events e
        WHERE e.event_type = 'SnapshotRemoved' AND e.disk_key = vm_disks.disk_key
          AND e.vm_snapshot = $2))
WHERE job_id = $1
"""
_INSERT_HISTORY = """
INSERT INTO cbt_history (event_id, disk_key, vm_instance_uuid, disk_id, previous_change_id,
    change_id, replication_type, reason, bytes_copied, bytes_zeroed, extents, digest, duration_s,
    committed_at, sync_id, vm_snapshot, refusal_event_id, refused)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17,
        EXISTS (SELECT 1 FROM events WHERE event_id = $17))
ON CONFLICT (event_id) DO NOTHING
"""
_ACCEPTED_COMMIT = """
(SELECT 1) AS one LEFT JOIN LATERAL (
    SELECT * FROM cbt_history h WHERE h.sync_id = $1 AND NOT h.refused
    ORDER BY h.committed_at DESC, h.event_id DESC LIMIT 1) AS c ON true
"""
#: The disk's commit columns from the sync's newest commit that was not refused (or nulls).
RECOMPUTE_VM_DISK = f"""
UPDATE vm_disks SET (disk_change_id, commit_event_id, bytes_copied, bytes_zeroed, extents, digest,
                     duration_s) = (
    SELECT c.change_id, c.event_id, c.bytes_copied, c.bytes_zeroed, c.extents, c.digest,
           c.duration_s FROM {_ACCEPTED_COMMIT})
WHERE job_id = $1
"""
#: The job's commit columns, likewise (``status`` and ``replication_type`` follow).
RECOMPUTE_JOB = f"""
UPDATE replication_jobs SET (committed_type, committed_reason, committed_at) = (
    SELECT c.replication_type, c.reason, c.committed_at FROM {_ACCEPTED_COMMIT})
WHERE id = $1
"""
_FAIL_JOB = """
UPDATE replication_jobs SET failed_at = $2, failure_reason = $3, failure_detail = $4
WHERE id = $1 AND (failed_at IS NULL OR failed_at < $2
                   OR (failed_at = $2 AND failure_reason < $3))
"""
_REFUSE = "UPDATE cbt_history SET refused = true WHERE refusal_event_id = $1"
#: An external copier's commit: its origin on the job and the history row.
_ORIGIN = """
WITH h AS (UPDATE cbt_history SET origin = $2, origin_job_id = $3 WHERE event_id = $4)
UPDATE replication_jobs SET origin = $2, origin_job_id = $3, origin_client = $5 WHERE id = $1
"""
_PROGRESS = """
UPDATE replication_jobs SET progress_at = $2, progress_bytes_done = $3, progress_bytes_total = $4,
    progress_rate_bytes_per_s = $5
WHERE id = $1 AND (progress_at IS NULL OR progress_at < $2)
"""
_SNAPSHOT_REMOVED = """
UPDATE vm_disks SET snapshot_removed_at = least(coalesce(snapshot_removed_at, $3), $3)
WHERE disk_key = $1 AND vm_snapshot = $2
"""
_INSERT_SCHEDULE = """
INSERT INTO schedule_events (event_id, occurred_at, vm_instance_uuid, vm_name, vm_path, vcenter,
    policy, kind, cycle_at, rpo_s, vm_snapshot, point_at, reason, detail)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
ON CONFLICT (event_id) DO NOTHING
"""
_INSERT_FENCE = """
INSERT INTO fence_events (event_id, occurred_at, fence_id, scope, target, fenced_before, reason,
    revoked)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
ON CONFLICT (event_id) DO NOTHING
"""

_INSERT_VM_DESCRIPTION = """
INSERT INTO vm_descriptions (event_id, occurred_at, vm_instance_uuid, vm_name, vm_path, vcenter,
    vm_snapshot, snapshot_name, taken_at, firmware, secure_boot, num_cpus, cores_per_socket,
    memory_mib, guest_id, hardware_version, disks, nics, description)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18,
        $19::jsonb)
ON CONFLICT (event_id) DO NOTHING
"""


#: Every statement :func:`project` emits, in the order a batch executes them. Each statement is
#: order-independent across events (see the module docstring), so a batch may run all events'
#: statements grouped by kind (one pipelined ``executemany`` each) as long as rows exist before
#: they are updated (jobs before disks) and commit columns are recomputed after every history
#: row and refusal of the batch is in.
PHASES: tuple[str, ...] = (
    _UPSERT_PLANNED_JOB, _UPSERT_JOB, _UPSERT_DISK, _PLAN_DISK, _INSERT_HISTORY, _FAIL_JOB,
    _REFUSE, RECOMPUTE_VM_DISK, RECOMPUTE_JOB, _PROGRESS, _SNAPSHOT_REMOVED, _ORIGIN,
    _INSERT_SCHEDULE, _INSERT_FENCE, _INSERT_VM_DESCRIPTION,
)


def _job_and_disk(sync_id: uuid.UUID, disk: DiskRef, vm_snapshot: str | None,
                  at: object) -> list[Stmt]:
    vm = uuid.UUID(disk.vm_instance_uuid)
    return [
        Stmt(_UPSERT_JOB, (sync_id, disk.vm_path, disk.vm_name, vm, disk.key, disk.disk_id,
                           vm_snapshot, at)),
        Stmt(_UPSERT_DISK, (sync_id, disk.disk_id, disk.key, vm, disk.device_key, vm_snapshot,
                            disk.capacity_bytes, disk.backing_uuid, disk.backing_file, at)),
    ]


def _recompute(sync_id: uuid.UUID) -> list[Stmt]:
    return [Stmt(RECOMPUTE_VM_DISK, (sync_id,)), Stmt(RECOMPUTE_JOB, (sync_id,))]


def project(event: AuditedEvent) -> list[Stmt]:
    """The statements that apply ``event`` to the projections (after its ``events`` row)."""
    if isinstance(event, SyncPlanned):
        d, vm = event.disk, uuid.UUID(event.disk.vm_instance_uuid)
        return [
            Stmt(_UPSERT_PLANNED_JOB, (
                event.sync_id, d.vm_path, d.vm_name, vm, d.key, d.disk_id, event.vm_snapshot,
                event.occurred_at, event.snapshot_event_id, event.replication_type.value,
                event.reason.value)),
            Stmt(_UPSERT_DISK, (event.sync_id, d.disk_id, d.key, vm, d.device_key,
                                event.vm_snapshot, d.capacity_bytes, d.backing_uuid,
                                d.backing_file, event.occurred_at)),
            Stmt(_PLAN_DISK, (event.sync_id, event.vm_snapshot, event.change_id,
                              event.base_change_id, event.previous_change_id, d.capacity_bytes,
                              d.backing_uuid, d.backing_file)),
        ]
    if isinstance(event, ChangeIdCommitted):
        d = event.disk
        return [
            *_job_and_disk(event.sync_id, d, event.vm_snapshot, event.occurred_at),
            Stmt(_INSERT_HISTORY, (
                event.event_id, d.key, uuid.UUID(d.vm_instance_uuid), d.disk_id,
                event.previous_change_id, event.change_id, event.replication_type.value,
                event.reason.value, event.bytes_copied, event.bytes_zeroed, event.extents,
                event.digest, event.duration_s, event.occurred_at, event.sync_id,
                event.vm_snapshot, lineage_refusal_id(event.event_id))),
            *_recompute(event.sync_id),
            *([Stmt(_ORIGIN, (event.sync_id, event.origin, event.origin_job_id, event.event_id,
                              event.origin_client))] if event.origin != "cbtstream" else []),
        ]
    if isinstance(event, SyncFailed):
        if event.sync_id is None or event.reason == FailureReason.STALE_PLAN:
            # a failure outside any sync (e.g. before planning), or an old plan delivered again
            # and refused by the copier (its job's own outcome stands): kept in events only
            return []
        out = [
            *_job_and_disk(event.sync_id, event.disk, event.vm_snapshot, event.occurred_at),
            Stmt(_FAIL_JOB, (event.sync_id, event.occurred_at, event.reason, event.detail)),
        ]
        if event.reason == FailureReason.LINEAGE_MISMATCH:
            out += [Stmt(_REFUSE, (event.event_id,)), *_recompute(event.sync_id)]
        return out
    if isinstance(event, SyncProgress):
        if event.state == "queued":
            # Held by a copier and not started (consumers/queued.py): news of the sync, so its
            # rows exist and are touched, but no progress: the job stays 'planned'.
            return _job_and_disk(event.sync_id, event.disk, None, event.occurred_at)
        return [
            *_job_and_disk(event.sync_id, event.disk, None, event.occurred_at),
            Stmt(_PROGRESS, (event.sync_id, event.occurred_at, event.bytes_done,
                             event.bytes_total, event.rate_bytes_per_s)),
        ]
    if isinstance(event, SnapshotRemoved):
        return [Stmt(_SNAPSHOT_REMOVED, (event.disk.key, event.vm_snapshot, event.occurred_at))]
    if isinstance(event, ScheduleEvent):
        return [Stmt(_INSERT_SCHEDULE, (
            event.event_id, event.occurred_at, event.vm_instance_uuid, event.vm_name,
            event.vm_path, event.vcenter, event.policy, event.kind.value, event.cycle_at,
            event.rpo_s, event.vm_snapshot, event.point_at, event.reason, event.detail))]
    if isinstance(event, ChangeIdFence):
        return [Stmt(_INSERT_FENCE, (
            event.event_id, event.occurred_at, event.fence_id, event.scope.value, event.target,
            event.before, event.reason, event.revoked))]
    if isinstance(event, VmDescribed):
        desc = event.description
        return [Stmt(_INSERT_VM_DESCRIPTION, (
            event.event_id, event.occurred_at, event.vm_instance_uuid, desc.name, desc.vm_path,
            event.vcenter, event.vm_snapshot, event.snapshot_name, event.taken_at, desc.firmware,
            desc.secure_boot, desc.num_cpus, desc.cores_per_socket, desc.memory_mib,
            desc.guest_id, desc.hardware_version, len(desc.disks), len(desc.nics),
            desc.model_dump_json()))]
    # SnapshotTaken, SyncSuperseded, DeadLetter, ReplicationHold, CutoverCompleted: the events row
    return []
