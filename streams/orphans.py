"""The worker's side of the orphan hunt (the rules live with the producer, in
``producers/orphans.py``; the worker's command hands them in as an :class:`OrphanReconciler`).

``needed_snapshots`` (pure) is the set of VM snapshots a running or waiting sync of some disk
needs, from the ``disks`` table. The worker serves it at ``GET /api/v1/snapshots/needed`` (for
``cbtstream snapshots list|prune``) and, with ``streams.orphan_interval_s`` > 0, reconciles
itself every interval: list the snapshots in vSphere, select the orphans older than
``streams.orphan_older_than_s`` and remove them. Both refuse to decide unless this worker's rows
are the whole of the needs: it holds every partition (the table is not spread over several
workers, none is being recovered) and has processed every ``SnapshotTaken`` published so far (a
worker catching up on a backlog would otherwise find the snapshots of events it has not read yet
unneeded, and remove what a sync is about to copy).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection, Iterable, Sized
from typing import Any, Protocol

from faust.web import View
from pydantic import BaseModel

from cbtstream.config import Settings
from streams.state import DiskState

log = logging.getLogger(__name__)


def needed_snapshots(rows: Iterable[DiskState]) -> set[tuple[str, str]]:
    """(VM instance uuid, snapshot) of every running or waiting sync (pure)."""
    out: set[tuple[str, str]] = set()
    for row in rows:
        for snap in (row.running, row.waiting):
            if snap is not None:
                out.add((snap.disk.vm_instance_uuid, snap.vm_snapshot))
    return out


class EventSink(Protocol):
    async def publish(self, event: BaseModel) -> tuple[int, int]: ...


class Reconciled(Protocol):
    """What a reconcile tells the worker: the orphans it found (and removed)."""

    @property
    def orphans(self) -> Sized: ...


class OrphanReconciler(Protocol):
    """Removes the cbtstream snapshots that are not in ``needed`` (and old enough), publishing
    what it removed through ``publisher``; ``producers.orphans.OrphanReaper`` in production."""

    async def reconcile(self, needed: Collection[tuple[str, str]],
                        publisher: EventSink) -> Reconciled: ...

    async def stop(self) -> None: ...


class _Sender:
    """The producer's EventPublisher over the worker's own Faust producer."""

    def __init__(self, send: Callable[[BaseModel], Awaitable[None]]) -> None:
        self._send = send

    async def publish(self, event: BaseModel) -> tuple[int, int]:
        await self._send(event)
        return (-1, -1)


def register_orphans(app: Any, settings: Settings, rows: Callable[[], list[DiskState]],
                     complete: Callable[[], Awaitable[bool]],
                     send: Callable[[BaseModel], Awaitable[None]],
                     reconciler: OrphanReconciler | None,
                     observe: Callable[[str, int | None], None] | None = None) -> None:
    """Add the API page and, with a ``reconciler`` and ``streams.orphan_interval_s`` > 0, the
    periodic reconcile to the Faust app. ``complete`` says whether ``rows`` are the whole of the
    needs (see the module docstring). ``observe(result, orphans)`` hears how each reconcile
    ended: ``done`` (with the number of orphans found), ``failed`` or ``skipped``."""

    def ended(result: str, orphans: int | None = None) -> None:
        if observe is not None:
            observe(result, orphans)

    async def whole() -> bool:
        from cbtstream.errors import CbtStreamError

        try:
            return await complete()
        except CbtStreamError as exc:
            log.warning("orphan needs unknown", extra={"error": str(exc)})
            return False

    async def get(self: Any, request: Any) -> Any:
        if not await whole():
            return self.json({"complete": False, "needed": []})
        return self.json({"complete": True, "needed": [
            {"vm_instance_uuid": vm, "vm_snapshot": snap}
            for vm, snap in sorted(needed_snapshots(rows()))]})

    app.page("/api/v1/snapshots/needed", name="api_snapshots_needed")(
        type("SnapshotsNeeded", (View,), {"get": get}))

    interval_s = settings.streams.orphan_interval_s
    if reconciler is None or interval_s <= 0:
        return

    async def reconcile_forever() -> None:
        from cbtstream.errors import CbtStreamError

        try:
            while True:
                await asyncio.sleep(interval_s)
                if not await whole():
                    log.info("orphan reconcile skipped: this worker does not hold every "
                             "partition, or has not processed every snapshot event yet")
                    ended("skipped")
                    continue
                try:
                    done = await reconciler.reconcile(needed_snapshots(rows()), _Sender(send))
                except CbtStreamError as exc:
                    log.warning("orphan reconcile failed", extra={"error": str(exc)})
                    ended("failed")
                else:
                    ended("done", len(done.orphans))
        finally:
            await reconciler.stop()

    app.task(reconcile_forever)
