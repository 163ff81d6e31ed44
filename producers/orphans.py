"""Orphaned snapshots: cbtstream's snapshots that nothing needs any more, and their removal.

A replication snapshot is normally removed by the worker once every disk in it is synced
(``streams/lifecycle.py``). When something crashed (a producer between snapshot and publish, a
worker whose removal failed, a ``SnapshotTaken`` lost to a rebalance), the snapshot stays and its
delta files grow until the datastore fills. :func:`select` decides, purely, which snapshots may go:

- only snapshots cbtstream created (:func:`producers.naming.created_by_cbtstream`: name prefix
  AND description mark). Anybody else's snapshot is never touched, whatever its age;
- only when the set of snapshots that running or waiting syncs need is known (the worker's
  ``disks`` table, whole: a worker holding part of the table cannot tell) and the snapshot is
  not in it;
- only when older than the threshold (a snapshot just taken may not have reached the planner).

:func:`prune` removes them (``RemoveSnapshot_Task``), then publishes one
``SnapshotRemoved(reason=orphaned)`` per captured disk of the snapshot, with ids derived from
(disk, snapshot) so a retry republishes the same facts. VMs with
``runtime.consolidationNeeded`` are reported, and consolidated (``ConsolidateVMDisks_Task``) only
on request.

:class:`OrphanReaper` binds these rules to one vSphere connection for the planner worker's
periodic reconcile: the worker's command builds it and hands it to ``streams/``, which knows only
the set of snapshots its syncs need and never imports this role.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from cbtstream.config import VSphereSettings
from cbtstream.vsphere.adapter import VmRef, VmSnapshot, VmSnapshots, VSphereClient
from cbtstream.vsphere.errors import VSphereNotFound
from producers.naming import created_by_cbtstream
from producers.snapshot import EventPublisher
from schemas.events import RemovalReason, SnapshotRemoved, stable_event_id

log = logging.getLogger(__name__)

#: (VM instance uuid, snapshot moref): how the worker names a snapshot a sync needs.
SnapshotId = tuple[str, str]


@dataclass(frozen=True)
class Verdict:
    """One snapshot and what :func:`select` decided about it."""

    snapshot: VmSnapshot
    #: orphaned (may be removed), needed, too_young, not_ours, needs_unknown
    decision: str


@dataclass
class Selection:
    verdicts: list[Verdict] = field(default_factory=list)
    consolidation_needed: list[VmRef] = field(default_factory=list)

    @property
    def orphans(self) -> list[VmSnapshot]:
        return [v.snapshot for v in self.verdicts if v.decision == "orphaned"]


def select(inventory: list[VmSnapshots], needed: Collection[SnapshotId] | None, now: datetime,
           older_than: timedelta) -> Selection:
    """Decide, per snapshot of every VM, whether it is an orphan (pure). ``needed`` None means
    unknown: nothing is an orphan then."""
    out = Selection()
    for vm in inventory:
        if vm.consolidation_needed:
            out.consolidation_needed.append(vm.vm)
        for snap in vm.snapshots:
            if not created_by_cbtstream(snap.name, snap.description):
                decision = "not_ours"
            elif needed is None:
                decision = "needs_unknown"
            elif (vm.vm.instance_uuid, snap.moref) in needed:
                decision = "needed"
            elif now - snap.created < older_than:
                decision = "too_young"
            else:
                decision = "orphaned"
            out.verdicts.append(Verdict(snap, decision))
    return out


async def prune(client: VSphereClient, publisher: EventPublisher, selection: Selection, *,
                consolidate: bool = False) -> list[SnapshotRemoved]:
    """Remove every orphan of ``selection`` and publish its ``SnapshotRemoved`` events; with
    ``consolidate``, consolidate the disks of VMs that need it. Returns the events published."""
    published: list[SnapshotRemoved] = []
    for snap in selection.orphans:
        try:
            info = await client.snapshot_info(snap.vm, snap.moref)
            await client.remove_snapshot(snap.vm, snap.moref)
        except VSphereNotFound:
            continue  # removed meanwhile (by the lifecycle or an operator)
        for disk, _ in [*info.disks, *((d, None) for d, _ in info.skipped)]:
            event = SnapshotRemoved(
                event_id=stable_event_id("SnapshotRemoved", disk.key, snap.moref),
                disk=disk, vm_snapshot=snap.moref, reason=RemovalReason.ORPHANED)
            await publisher.publish(event)
            published.append(event)
        log.warning("orphaned snapshot removed", extra={
            "vm": snap.vm.instance_uuid, "vm_snapshot": snap.moref, "snapshot_name": snap.name,
            "snapshot_created": snap.created.isoformat()})
    if consolidate:
        for vm in selection.consolidation_needed:
            await client.consolidate_disks(vm)
            log.info("disks consolidated", extra={"vm": vm.instance_uuid})
    return published


class OrphanReaper:
    """Lists cbtstream's snapshots in vSphere and removes the orphans among them (one
    ``reconcile`` per call; the caller says which snapshots its syncs still need)."""

    def __init__(self, vsphere: VSphereSettings, older_than: timedelta, *,
                 consolidate: bool = False) -> None:
        self._client = VSphereClient(vsphere)
        self._older_than = older_than
        self._consolidate = consolidate

    async def reconcile(self, needed: Collection[SnapshotId],
                        publisher: EventPublisher) -> Selection:
        """Select the orphans given ``needed`` (the whole set of needs), remove them and publish
        their ``SnapshotRemoved``; VMs that need consolidation are logged."""
        await self._client.start()
        selection = select(await self._client.list_snapshots(), needed, datetime.now(UTC),
                           self._older_than)
        await prune(self._client, publisher, selection, consolidate=self._consolidate)
        for vm in selection.consolidation_needed:
            log.warning("VM needs disk consolidation", extra={
                "vm": vm.instance_uuid, "path": vm.path})
        return selection

    async def stop(self) -> None:
        await self._client.stop()
