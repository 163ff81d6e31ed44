"""What a copier does with one plan, behind a small interface so the Kafka loop (``copier``) is
independent of where blocks come from.

``SyncExecutor.execute`` copies the blocks of one planned sync and returns only once the target is
durable (flushed) for every byte it reports. It raises a ``CbtStreamError`` subclass on failure;
retriable ones (``.retriable``) are retried by the copier with backoff.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from schemas.events import FullReason, ReplicationType, SyncPlanned


@dataclass(frozen=True)
class ProgressUpdate:
    """Bytes done so far for one running sync."""

    bytes_done: int
    bytes_total: int


@dataclass(frozen=True)
class SyncResult:
    """What was copied (and made durable) for one sync."""

    replication_type: ReplicationType
    reason: FullReason
    bytes_copied: int
    bytes_zeroed: int
    extents: int
    digest: str
    duration_s: float
    #: Root of the whole replica's hash tree after this sync (None: the executor keeps none).
    replica_digest: str | None = None
    #: Bytes read from the snapshot, and bytes in the changed areas asked for (None: not
    #: counted); ``bytes_read / bytes_changed`` is the sync's read amplification.
    bytes_read: int | None = None
    bytes_changed: int | None = None


ProgressCallback = Callable[[ProgressUpdate], None]


class SyncExecutor(Protocol):
    """Copies one planned sync to its configured target."""

    #: True if the executor keeps replica records and fences stale plans itself; the copier
    #: then hands it every redelivered plan (with ``outcome_published``) instead of skipping.
    guards_replicas: bool

    async def execute(self, plan: SyncPlanned, progress: ProgressCallback, *,
                      outcome_published: bool = False) -> SyncResult:
        """Copy, flush the target, return the result. May fall back from incremental to full
        (then ``result.replication_type`` is full and ``result.reason`` says why).
        ``outcome_published``: the copier's ledger says an outcome of this plan was published."""
        ...

    async def release(self, plan: SyncPlanned) -> None:
        """Called after the sync's outcome is published (committed or failed)."""
        ...


class NoopExecutor:
    """Copies nothing and reports success at once. For pipeline benchmarks and load tests,
    where only the orchestration is measured; never used for real replication."""

    guards_replicas = False

    async def execute(self, plan: SyncPlanned, progress: ProgressCallback, *,
                      outcome_published: bool = False) -> SyncResult:
        return SyncResult(plan.replication_type, plan.reason, 0, 0, 0, "sha256:" + "0" * 64, 0.0)

    async def release(self, plan: SyncPlanned) -> None:
        return None
