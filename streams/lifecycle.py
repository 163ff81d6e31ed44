"""Snapshot lifecycle: remove a VM snapshot once every disk in it is finished.

A VM snapshot covers all of the VM's disks, but each disk is synced on its own. The snapshot may be
removed only when every disk listed in ``SnapshotTaken.snapshot_device_keys`` has finished with
it: its sync committed, failed, or was superseded. Pure functions; ``streams.app`` feeds them
through a topic keyed by ``<vm instance uuid>/<vm snapshot>`` so one table row sees all of a
snapshot's disks, and hands the row to ``streams.removals`` when it is complete; the removal comes
back as a ``removed`` notice, which marks the row.

One notice per disk and snapshot: when the disk is finished with it. The notice repeats the
snapshot's ``snapshot_device_keys`` (kept in ``RunningSync`` or the waiting ``SnapshotTaken``), so
the first notice of a VM snapshot already tells the row which disks to wait for; a separate
"taken" notice per disk would add a record and a table write without changing when the snapshot
becomes releasable (only finished disks count). Rows still accept "taken" notices written by
earlier versions.

Only snapshots the pipeline will remove make notices: a ``SnapshotTaken`` without
``snapshot_device_keys`` (published by an upstream system that manages the snapshot itself) can
never become releasable, so :func:`notices` skips it (``Ended.release``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from pydantic import BaseModel, ConfigDict

from schemas.disk import DiskRef
from streams.state import Ended


class SnapshotRemover(Protocol):
    """Removes a VM snapshot in vSphere (idempotent: an already removed snapshot is success)."""

    async def remove(self, vm_instance_uuid: str, vm_snapshot: str) -> None: ...


class SnapshotRow(BaseModel):
    """What is known of one VM snapshot: the disks it covers and those finished with it."""

    model_config = ConfigDict(frozen=True)

    vm_instance_uuid: str
    vm_snapshot: str
    expected: tuple[int, ...] | None = None
    disks: dict[int, DiskRef] = {}
    finished: dict[int, str] = {}
    removed: bool = False


class Notice(BaseModel):
    """One disk's news about one VM snapshot, sent to the lifecycle topic."""

    model_config = ConfigDict(frozen=True)

    #: "finished" (a disk is done with the snapshot) or "removed" (the snapshot is gone from
    #: vSphere: ``streams.removals``); "taken" was written by earlier versions, still understood.
    kind: str
    disk: DiskRef
    vm_snapshot: str
    expected: tuple[int, ...] | None = None
    outcome: str = ""

    @property
    def key(self) -> bytes:
        return snapshot_key(self.disk.vm_instance_uuid, self.vm_snapshot)


def snapshot_key(vm_instance_uuid: str, vm_snapshot: str) -> bytes:
    return f"{vm_instance_uuid}/{vm_snapshot}".encode()


def notices(ended: Iterable[Ended]) -> list[Notice]:
    """The lifecycle notices of one planner step: one per sync or snapshot it finished (its
    ``Step.ended``; a redelivered input finishes the same ones again, and the notice is the same
    fact). Snapshots the pipeline does not remove (``Ended.release`` false) are left out."""
    return [Notice(kind="finished", disk=e.disk, vm_snapshot=e.vm_snapshot, outcome=e.outcome,
                   expected=e.snapshot_device_keys)
            for e in ended if e.release]


def apply(row: SnapshotRow | None, notice: Notice) -> SnapshotRow:
    row = row or SnapshotRow(vm_instance_uuid=notice.disk.vm_instance_uuid,
                             vm_snapshot=notice.vm_snapshot)
    key = notice.disk.device_key
    update: dict[str, object] = {"disks": {**row.disks, key: notice.disk}}
    if notice.expected is not None:
        update["expected"] = notice.expected
    if notice.kind == "finished":
        update["finished"] = {**row.finished, key: notice.outcome}
    if notice.kind == "removed":
        update["removed"] = True
    return row.model_copy(update=update)


def releasable(row: SnapshotRow) -> bool:
    """Every disk the snapshot covers is finished with it (and we know which disks those are)."""
    return (
        not row.removed
        and row.expected is not None
        and set(row.expected) <= set(row.finished)
    )
