"""The hold book and the planner's rule for a failed-over VM (``cbtstream failover``).

:class:`HoldBook` reads the compacted ``cbt.vm.holds`` whole, like the fence book. While a VM's
latest hold says ``failed_over`` (or ``cut_over``), :func:`refuse_snapshot` decides each
snapshot of its disks: not planned, ended as failed with ``SyncFailed(vm_failed_over)``
(``vm_cut_over``), so the snapshot lifecycle sees the disk finish with it and removes it; the
row is otherwise unchanged: its committed change ID stays what the replica held when it was
failed over. A redelivered snapshot publishes the same
refusal again (same event id).
"""

from __future__ import annotations

import logging
import uuid
from datetime import datetime

from cbtstream.config import KafkaSettings
from schemas.events import (
    FailureReason,
    HoldState,
    ReplicationHold,
    SnapshotTaken,
    SyncFailed,
    stable_event_id,
)
from schemas.topics import HOLDS
from streams.book import ControlBook, read_book
from streams.planner import Step
from streams.state import DiskState, Ended

log = logging.getLogger("cbtstream.holds")

#: The hold states in which nothing is planned for the VM, and the reason of each refusal.
HELD: dict[HoldState, FailureReason] = {
    HoldState.FAILED_OVER: FailureReason.VM_FAILED_OVER,
    HoldState.CUT_OVER: FailureReason.VM_CUT_OVER,
}


class HoldBook(ControlBook[ReplicationHold]):
    """``await book.run()`` in the background; ``book.hold_of(vm)`` for the planner."""

    def __init__(self, settings: KafkaSettings) -> None:
        super().__init__(settings, HOLDS, ReplicationHold, log, "hold")

    def hold_of(self, vm_instance_uuid: str) -> ReplicationHold | None:
        """The VM's hold if it is failed over now, else None."""
        try:
            key = f"vm/{uuid.UUID(vm_instance_uuid)}"
        except ValueError:
            return None
        hold = self.records.get(key)
        return hold if hold is not None and hold.state in HELD else None


async def read_holds(settings: KafkaSettings) -> list[ReplicationHold]:
    """Every VM's latest hold as of now (for the command line)."""
    return await read_book(HoldBook(settings))


def refusal_id(snap: SnapshotTaken,
               reason: FailureReason = FailureReason.VM_FAILED_OVER) -> uuid.UUID:
    return stable_event_id("SyncFailed", reason, snap.event_id)


def hold_detail(hold: ReplicationHold) -> str:
    """The detail of a refusal under ``hold``."""
    if hold.state == HoldState.CUT_OVER:
        return (f"the VM was cut over at {hold.occurred_at.isoformat()} ({hold.reason}): its "
                "replicas hold its final snapshot and belong to the target platform; nothing "
                "is planned for its disks")
    return (f"the VM is failed over since {hold.occurred_at.isoformat()} ({hold.reason}): "
            "nothing is planned for its disks until 'cbtstream failover --undo'")


def refuse_snapshot(state: DiskState, snap: SnapshotTaken, now: datetime, detail: str,
                    reason: FailureReason = FailureReason.VM_FAILED_OVER) -> Step:
    """A snapshot of a disk whose VM is failed over or cut over (``reason``): not planned,
    refused with a reason (the replay calls it too, for a snapshot whose refusal it finds in
    the log)."""
    for e in state.ended:
        if e.snapshot_event_id == snap.event_id and e.failure is not None:
            return Step(state, [e.failure], (e,), "redelivered")
    failure = SyncFailed(
        event_id=refusal_id(snap, reason), occurred_at=now, disk=snap.disk, sync_id=None,
        vm_snapshot=snap.vm_snapshot, reason=reason.value, detail=detail, retriable=False)
    e = Ended(snapshot_event_id=snap.event_id, vm_snapshot=snap.vm_snapshot, outcome="failed",
              failure=failure, disk=snap.disk, at=now,
              release=snap.snapshot_device_keys is not None,
              snapshot_device_keys=snap.snapshot_device_keys)
    return Step(state.with_seen(snap.event_id).with_ended(e), [failure], (e,), "refused")
