"""What the table stores per disk, keyed by disk key.

``DiskState`` is the materialised view of one disk: its latest *committed* change ID (the only one
a sync may start from), the identity of the disk when that commit happened (to detect a replaced or
resized disk), the sync running now, and at most one snapshot waiting for it to finish.
"""

from __future__ import annotations

import uuid
from typing import Literal, NamedTuple

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from schemas.disk import DiskRef
from schemas.events import (
    DEFAULT_POOL,
    FullReason,
    ReplicationType,
    SnapshotTaken,
    SyncFailed,
)

#: How many recent snapshot event ids are remembered per disk, to republish what a redelivered
#: snapshot published (recognising a redelivery does not depend on it: ``DiskState.read``); 64
#: ids are about 2.5 kB of row.
SEEN_SNAPSHOTS = 64
#: How many finished syncs, and how many superseded snapshots, a row remembers
#: (``DiskState.ended``), so the redelivered commit, failure or snapshot of something already
#: finished republishes its outputs. Outputs can be lost only for the last steps before a crash
#: (``streams.durable``: they are sent milliseconds after their row), far inside this.
ENDED_HISTORY = 8

Outcome = Literal["committed", "failed", "superseded"]


class Position(NamedTuple):
    """Where an input record sits: its topic, partition and offset."""

    topic: str
    partition: int
    offset: int

    @property
    def source(self) -> str:
        """The key of ``DiskState.read``: ``<topic>#<partition>``."""
        return f"{self.topic}#{self.partition}"


class RunningSync(BaseModel):
    """The one sync of a disk that may be in flight."""

    model_config = ConfigDict(frozen=True)

    sync_id: uuid.UUID
    snapshot_event_id: uuid.UUID
    vm_snapshot: str
    previous_change_id: str | None
    change_id: str | None
    replication_type: ReplicationType
    disk: DiskRef
    taken_at: AwareDatetime
    planned_at: AwareDatetime
    #: The pipeline removes this VM snapshot when its disks are done (the ``SnapshotTaken`` had
    #: ``snapshot_device_keys``), so the end of this sync is news for ``streams.lifecycle``.
    #: Rows written before this field existed default to True: they still send the notice.
    release: bool = True
    #: ``SnapshotTaken.snapshot_device_keys``, repeated in the lifecycle notice of this sync.
    snapshot_device_keys: tuple[int, ...] | None = None
    #: The plan's generation (``SyncPlanned.generation``); 0 in rows written before it existed.
    generation: int = 0
    #: The plan's ``reason`` (None in rows written before it was kept: then re-derived by
    #: ``streams.planner.decide``), so the plan can be rebuilt identically from the row.
    reason: FullReason | None = None
    #: The copier pool the plan went to (``SyncPlanned.pool``).
    pool: str = DEFAULT_POOL
    #: The ESXi host of the snapshot (``SyncPlanned.esxi_host``).
    esxi_host: str | None = None


class Ended(BaseModel):
    """A sync that finished (committed or failed) or a snapshot that was superseded: what is
    needed to recognise its redelivered inputs and to publish its outputs again identically."""

    model_config = ConfigDict(frozen=True)

    snapshot_event_id: uuid.UUID
    vm_snapshot: str
    outcome: Outcome
    #: The sync, for a committed or failed one (None: a superseded snapshot never ran).
    sync_id: uuid.UUID | None = None
    #: For a superseded snapshot: the ``SnapshotTaken`` that replaced it.
    superseded_by: uuid.UUID | None = None
    #: For a sync: the lineage its plan promised; a later commit of the sync with the same one is
    #: a duplicate, with another one a real lineage conflict.
    previous_change_id: str | None = None
    change_id: str | None = None
    #: The failure the planner itself published for it (lineage mismatch, time-out), so a
    #: redelivery republishes the very same event.
    failure: SyncFailed | None = None
    #: The disk as that snapshot saw it (the body of its notice and of its SyncSuperseded).
    disk: DiskRef
    #: When it ended (``occurred_at`` of its SyncSuperseded, republished identically).
    at: AwareDatetime
    #: Lifecycle: the pipeline removes this snapshot (see ``RunningSync.release``).
    release: bool = False
    snapshot_device_keys: tuple[int, ...] | None = None


