"""Snapshot a VM and publish one ``SnapshotTaken`` per disk.

One vSphere snapshot covers all disks of the VM (crash-consistent across disks, or quiesced);
each disk's change ID comes from that snapshot's config and travels with the disk's identity.
Event ids are deterministic (``stable_event_id``), so republishing after a partial failure gives
consumers duplicates they can drop, never a second fact.

Order of effects (:func:`snapshot_and_publish`): CBT check -> create the snapshot -> read the
VM's description -> publish ``VmDescribed`` -> publish ``DiskSkipped``* -> publish
``SnapshotTaken``*. Each publish waits for the broker's acknowledgement, so a consumer that sees
a disk's ``SnapshotTaken`` can find the VM's description of that snapshot on
``cbt.vm.described``. A description that cannot be read costs the snapshot its description,
never its disk events (see :func:`describe_snapshot`).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Protocol

from pydantic import BaseModel

from cbtstream.errors import CbtStreamError
from cbtstream.log import bind_disk
from cbtstream.vsphere.adapter import CbtStatus, SnapshotInfo, VmRef, VSphereClient
from cbtstream.vsphere.errors import CbtNotEnabled
from producers.cbt import set_cbt
from producers.naming import SNAPSHOT_DESCRIPTION, snapshot_name
from schemas.events import (
    DiskSkipped,
    SkipReason,
    SnapshotTaken,
    VmDescribed,
    stable_event_id,
    vm_described_id,
)
from schemas.vm import VmDescription

log = logging.getLogger(__name__)


class EventPublisher(Protocol):
    """What the producer needs of :class:`cbtstream.kafka.Publisher`."""

    async def publish(self, event: BaseModel) -> tuple[int, int]: ...


def is_instance_uuid(selector: str) -> bool:
    try:
        uuid.UUID(selector)
    except ValueError:
        return False
    return True


async def resolve_vm(client: VSphereClient, selector: VmRef | str) -> VmRef:
    """A VM given as a :class:`VmRef`, an instance UUID or an inventory path (``/DC/vm/x``)."""
    if isinstance(selector, VmRef):
        return selector
    if is_instance_uuid(selector):
        return await client.find_vm(instance_uuid=selector)
    return await client.find_vm(path=selector)


def default_snapshot_name(now: datetime | None = None) -> str:
    return snapshot_name(now or datetime.now(UTC))


def cbt_problem(status: CbtStatus) -> str | None:
    """Why a snapshot of this VM would carry no change IDs (every sync full), or None (pure)."""
    vm = status.vm.path or status.vm.instance_uuid
    if not status.enabled:
        return (f"CBT is off on {vm}: every sync would be a full copy. Run `cbtstream cbt "
                f"enable {status.vm.instance_uuid}` or snapshot with --enable-cbt")
    if not status.active:
        return (f"CBT is enabled on {vm} but not in effect yet (it waits for the VM's next "
                f"stun): run `cbtstream cbt enable {status.vm.instance_uuid}` or snapshot with "
                "--enable-cbt")
    return None


def snapshot_events(vcenter: str, info: SnapshotInfo, esxi_host: str | None = None, *,
                    policy: str | None = None, rpo_s: float | None = None
                    ) -> list[SnapshotTaken]:
    """The ``SnapshotTaken`` events of one snapshot, one per disk (pure). Each names every disk
    of the snapshot, so the pipeline can remove it once all of them are synced, the ESXi host
    the VM ran on (change-ID fences may name hosts), and the protection policy that asked for
    it with its RPO (the disk's status is measured against it)."""
    keys = tuple(disk.device_key for disk, _ in info.disks)
    return [
        SnapshotTaken(
            event_id=stable_event_id("SnapshotTaken", vcenter, disk.vm_instance_uuid,
                                     info.moref, disk.device_key),
            disk=disk,
            vcenter=vcenter,
            vm_snapshot=info.moref,
            snapshot_name=info.name,
            change_id=change_id,
            taken_at=info.created,
            snapshot_device_keys=keys,
            esxi_host=esxi_host,
            policy=policy,
            rpo_s=rpo_s,
        )
        for disk, change_id in info.disks
    ]


def skipped_events(vcenter: str, info: SnapshotInfo,
                   esxi_host: str | None = None) -> list[DiskSkipped]:
    """One ``DiskSkipped`` per disk the snapshot did not capture (pure): independent disks and
    physical RDMs keep changing after the snapshot and have no change IDs, so they get no
    ``SnapshotTaken`` (no sync) and are not in ``snapshot_device_keys`` (the lifecycle does not
    wait for them)."""
    return [
        DiskSkipped(
            event_id=stable_event_id("DiskSkipped", vcenter, disk.vm_instance_uuid, info.moref,
                                     disk.device_key),
            disk=disk, vcenter=vcenter, vm_snapshot=info.moref, snapshot_name=info.name,
            reason=SkipReason(reason), taken_at=info.created, esxi_host=esxi_host,
        )
        for disk, reason in info.skipped
    ]


def vm_described(vcenter: str, info: SnapshotInfo, description: VmDescription) -> VmDescribed:
    """The ``VmDescribed`` of one VM snapshot (pure): its id names the vCenter, the VM and the
    snapshot only, so describing and publishing the same snapshot again is a duplicate."""
    return VmDescribed(
        event_id=vm_described_id(vcenter, description.vm_instance_uuid, info.moref),
        vm_instance_uuid=uuid.UUID(description.vm_instance_uuid),
        vcenter=vcenter, vm_snapshot=info.moref, snapshot_name=info.name,
        taken_at=info.created, description=description,
    )


async def describe_snapshot(client: VSphereClient, ref: VmRef, info: SnapshotInfo
                            ) -> VmDescribed | None:
    """The VM's description, read now (right after ``info`` was created), as the snapshot's
    ``VmDescribed``; None, with a warning, when it cannot be read.

    Why a failure is not an error of the snapshot: the snapshot exists already and its disks
    are the replica; refusing its ``SnapshotTaken`` events would leave it orphaned and miss an
    RPO point for want of metadata the next snapshot records again (a failover takes the newest
    description, which then belongs to an earlier snapshot of the same VM: hardware changes
    rarely). Any exception counts, not only vSphere's: the mapping reads every device of the
    VM, and a bug on some exotic hardware must not stop the VM's replication.
    """
    try:
        return vm_described(client.vcenter, info, await client.describe_vm(ref))
    except Exception as exc:
        reason = exc.reason if isinstance(exc, CbtStreamError) else type(exc).__name__
        log.warning("VM description not recorded for this snapshot; its disk events are "
                    "published anyway", exc_info=not isinstance(exc, CbtStreamError), extra={
                        "vm": ref.instance_uuid, "vm_snapshot": info.moref,
                        "reason": reason, "error": str(exc)[:300]})
        return None


async def snapshot_and_publish(
    client: VSphereClient,
    publisher: EventPublisher,
    vm: VmRef | str,
    *,
    name: str | None = None,
    quiesce: bool = False,
    description: str = SNAPSHOT_DESCRIPTION,
    enable_cbt: bool = False,
    on_skipped: Callable[[DiskSkipped], None] | None = None,
    policy: str | None = None,
    rpo_s: float | None = None,
    on_undescribed: Callable[[], None] | None = None,
    on_described: Callable[[VmDescribed], None] | None = None,
    keep: bool = False,
) -> list[SnapshotTaken]:
    """Take one snapshot of ``vm`` and publish a ``SnapshotTaken`` for each of its disks.

    CBT must be in effect first: a VM whose CBT is off (or enabled but waiting for a stun)
    raises :class:`CbtNotEnabled` before any snapshot is taken or anything published, so no
    full copy is ever started silently; with ``enable_cbt`` it is switched on first
    (:func:`producers.cbt.set_cbt`).

    ``policy`` and ``rpo_s``: the protection policy that asked for the snapshot (the site
    scheduler's), carried by every event so the disk's status is measured against its RPO.

    Disks the snapshot does not capture get a ``DiskSkipped`` instead (also passed to
    ``on_skipped``), published before the ``SnapshotTaken`` events.

    Before both, one ``VmDescribed``: the VM's description read right after the snapshot was
    created. If it cannot be read, the disk events are published all the same, with a warning,
    and ``on_undescribed`` is called (the site scheduler counts it): see
    :func:`describe_snapshot`.

    ``on_described`` gets the ``VmDescribed`` once it is published.

    The snapshot is left in place: it is the copier's source, removed after the sync
    (``SnapshotRemoved``). With ``keep`` the pipeline does not remove it (its events name no
    ``snapshot_device_keys``, as an upstream system's may not): the caller does, e.g.
    ``cbtstream cutover``, which hashes the snapshot's export after the final sync. If
    publishing fails part-way, the snapshot stays and the error propagates; calling again
    publishes the same event ids for a new snapshot only.
    """
    ref = await resolve_vm(client, vm)
    status = await client.cbt_status(ref)
    problem = cbt_problem(status)
    if problem is not None and enable_cbt:
        status = await set_cbt(client, ref, True)
        problem = cbt_problem(status)
    if problem is not None:
        raise CbtNotEnabled(problem)
    info = await client.create_snapshot(ref, name or default_snapshot_name(), quiesce=quiesce,
                                        description=description)
    host = await client.vm_host(ref)
    described = await describe_snapshot(client, ref, info)
    if described is not None:
        await publisher.publish(described)
        log.debug("VM described", extra={"vm": ref.instance_uuid, "vm_snapshot": info.moref})
        if on_described is not None:
            on_described(described)
    elif on_undescribed is not None:
        on_undescribed()
    events = snapshot_events(client.vcenter, info, host.name or None, policy=policy, rpo_s=rpo_s)
    if keep:
        events = [e.model_copy(update={"snapshot_device_keys": None}) for e in events]
    for skipped in skipped_events(client.vcenter, info, host.name or None):
        with bind_disk(skipped.disk.key):
            await publisher.publish(skipped)
            log.warning("disk not captured by the snapshot, not synced", extra={
                "vm_snapshot": info.moref, "reason": str(skipped.reason)})
        if on_skipped is not None:
            on_skipped(skipped)
    for event in events:
        with bind_disk(event.disk.key):
            await publisher.publish(event)
            log.info("snapshot taken", extra={"vm_snapshot": info.moref,
                                              "change_id": event.change_id})
    return events
