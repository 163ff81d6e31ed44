"""What the table stores per disk, keyed by disk key.

``DiskState`` is the materialised view of one disk: its latest *committed* change ID (the only one
a sync may start from), the identity of the disk when that commit happened (to detect a replaced or
resized disk), the sync running now, and at most one snapshot waiting for it to finish.
"""

from __future__ import annotations

import uuid
from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from schemas.disk import DiskRef
from schemas.events import ReplicationType, SnapshotTaken

#: How many recent snapshot event ids are remembered per disk to drop redelivered duplicates.
#: Redelivery happens within one consumer session, so a handful is plenty.
SEEN_SNAPSHOTS = 16


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

    def with_seen(self, event_id: uuid.UUID) -> DiskState:
        seen = (*self.seen_snapshots, event_id)[-SEEN_SNAPSHOTS:]
        return self.model_copy(update={"seen_snapshots": seen})

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