class DiskState(BaseModel):
    """One disk's row of the table."""

    model_config = ConfigDict(frozen=True)

    disk: DiskRef
    change_id: str | None = None
    committed_at: AwareDatetime | None = None
    commit_sync_id: uuid.UUID | None = None
    commit_event_id: uuid.UUID | None = None
    replication_type: ReplicationType | None = None
    commit_taken_at: AwareDatetime | None = None
    commits: int = 0
    #: Whole-replica digest named by the latest commit (None before replica trees existed).
    replica_digest: str | None = None
    #: Generation of the latest plan issued for this disk; the next plan gets a larger one.
    plan_generation: int = 0
    #: Who copies this disk: cbtstream's copier, or an external copier that stores its commits
    #: through the change-ID API (``streams.external``); set by the last accepted commit.
    owner: Literal["cbtstream", "external"] = "cbtstream"
    #: The external copier's job id of the latest external commit.
    external_job_id: str | None = None
    running: RunningSync | None = None
    waiting: SnapshotTaken | None = None
    last_failure: str | None = None
    seen_snapshots: tuple[uuid.UUID, ...] = Field(default=())
    #: The newest ``taken_at`` of any snapshot this row has processed: a redelivered snapshot is
    #: never newer (see ``read``).
    newest_snapshot_at: AwareDatetime | None = None
    #: Per source partition (``Position.source``), the offset of the latest input record whose
    #: step changed this row. A record at or below it was processed before: a redelivery (after
    #: a crash before the offset commit, or an operator's offset reset), recognised even when
    #: the bounded history (``seen_snapshots``, ``ended``) no longer names it, so it can never
    #: be mistaken for a new snapshot or a commit of an unknown sync.
    read: dict[str, int] = Field(default_factory=dict)
    #: The latest finished syncs and superseded snapshots, oldest first (``ENDED_HISTORY``).
    ended: tuple[Ended, ...] = Field(default=())
    #: Times the running sync was re-issued (same plan) because it showed no outcome and no
    #: progress for ``streams.sync_timeout_s``; reset when a sync starts.
    reissued: int = 0
    #: When it was last re-issued (a time-out counts silence from the later of this and
    #: ``RunningSync.planned_at``).
    reissued_at: AwareDatetime | None = None
    #: The copier pool that holds (or will hold) the disk's replica: the configured pool
    #: (``[pools]``) when the row was first planned, then only ``cbtstream pools move``
    #: changes it. None in rows written before pools existed (they take the configured pool).
    pool: str | None = None
    #: The pool of the latest commit: a plan for another pool is a full copy (``pool_moved``).
    commit_pool: str | None = None
    #: The protection policy of the newest snapshot that named one (``SnapshotTaken.policy``)
    #: and its RPO in seconds: the disk's status is measured against it. A snapshot taken by
    #: hand names none and leaves them; None: never scheduled (measured against
    #: ``streams.rpo_s``).
    policy: str | None = None
    rpo_s: float | None = None

    def with_seen(self, event_id: uuid.UUID) -> DiskState:
        seen = (*self.seen_snapshots, event_id)[-SEEN_SNAPSHOTS:]
        return self.model_copy(update={"seen_snapshots": seen})

    def with_ended(self, *entries: Ended) -> DiskState:
        """The row with ``entries`` remembered: the latest ``ENDED_HISTORY`` syncs and, apart,
        the latest ``ENDED_HISTORY`` superseded snapshots (a burst of snapshots superseding
        each other never pushes a finished sync out)."""
        every = (*self.ended, *entries)
        syncs = [e for e in every if e.sync_id is not None][-ENDED_HISTORY:]
        snaps = [e for e in every if e.sync_id is None][-ENDED_HISTORY:]
        keep = {id(e) for e in (*syncs, *snaps)}
        return self.model_copy(update={"ended": tuple(e for e in every if id(e) in keep)})

    def with_snapshot(self, snap: SnapshotTaken) -> DiskState:
        """The row with ``snap`` remembered as seen (``seen_snapshots``, ``newest_snapshot_at``)
        and, if it is the newest and names a protection policy, that policy and its RPO."""
        state = self.with_seen(snap.event_id)
        newest = state.newest_snapshot_at is None or snap.taken_at >= state.newest_snapshot_at
        update: dict[str, object] = {}
        if newest:
            update["newest_snapshot_at"] = snap.taken_at
            if snap.rpo_s is not None and (snap.policy, snap.rpo_s) != (state.policy,
                                                                        state.rpo_s):
                update.update(policy=snap.policy, rpo_s=snap.rpo_s)
        return state.model_copy(update=update) if update else state

    def with_read(self, position: Position) -> DiskState:
        """The row with ``position`` recorded as processed."""
        if self.read.get(position.source, -1) >= position.offset:
            return self
        return self.model_copy(update={"read": {**self.read, position.source: position.offset}})

    def processed(self, position: Position | None) -> bool:
        """Whether the record at ``position`` was processed by a step that changed this row
        (False without a position: a replay tool, a check decided in memory)."""
        return position is not None and self.read.get(position.source, -1) >= position.offset

    def ended_sync(self, sync_id: uuid.UUID) -> Ended | None:
        """The finished sync ``sync_id`` (committed or failed), if the row remembers it."""
        for e in reversed(self.ended):
            if e.sync_id == sync_id:
                return e
        return None

    @property
    def committed_disk(self) -> DiskRef | None:
        """The disk's identity as of its latest commit (None if never committed)."""
        return self.disk if self.change_id is not None else None


def to_json(state: DiskState) -> dict[str, object]:
    return state.model_dump(mode="json")


def from_json(data: object) -> DiskState | None:
    if data is None:
        return None
    return DiskState.model_validate(data)


def new_state(disk: DiskRef) -> DiskState:
    return DiskState(disk=disk)
