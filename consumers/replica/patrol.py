"""Periodic verification inside the copier: one replica at a time, the least recently verified
first, read at a bounded rate so a patrol never competes with syncs for the disks.

Each check is :func:`consumers.replica.verify.check_replica` against the replica's own record
(the copier does not read the commit log; ``cbtstream verify`` also compares with the latest
commit). A replica a sync holds is skipped (busy) and comes back later. Results are published
as ``ReplicaVerified`` / ``ReplicaMismatch`` (counted in the copier's metrics); a mismatch marks
the record, so the disk's next sync is full with reason ``replica_mismatch``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from functools import partial
from typing import Any

from cbtstream.config import CopierSettings
from cbtstream.log import bind_disk
from cbtstream.tls import nbd_tls_context
from consumers.copy.throttle import Throttle
from consumers.replica.location import TargetResolver
from consumers.replica.state import ReplicaState, ReplicaStatus
from consumers.replica.verify import (
    Check,
    Found,
    check_replica,
    event_for,
    find_records,
    read_local_or_nbd,
)

log = logging.getLogger("cbtstream.copier.patrol")
_NEVER = datetime.min.replace(tzinfo=UTC)


def next_due(found: list[Found]) -> Found | None:
    """The clean replica verified longest ago (never verified first). Pure. A failed-over
    replica is the operator's (a VM may write it): not patrolled, failback checks it."""
    clean = [f for f in found if isinstance(f.record, ReplicaState)
             and f.record.status == ReplicaStatus.CLEAN and f.record.held is not None
             and f.record.failed_over_at is None]
    if not clean:
        return None
    return min(clean, key=lambda f: (f.record.verified_at or _NEVER  # type: ignore[union-attr]
                                     ))


class ReplicaPatrol:
    """Verifies this copier's replicas in the background (``copier.verify_interval_s``)."""

    def __init__(self, settings: CopierSettings, publish: Callable[[Any], Awaitable[object]],
                 *, sleep: Callable[[float], Awaitable[object]] = asyncio.sleep) -> None:
        self.settings = settings
        self.targets = TargetResolver(settings)
        self._publish = publish
        self._sleep = sleep

    async def check_next(self) -> Check | None:
        """Verify the replica most due; None if there is none."""
        found = await asyncio.to_thread(lambda: list(find_records(self.targets)))
        due = next_due(found)
        if due is None:
            return None
        throttle = Throttle(self.settings.verify_max_bytes_per_s)
        read = partial(read_local_or_nbd, tls_context=nbd_tls_context(self.settings),
                       throttle=throttle)
        with bind_disk(due.disk_key):
            check = await check_replica(due.location, read, wait_s=0)
            event = event_for(check)
            if event is not None:
                await self._publish(event)
            level = logging.INFO if check.result in ("equal", "busy") else logging.ERROR
            log.log(level, "replica verified" if check.ok else f"replica {check.result}",
                    extra={"detail": check.detail, "replica_digest": check.replica_digest})
        return check

    async def run(self) -> None:
        """Check one replica, pause ``verify_interval_s``, forever (until cancelled)."""
        while True:
            try:
                await self.check_next()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a patrol must never take the copier down
                log.warning("replica patrol failed; trying again later",
                            extra={"error": f"{type(exc).__name__}: {exc}"})
            await self._sleep(self.settings.verify_interval_s)


@contextlib.asynccontextmanager
async def patrolling(settings: CopierSettings, publish: Callable[[Any], Awaitable[object]]
                     ) -> Any:
    """Run a patrol for the duration of the block, if ``verify_interval_s`` > 0."""
    if settings.verify_interval_s <= 0:
        yield None
        return
    patrol = ReplicaPatrol(settings, publish)
    task = asyncio.create_task(patrol.run(), name="replica-patrol")
    try:
        yield patrol
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
