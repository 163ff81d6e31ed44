"""What a replica is known to hold: the durable record the copier keeps with every replica.

The record names the replica (``replica_id``, minted when its first record is written and kept
by every later one) and the host of the copier that last wrote it in a sync (``host``), the disk
(key, backing uuid, capacity), the target (file: device and inode; block device: device number;
NBD: URI; and the size), the sync that last made the replica clean (its change ID, sync id, plan
generation, snapshot time, the published outcome and the hash tree root), and whether a sync is
writing it now (``dirty``, with that sync's id, generation, type and base). ``mismatch`` means
``cbtstream verify`` found the replica differs from its tree.

Records written before replica ids and hosts existed load with both unset (None); such a record
is treated as written by the host reading it, as it always was, and gets an id and a host from
the next sync that writes it.

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
    #: ``st_dev`` of a file, ``st_rdev`` of a block device; None for NBD. Host-specific: the
    #: same NFS export or SAN LUN has another number on another host.
    device: int | None = None
    #: ``st_ino`` of a file; None otherwise (an NFS file keeps its inode number on every host).
    inode: int | None = None
    size: int = Field(ge=0)

    def same_object(self, other: TargetIdentity | None, *, same_host: bool) -> bool:
        """Is ``other`` (the target as found now) this very file or volume?

        On the host that recorded it, every field must match. Seen from another host (a
        ``shared`` pool), the device number is not compared, since it names the mount or the
        device node on that host only: a file is the same by location, inode and size, a
        block device by location and size; an NBD export by URI and size, as on any host."""
        if other is None:
            return False
        if same_host:
            return self == other
        return self.model_copy(update={"device": None}) == other.model_copy(
            update={"device": None})


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
    #: The replica's own id (uuid4), minted with its first record and kept by every later one,
    #: whichever host writes it; None in records written before ids existed.
    replica_id: uuid.UUID | None = None
    #: ``copier.host_name`` of the copier that last wrote the record in a sync (``verify``
    #: keeps it); None in records written before hosts were recorded.
    host: str | None = Field(default=None, max_length=253)
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
    #: Set by ``cbtstream failover``: the replica is the operator's (a VM runs from it) and no
    #: sync writes it until ``failover --undo`` clears it (consumers/replica/failover.py).
    failed_over_at: AwareDatetime | None = None
    failed_over_reason: str = Field(default="", max_length=1000)
    #: Set by ``cbtstream failover --at POINT``: the replica was rolled back to an older restore
    #: point and ``held`` is that point; this is the change ID it held before. The next sync is
    #: incremental from ``held`` (``replica_rebased``) and clears it.
    rolled_back_from: str | None = None
    updated_at: AwareDatetime = Field(default_factory=utcnow)

    @property
    def high_generation(self) -> int:
        """The newest plan generation that has touched this replica."""
        return max(self.held.generation if self.held else 0,
                   self.writing.generation if self.writing else 0)

    def written_by(self, host: str) -> bool:
        """Did ``host`` write this record? A record without a host (written before hosts were
        recorded) counts as written by whoever reads it, as it always did."""
        return self.host is None or self.host == host

    def dirty(self, writing: WritingSync, target: TargetIdentity, host: str) -> ReplicaState:
        return self.model_copy(update={"status": ReplicaStatus.DIRTY, "writing": writing,
                                       "target": target, "host": host,
                                       "replica_id": self.replica_id or uuid.uuid4(),
                                       "updated_at": utcnow()})

    def clean(self, held: HeldSync, target: TargetIdentity, host: str) -> ReplicaState:
        return self.model_copy(update={"status": ReplicaStatus.CLEAN, "held": held,
                                       "writing": None, "target": target, "host": host,
                                       "replica_id": self.replica_id or uuid.uuid4(),
                                       "mismatch_detail": "", "rolled_back_from": None,
                                       "updated_at": utcnow()})

    def verified(self) -> ReplicaState:
        return self.model_copy(update={"verified_at": utcnow()})

    def failed_over(self, reason: str) -> ReplicaState:
        return self.model_copy(update={"failed_over_at": utcnow(),
                                       "failed_over_reason": reason[:1000],
                                       "updated_at": utcnow()})

    def failed_back(self) -> ReplicaState:
        return self.model_copy(update={"failed_over_at": None, "failed_over_reason": "",
                                       "updated_at": utcnow()})

    def mismatched(self, detail: str) -> ReplicaState:
        return self.model_copy(update={"status": ReplicaStatus.MISMATCH,
                                       "mismatch_detail": detail[:1000], "updated_at": utcnow()})


class Unknown(BaseModel):
    """A record that exists but cannot be trusted (torn, unreadable, foreign), and why."""

    model_config = ConfigDict(frozen=True)

    detail: str


def first_state(pipeline: str, disk_key: str, backing_uuid: str, capacity: int,
                target: TargetIdentity, writing: WritingSync, host: str) -> ReplicaState:
    """The record of a replica that has none yet, as its first sync starts: a new replica id."""
    return ReplicaState(pipeline=pipeline, replica_id=uuid.uuid4(), host=host,
                        disk_key=disk_key, backing_uuid=backing_uuid, capacity_bytes=capacity,
                        target=target, status=ReplicaStatus.DIRTY, writing=writing)
