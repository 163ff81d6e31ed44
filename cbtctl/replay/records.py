"""What the replay reads: one decoded (or undecodable) record and where it is in the log."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from schemas.events import DiskEvent


@dataclass(frozen=True, order=True)
class Coord:
    """Topic, partition and offset of one record: what an auditor needs to find it again
    (``kcat -C -t TOPIC -p PARTITION -o OFFSET -c 1``)."""

    topic: str
    partition: int
    offset: int

    def __str__(self) -> str:
        return f"{self.topic}/{self.partition}@{self.offset}"

    def as_json(self) -> dict[str, object]:
        return {"topic": self.topic, "partition": self.partition, "offset": self.offset}


@dataclass(frozen=True)
class LogRecord:
    """One record of a cbtstream topic. ``event`` is None when it could not be decoded, and
    ``error`` then says why. ``topic_name`` is the base name (``cbt.sync.planned``) without the
    installation's prefix."""

    coord: Coord
    topic_name: str
    timestamp_ms: int
    key: str | None
    event: DiskEvent | None
    error: str | None = None

    @property
    def time(self) -> datetime:
        return datetime.fromtimestamp(self.timestamp_ms / 1000, UTC)

    @property
    def disk_key(self) -> str | None:
        """The disk this record is about: the body's disk, else the record key."""
        return self.event.disk.key if self.event is not None else self.key
