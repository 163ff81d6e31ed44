"""What a replica is known to hold: the durable record the copier keeps with every replica.

The record names the disk (key, backing uuid, capacity), the target (file: device and inode;
block device: device number; NBD: URI; and the size), the sync that last made the replica clean
(its change ID, sync id, plan generation, snapshot time, the published outcome and the hash tree
root), and whether a sync is writing it now (``dirty``, with that sync's id, generation, type and
base). ``mismatch`` means ``cbtstream verify`` found the replica differs from its tree.

Records are written by :mod:`consumers.replica.store` atomically; a record that cannot be read,
does not parse, or names another disk or pipeline is *unknown* and never trusted as clean.
"""

from __future__ import annotations

import uuid
from enum import StrEnum
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from schemas.disk import DiskRef
from schemas.events import ReplicationType, utcnow

STATE_VERSION: Literal[1] = 1


class TargetKind(StrEnum):
    FILE = "file"
    BLOCK = "block"
    NBD = "nbd"


class TargetIdentity(BaseModel):
    """Which physical object a replica is: a replaced file or volume has another identity."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: TargetKind
    #: The file or device path, or the NBD URI, as configured (the operator's name for it).
    location: str
    #: ``st_dev`` of a file, ``st_rdev`` of a block device; None for NBD.
    device: int | None = None
    #: ``st_ino`` of a file; None otherwise.
    inode: int | None = None
    size: int = Field(ge=0)


class ReplicaStatus(StrEnum):
    CLEAN = "clean"
    DIRTY = "dirty"
    MISMATCH = "mismatch"


class HeldSync(BaseModel):
    """The sync whose snapshot a clean replica holds (as written and flushed)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sync_id: uuid.UUID
    generation: int = Field(ge=0)
    change_id: str
    vm_snapshot: str
    snapshot_taken_at: AwareDatetime | None
    #: Root of the replica's hash tree and the file holding its pieces (which names the file
    #: of its leaf entries; ``consumers/replica/store.py``).
    replica_digest: str
    tree_file: str
    #: The version 1 root this tree was converted from, when the sync's commit (published before
    #: the upgrade) names that root: ``verify`` accepts either (``consumers/replica/convert.py``).
    converted_from: str | None = None
    #: The outcome that was published for this sync (``SyncResult`` fields), so a redelivered
    #: plan re-publishes the very same commit instead of writing again.
    result: dict[str, Any]


class WritingSync(BaseModel):
    """The sync that is writing (or was interrupted writing) the replica."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sync_id: uuid.UUID
    generation: int = Field(ge=0)
    replication_type: ReplicationType
    base_change_id: str | None
    snapshot_taken_at: AwareDatetime | None
    started_at: AwareDatetime = Field(default_factory=utcnow)


class ReplicaState(BaseModel):
    """The durable record of one replica."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: Literal[1] = STATE_VERSION
    #: ``<topic prefix><streams app id>``: generations are only comparable within one pipeline.
    pipeline: str
    disk_key: str
    backing_uuid: str
    capacity_bytes: int = Field(ge=0)
    target: TargetIdentity
    status: ReplicaStatus
    held: HeldSync | None = None
    writing: WritingSync | None = None
    mismatch_detail: str = ""
    #: The disk as of the last sync that wrote the replica (for events about it, e.g. verify's).
    disk: DiskRef | None = None
    #: When the replica was last re-hashed and found equal to ``held``.
    verified_at: AwareDatetime | None = None
    updated_at: AwareDatetime = Field(default_factory=utcnow)

    @property
    def high_generation(self) -> int:
        """The newest plan generation that has touched this replica."""
        return max(self.held.generation if self.held else 0,
                   self.writing.generation if self.writing else 0)

    def dirty(self, writing: WritingSync, target: TargetIdentity) -> ReplicaState:
        return self.model_copy(update={"status": ReplicaStatus.DIRTY, "writing": writing,
                                       "target": target, "updated_at": utcnow()})

    def clean(self, held: HeldSync, target: TargetIdentity) -> ReplicaState:
        return self.model_copy(update={"status": ReplicaStatus.CLEAN, "held": held,
                                       "writing": None, "target": target,
                                       "mismatch_detail": "", "updated_at": utcnow()})

    def verified(self) -> ReplicaState:
        return self.model_copy(update={"verified_at": utcnow()})

    def mismatched(self, detail: str) -> ReplicaState:
        return self.model_copy(update={"status": ReplicaStatus.MISMATCH,
                                       "mismatch_detail": detail[:1000], "updated_at": utcnow()})


class Unknown(BaseModel):
    """A record that exists but cannot be trusted (torn, unreadable, foreign), and why."""

    model_config = ConfigDict(frozen=True)

    detail: str


def first_state(pipeline: str, disk_key: str, backing_uuid: str, capacity: int,
                target: TargetIdentity, writing: WritingSync) -> ReplicaState:
    """The record of a replica that has none yet, as its first sync starts."""
    return ReplicaState(pipeline=pipeline, disk_key=disk_key, backing_uuid=backing_uuid,
                        capacity_bytes=capacity, target=target, status=ReplicaStatus.DIRTY,
                        writing=writing)
