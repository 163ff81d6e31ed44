"""Event models of cbtstream (pydantic v2), the disk identity, change IDs and the topic catalogue.

Nothing here does I/O or imports Kafka or Faust: producers, the Faust app, consumers and upstream
systems share these models. JSON Schemas generated from them live in ``schemas/json``.
"""

from schemas.changeid import ChangeId, ChangeIdError
from schemas.disk import DiskRef, disk_id_for, disk_key_for, parse_disk_key
from schemas.events import (
    EVENT_TYPES,
    ChangeIdCommitted,
    DeadLetter,
    DiskSkipped,
    Event,
    FullReason,
    ReplicaMismatch,
    ReplicationType,
    ReplicaVerified,
    SnapshotRemoved,
    SnapshotTaken,
    SyncFailed,
    SyncPlanned,
    SyncProgress,
    SyncSuperseded,
)

__all__ = [
    "EVENT_TYPES",
    "ChangeId",
    "ChangeIdCommitted",
    "ChangeIdError",
    "DeadLetter",
    "DiskRef",
    "DiskSkipped",
    "Event",
    "FullReason",
    "ReplicaMismatch",
    "ReplicaVerified",
    "ReplicationType",
    "SnapshotRemoved",
    "SnapshotTaken",
    "SyncFailed",
    "SyncPlanned",
    "SyncProgress",
    "SyncSuperseded",
    "disk_id_for",
    "disk_key_for",
    "parse_disk_key",
]
