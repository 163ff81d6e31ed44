"""A sync's calls into its replica's restore points (``consumers/points``), in the copier's order.

Only when ``[points]`` keeps history (``PointsPolicy.keeps_history``); with the default policy
the copier never builds a :class:`SyncPoints` and its path is the one without points. Order of
effects (under the replica's lock; ``consumers/replica/session.py`` holds the rest)::

    [lock -> load record -> admit plan]
    -> begin     reconcile the catalogue with the record (its clean sync, and the sync a dirty
                 record names), the sync becomes the pending point, the live point gets an
                 undo store (catalogue durable) -> the target is wrapped in a SavingTarget
    -> [mark dirty -> copy: every write saves the old bytes first (consumers/points/saving.py)
        -> flush -> save tree -> mark clean]
    -> commit    seal the previous point's store, the sync is the live point (durable)
    -> prune     drop what the policy no longer keeps, reclaiming their undo data
    -> [publish -> release snapshot -> commit offset]

A failure in ``commit`` or ``prune`` does not fail the sync: the replica is clean and its commit
is the truth to publish; the next sync's ``begin`` finishes an unfinished commit (the record's
clean sync is the pending point) and its ``prune`` drops what this one did not.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

from cbtstream.config import PointsPolicy
from cbtstream.threads import opened_in_thread
from consumers.points.catalogue import Held
from consumers.points.chain import PointChain
from consumers.points.undo import UndoWriter
from consumers.replica.state import ReplicaState, ReplicaStatus, Unknown
from consumers.replica.store import ReplicaStore
from schemas.events import SyncPlanned

log = logging.getLogger("cbtstream.copier.points")


def chain_of(store: ReplicaStore, disk_key: str, capacity: int) -> PointChain:
    """The points of the replica whose record ``store`` keeps (files beside the record)."""
    return PointChain(store.directory, store.name, disk_key, capacity)


def held_of(record: ReplicaState | Unknown | None) -> Held | None:
    """What the record says the replica holds, as the points see it (None: nothing known)."""
    if not isinstance(record, ReplicaState) or record.held is None:
        return None
    held = record.held
    return Held(str(held.sync_id), held.change_id, held.replica_digest, record.updated_at,
                held.snapshot_taken_at, held.vm_snapshot)


def writing_of(record: ReplicaState | Unknown | None) -> str | None:
    """The sync a dirty record says is writing the replica (None if it is not dirty)."""
    if (isinstance(record, ReplicaState) and record.status == ReplicaStatus.DIRTY
            and record.writing is not None):
        return str(record.writing.sync_id)
    return None


class SyncPoints:
    """The restore points of one sync's replica (see the module docstring)."""

    def __init__(self, chain: PointChain, policy: PointsPolicy) -> None:
        self.chain = chain
        self.policy = policy
        self.writer: UndoWriter | None = None

    async def begin(self, plan: SyncPlanned, record: ReplicaState | Unknown | None
                    ) -> UndoWriter | None:
        """Before "mark dirty": the writer of the live point's undo store (None: no earlier
        point, e.g. a first copy, so nothing needs saving)."""
        # a snapshot without a change ID is never committed: its point stays pending and the
        # next sync replaces it, saving on into the same store
        self.writer = await opened_in_thread(
            self.chain.begin, str(plan.sync_id), plan.change_id or "", plan.snapshot_taken_at,
            held_of(record), writing_of(record), plan.vm_snapshot, close=_close_writer)
        return self.writer

    async def commit(self, plan: SyncPlanned, record: ReplicaState) -> None:
        """After "mark clean": the sync is the live point, then the policy is applied."""
        assert record.held is not None and record.held.sync_id == plan.sync_id
        try:
            await asyncio.to_thread(self.chain.commit, self.writer, str(plan.sync_id),
                                    record.held.replica_digest, record.updated_at)
        except Exception as exc:  # the next begin finishes it
            log.warning("restore point not committed; the next sync finishes it",
                        extra={"error": f"{type(exc).__name__}: {exc}"})
            return
        finally:
            self.close()  # the commit closed it, unless it failed first
        try:
            report = await asyncio.to_thread(self.chain.prune, self.policy, datetime.now(UTC))
        except Exception as exc:  # the next sync's prune drops them
            log.warning("old restore points not dropped; the next sync drops them",
                        extra={"error": f"{type(exc).__name__}: {exc}"})
            return
        if report.dropped:
            log.info("restore points dropped", extra={
                "points": list(report.dropped), "reclaimed_bytes": report.reclaimed_bytes})

    def close(self) -> None:
        """Close the undo store (however the sync ended; safe twice)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _close_writer(writer: UndoWriter | None) -> None:
    """Close an undo store a cancelled sync opened."""
    if writer is not None:
        writer.close()
