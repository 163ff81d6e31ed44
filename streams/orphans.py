"""The worker's side of the orphan hunt (the rules live with the producer, in
``producers/orphans.py``; the worker's command hands them in as an :class:`OrphanReconciler`).

``needed_snapshots`` (pure) is the set of VM snapshots a running or waiting sync of some disk
needs, from the ``disks`` table. The worker serves it at ``GET /api/v1/snapshots/needed`` (for
``cbtstream snapshots list|prune``) and, with ``streams.orphan_interval_s`` > 0, reconciles
every interval: list the snapshots in vSphere, select the orphans older than
``streams.orphan_older_than_s`` and remove them.

With several planner workers each holds the rows of its partitions, so the needs are gathered
from every worker (``streams.gather``): each says which snapshots its rows need and whether they
are the whole of its needs (:func:`needs_part`: it has processed every ``SnapshotTaken``
published so far to its partitions; a worker catching up on a backlog would otherwise find the
snapshots of events it has not read yet unneeded, and remove what a sync is about to copy). The
needs are known only when every part is whole and the parts cover every partition once
(:func:`merge_needs`); otherwise nothing is judged. One worker reconciles, the one holding
partition 0 of the table (``leads``), so two workers never list and remove at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sized
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


def needs_part(rows: Iterable[DiskState], whole: bool) -> dict[str, Any]:
    """One worker's part of the needs (its rows, and whether they are the whole of its
    partitions' needs), as it answers it to the others."""
    return {"complete": whole,
            "needed": [[vm, snap] for vm, snap in sorted(needed_snapshots(rows))]}


def merge_needs(parts: Iterable[Mapping[str, Any]]) -> set[tuple[str, str]] | None:
    """The needs of the whole table from every worker's part (which the caller checked cover
    the table once), or None if a part is not whole."""
    out: set[tuple[str, str]] = set()
    for part in parts:
        if not part.get("complete"):
            return None
        out.update((str(vm), str(snap)) for vm, snap in part.get("needed") or ())
    return out


#: The needs of the whole table, or None when they are not known (``merge_needs``).
Needs = Callable[[], Awaitable["set[tuple[str, str]] | None"]]


def register_orphans(app: Any, settings: Settings, needs: Needs,
                     send: Callable[[BaseModel], Awaitable[None]],
                     reconciler: OrphanReconciler | None,
                     observe: Callable[[str, int | None], None] | None = None, *,
                     leads: Callable[[], bool] = lambda: True,
                     authorized: Callable[[str | None], bool] = lambda header: True) -> None:
    """Add the API page and, with a ``reconciler`` and ``streams.orphan_interval_s`` > 0, the
    periodic reconcile to the Faust app. ``needs()`` gathers what every running or waiting
    sync needs (None: not known, see the module docstring); ``leads()`` says whether this
    worker is the one that reconciles; ``authorized(header)`` is the API's token check.
    ``observe(result, orphans)`` hears how each reconcile ended: ``done`` (with the number of
    orphans found), ``failed`` or ``skipped``."""

    def ended(result: str, orphans: int | None = None) -> None:
        if observe is not None:
            observe(result, orphans)

    async def known() -> set[tuple[str, str]] | None:
        from cbtstream.errors import CbtStreamError

        try:
            return await needs()
        except CbtStreamError as exc:
            log.warning("orphan needs unknown", extra={"error": str(exc)})
            return None

    async def get(self: Any, request: Any) -> Any:
        if not authorized(request.headers.get("Authorization")):
            return self.json({"error": "Unauthorized"}, status=401,
                             headers={"WWW-Authenticate": "Bearer"})
        needed = await known()
        if needed is None:
            return self.json({"complete": False, "needed": []})
        return self.json({"complete": True, "needed": [
            {"vm_instance_uuid": vm, "vm_snapshot": snap} for vm, snap in sorted(needed)]})

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
                if not leads():
                    continue  # another worker (the holder of partition 0) reconciles
                needed = await known()
                if needed is None:
                    log.info("orphan reconcile skipped: the workers' rows are not the whole "
                             "table yet, or not every snapshot event is processed")
                    ended("skipped")
                    continue
                try:
                    done = await reconciler.reconcile(needed, _Sender(send))
                except CbtStreamError as exc:
                    log.warning("orphan reconcile failed", extra={"error": str(exc)})
                    ended("failed")
                else:
                    ended("done", len(done.orphans))
        finally:
            await reconciler.stop()

    app.task(reconcile_forever)
