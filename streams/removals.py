"""Snapshot removals off the lifecycle stream, bounded and retried.

A VM snapshot becomes releasable when its last disk finishes with it (``streams.lifecycle``).
Removing it is a vCenter task that takes from a fraction of a second to minutes (ESXi merges the
delta into the base disk), so the lifecycle agent does not wait for it: a site of 5,000 VMs on a
15-minute RPO releases five snapshots a second, and one partition's agent removing them one after
another would fall behind, leave snapshots on the VMs and make the scheduler skip those VMs as
"still being copied".

:class:`Removals` runs them as tasks, at most ``streams.remove_concurrency`` at once, each retried
a few times. The table stays the one record of what is owed:

- the row is written (releasable, ``removed`` false) before anything is removed;
- a finished removal is a ``removed`` notice on the lifecycle topic, so the row is marked (and the
  ``SnapshotRemoved`` events sent) by the agent that owns the row, in its partition;
- a removal that failed, or that a killed or rebalanced worker never finished, is found again by
  :meth:`Removals.sweep` (a timer over the rows of the partitions this worker holds).

A snapshot is therefore removed only after every disk finished with it, and removed at least once:
removing an already removed snapshot is success (``SnapshotRemover``), so a sweep that races a
``removed`` notice costs one vCenter call.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Iterable

from cbtstream.errors import CbtStreamError
from streams.lifecycle import Notice, SnapshotRemover, SnapshotRow, releasable

log = logging.getLogger(__name__)

#: Tries per removal before it is left to the next sweep.
ATTEMPTS = 3


class Removals:
    """The removals in flight in this worker (one per VM snapshot)."""

    def __init__(self, remover: SnapshotRemover, announce: Callable[[Notice], Awaitable[None]],
                 *, concurrency: int, backoff_s: float = 1.0) -> None:
        self._remover = remover
        self._announce = announce
        self._slots = asyncio.Semaphore(concurrency)
        self._backoff_s = backoff_s
        self._flying: dict[bytes, asyncio.Task[bool]] = {}
        #: Removals done and failed since the start (for the metrics and the log).
        self.done = 0
        self.failed = 0

    def in_flight(self) -> int:
        return len(self._flying)

    def submit(self, key: bytes, row: SnapshotRow) -> bool:
        """Start removing ``row``'s snapshot unless it is already being removed here."""
        if key in self._flying or not releasable(row):
            return False
        task = asyncio.ensure_future(self._run(row))
        self._flying[key] = task
        task.add_done_callback(functools.partial(self._landed, key))
        return True

    def _landed(self, key: bytes, _task: asyncio.Task[bool]) -> None:
        self._flying.pop(key, None)

    def sweep(self, rows: Iterable[tuple[bytes, SnapshotRow]]) -> int:
        """Submit every releasable row not yet removed (rows of the partitions held now)."""
        return sum(self.submit(key, row) for key, row in rows)

    async def _run(self, row: SnapshotRow) -> bool:
        async with self._slots:
            for attempt in range(1, ATTEMPTS + 1):
                try:
                    await self._remover.remove(row.vm_instance_uuid, row.vm_snapshot)
                    break
                except CbtStreamError as exc:
                    log.warning("snapshot removal failed", extra={
                        "vm": row.vm_instance_uuid, "vm_snapshot": row.vm_snapshot,
                        "attempt": attempt, "error": str(exc)})
                    if attempt == ATTEMPTS or not exc.retriable:
                        self.failed += 1
                        return False
                    await asyncio.sleep(self._backoff_s * 2**attempt)
                except Exception:  # a bug must not end the task unseen: the sweep retries
                    log.exception("snapshot removal crashed", extra={
                        "vm": row.vm_instance_uuid, "vm_snapshot": row.vm_snapshot})
                    self.failed += 1
                    return False
        disk = next(iter(row.disks.values()))
        try:
            await self._announce(Notice(kind="removed", disk=disk, vm_snapshot=row.vm_snapshot))
        except Exception:  # the next sweep removes it again (already removed: success)
            log.exception("could not record a snapshot removal",
                          extra={"vm": row.vm_instance_uuid, "vm_snapshot": row.vm_snapshot})
            return False
        self.done += 1
        return True

    async def stop(self, grace_s: float = 0.0) -> None:
        """Let the removals in flight finish for up to ``grace_s`` seconds (a removal is a
        fraction of a second), then cancel the rest (their rows stay releasable: the next owner
        sweeps)."""
        tasks = list(self._flying.values())
        if tasks and grace_s > 0:
            await asyncio.wait(tasks, timeout=grace_s)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
