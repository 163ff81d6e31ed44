"""Snapshot lifecycle: remove a VM snapshot once every disk in it is finished.

A VM snapshot covers all of the VM's disks, but each disk is synced on its own. The snapshot may be
removed only when every disk listed in ``SnapshotTaken.snapshot_device_keys`` has finished with
it: its sync committed, failed, or was superseded. Pure functions; ``streams.app`` feeds them
through a topic keyed by ``<vm instance uuid>/<vm snapshot>`` so one table row sees all of a
snapshot's disks, and calls a :class:`SnapshotRemover` when the row is complete.

One notice per disk and snapshot: when the disk is finished with it. The notice repeats the
snapshot's ``snapshot_device_keys`` (kept in ``RunningSync`` or the waiting ``SnapshotTaken``), so
the first notice of a VM snapshot already tells the row which disks to wait for; a separate
"taken" notice per disk would add a record and a table write without changing when the snapshot
becomes releasable (only finished disks count). Rows still accept "taken" notices written by
earlier versions.

Only snapshots the pipeline will remove make notices: a ``SnapshotTaken`` without
``snapshot_device_keys`` (published by an upstream system that manages the snapshot itself) can
never become releasable, so :func:`finished` skips it (``RunningSync.release``).
"""

from __future__ import annotations

from typing import Protocol

from pydantic import BaseModel, ConfigDict

from schemas.disk import DiskRef
from schemas.events import SnapshotTaken, SyncSuperseded
from streams.state import DiskState


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

    kind: str  # "finished" ("taken": written by earlier versions, still understood)
    disk: DiskRef
    vm_snapshot: str
    expected: tuple[int, ...] | None = None
    outcome: str = ""

    @property
    def key(self) -> bytes:
        return snapshot_key(self.disk.vm_instance_uuid, self.vm_snapshot)


def snapshot_key(vm_instance_uuid: str, vm_snapshot: str) -> bytes:
    return f"{vm_instance_uuid}/{vm_snapshot}".encode()


def finished(before: DiskState | None, after: DiskState | None,
             outputs: list[BaseModel], incoming: SnapshotTaken | None = None) -> list[Notice]:
    """Snapshots a disk is done with after one planner step: the running sync ended (committed
    or failed), or a waiting/arriving snapshot was superseded. Snapshots the pipeline does not
    remove are left out; ``incoming`` is the step's ``SnapshotTaken``, if any, so a superseded
    snapshot can be told apart (one not found there nor waiting still gets its notice)."""
    out: list[Notice] = []
    ran = before.running if before is not None else None
    now = after.running if after is not None else None
    if ran is not None and ran.release and (now is None or now.sync_id != ran.sync_id):
        outcome = "committed" if after is not None and after.commit_sync_id == ran.sync_id \
            else "failed"
        out.append(Notice(kind="finished", disk=ran.disk, vm_snapshot=ran.vm_snapshot,
                          outcome=outcome, expected=ran.snapshot_device_keys))
    waiting = before.waiting if before is not None else None
    known = {snap.event_id: snap for snap in (incoming, waiting) if snap is not None}
    for o in outputs:
        if not isinstance(o, SyncSuperseded):
            continue
        snap = known.get(o.snapshot_event_id)
        if snap is not None and snap.snapshot_device_keys is None:
            continue
        out.append(Notice(kind="finished", disk=o.disk, vm_snapshot=o.vm_snapshot,
                          outcome="superseded",
                          expected=snap.snapshot_device_keys if snap is not None else None))
    return out


def apply(row: SnapshotRow | None, notice: Notice) -> SnapshotRow:
    row = row or SnapshotRow(vm_instance_uuid=notice.disk.vm_instance_uuid,
                             vm_snapshot=notice.vm_snapshot)
    key = notice.disk.device_key
    update: dict[str, object] = {"disks": {**row.disks, key: notice.disk}}
    if notice.expected is not None:
        update["expected"] = notice.expected
    if notice.kind == "finished":
        update["finished"] = {**row.finished, key: notice.outcome}
    return row.model_copy(update=update)


def releasable(row: SnapshotRow) -> bool:
    """Every disk the snapshot covers is finished with it (and we know which disks those are)."""
    return (
        not row.removed
        and row.expected is not None
        and set(row.expected) <= set(row.finished)
    )
