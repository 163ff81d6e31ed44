"""Per-disk planning: pure functions from (table row, event) to (new row, events to publish).

Rules (see docs/architecture.md):

* A sync starts from the disk's own latest **committed** change ID, never another disk's and never
  an uncommitted one. It is incremental only if that change ID can still be trusted for the new
  snapshot: same backing disk (uuid, file, capacity) and the same CBT epoch with a larger sequence.
  Otherwise it is full, with the reason.
* At most one sync per disk runs at a time. A snapshot that arrives while one runs waits; a newer
  waiting snapshot supersedes an older one (``SyncSuperseded``), and a snapshot older than what is
  already committed or waiting is superseded at once.
* Ids are derived (uuid5) from the snapshot event id, so re-processing the same input after a crash
  produces the same sync id and the same events, which consumers drop as duplicates.
* Every plan of a disk gets a **generation** larger than any earlier plan of that disk
  (:func:`next_generation`); the copier refuses to write a plan older than what its replica holds,
  so an offset reset or a re-produced old plan can never roll a replica back.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from schemas.changeid import ChangeId
from schemas.disk import DiskRef
from schemas.events import (
    ChangeIdCommitted,
    ChangeIdFence,
    FullReason,
    ReplicationType,
    SnapshotTaken,
    SyncFailed,
    SyncPlanned,
    SyncSuperseded,
    stable_event_id,
)
from streams.fence import trusted
from streams.guard import LINEAGE_MISMATCH, Verdict, check_commit
from streams.state import DiskState, RunningSync, new_state

Output = SyncPlanned | SyncSuperseded | SyncFailed

#: A snapshot's disks point at a delta file ``name-000001.vmdk`` while the snapshot exists; it is
#: the same disk as ``name.vmdk``, so the delta suffix is ignored when comparing backing files.
_DELTA_SUFFIX = re.compile(r"-\d{6}(?=\.vmdk$)")


@dataclass(frozen=True)
class Decision:
    """Full or incremental, why, and which change ID to query changed areas from."""

    replication_type: ReplicationType
    reason: FullReason
    base_change_id: str | None


def _same_file(a: str, b: str) -> bool:
    return _DELTA_SUFFIX.sub("", a) == _DELTA_SUFFIX.sub("", b)


def decide(committed: DiskRef | None, committed_change_id: str | None,
           snap: SnapshotTaken) -> Decision:
    """The trust checks of DOMAIN.md, in order. Pure."""

    def full(reason: FullReason) -> Decision:
        return Decision(ReplicationType.FULL, reason, None)

    if snap.change_id is None:
        return full(FullReason.CBT_NOT_ENABLED)
    if committed is None or committed_change_id is None:
        return full(FullReason.NO_PREVIOUS_COMMIT)
    if committed.backing_uuid and snap.disk.backing_uuid != committed.backing_uuid:
        return full(FullReason.BACKING_UUID_CHANGED)
    if not _same_file(snap.disk.backing_file, committed.backing_file):
        return full(FullReason.BACKING_FILE_CHANGED)
    if snap.disk.capacity_bytes != committed.capacity_bytes:
        return full(FullReason.CAPACITY_CHANGED)
    prev, new = ChangeId.parse(committed_change_id), ChangeId.parse(snap.change_id)
    if not prev.same_epoch(new):
        return full(FullReason.EPOCH_CHANGED)
    if new.sequence <= prev.sequence:
        return full(FullReason.SEQUENCE_NOT_INCREASING)
    return Decision(ReplicationType.INCREMENTAL, FullReason.PREVIOUS_COMMIT, committed_change_id)


def _superseded(old: SnapshotTaken, by: SnapshotTaken) -> SyncSuperseded:
    return SyncSuperseded(
        event_id=stable_event_id("SyncSuperseded", old.event_id),
        disk=old.disk,
        snapshot_event_id=old.event_id,
        vm_snapshot=old.vm_snapshot,
        superseded_by=by.event_id,
    )


def next_generation(previous: int, snap: SnapshotTaken) -> int:
    """The generation of the next plan of a disk whose last plan had ``previous``.

    It is the larger of ``previous + 1`` and the snapshot's time in milliseconds: strictly
    increasing within a row, derived from the input only (re-processing yields the same plan), and
    still larger than the generations a replica holds if the table is ever rebuilt from scratch,
    because new snapshots are newer than old ones.
    """
    return max(previous + 1, int(snap.taken_at.timestamp() * 1000))


def start_sync(state: DiskState, snap: SnapshotTaken, now: datetime,
               fences: Sequence[ChangeIdFence] = ()) -> tuple[DiskState, Output]:
    """Plan ``snap`` for a disk with no running sync (a fenced change ID: ``streams.fence``)."""
    d = decide(state.committed_disk, state.change_id, snap)
    if d.replication_type == ReplicationType.INCREMENTAL and not trusted(
            fences, state.commit_taken_at or state.committed_at, snap)[0]:
        d = Decision(ReplicationType.FULL, FullReason.FENCED, None)
    generation = next_generation(state.plan_generation, snap)
    sync_id = stable_event_id("sync", snap.event_id)
    plan = SyncPlanned(
        event_id=stable_event_id("SyncPlanned", sync_id),
        occurred_at=now,
        disk=snap.disk,
        sync_id=sync_id,
        snapshot_event_id=snap.event_id,
        vm_snapshot=snap.vm_snapshot,
        replication_type=d.replication_type,
        reason=d.reason,
        previous_change_id=state.change_id,
        base_change_id=d.base_change_id,
        change_id=snap.change_id,
        generation=generation,
        snapshot_taken_at=snap.taken_at,
    )
    running = RunningSync(
        sync_id=sync_id,
        snapshot_event_id=snap.event_id,
        vm_snapshot=snap.vm_snapshot,
        previous_change_id=state.change_id,
        change_id=snap.change_id,
        replication_type=d.replication_type,
        disk=snap.disk,
        taken_at=snap.taken_at,
        planned_at=now,
        release=snap.snapshot_device_keys is not None,
        snapshot_device_keys=snap.snapshot_device_keys,
        generation=generation,
    )
    update = {"running": running, "waiting": None, "plan_generation": generation}
    return state.model_copy(update=update), plan


def on_snapshot(
    state: DiskState | None, snap: SnapshotTaken, now: datetime,
    fences: Sequence[ChangeIdFence] = (),
) -> tuple[DiskState, list[Output]]:
    """A disk was snapshotted: plan it now, or let it wait for the running sync."""
    if state is not None and snap.event_id in state.seen_snapshots:
        return state, []  # redelivered
    state = (state or new_state(snap.disk)).with_seen(snap.event_id)
    if state.commit_taken_at is not None and snap.taken_at <= state.commit_taken_at:
        # Older than what the replica already holds: copying it would roll the replica back.
        return state, [_superseded(snap, snap)]
    if state.running is None:
        state, plan = start_sync(state, snap, now, fences)
        return state, [plan]
    if snap.taken_at <= state.running.taken_at:
        return state, [_superseded(snap, snap)]
    waiting = state.waiting
    if waiting is not None and waiting.taken_at >= snap.taken_at:
        return state, [_superseded(snap, waiting)]
    out: list[Output] = [] if waiting is None else [_superseded(waiting, snap)]
    return state.model_copy(update={"waiting": snap}), out


def _finish(state: DiskState, now: datetime, out: list[Output],
            fences: Sequence[ChangeIdFence] = ()) -> tuple[DiskState, list[Output]]:
    """The running sync ended; start the waiting snapshot, if any."""
    if state.waiting is None:
        return state, out
    state, plan = start_sync(state, state.waiting, now, fences)
    return state, [*out, plan]


def on_commit(
    state: DiskState | None, ev: ChangeIdCommitted, now: datetime,
    fences: Sequence[ChangeIdFence] = (),
) -> tuple[DiskState | None, list[Output]]:
    """Apply a commit through the guard; refused commits become ``SyncFailed``."""
    result = check_commit(state, ev)
    if result.verdict == Verdict.DUPLICATE:
        return state, []
    if result.verdict == Verdict.REFUSE:
        failed = SyncFailed(
            event_id=stable_event_id("SyncFailed", LINEAGE_MISMATCH, ev.event_id),
            occurred_at=now,
            disk=ev.disk,
            sync_id=ev.sync_id,
            vm_snapshot=ev.vm_snapshot,
            reason=LINEAGE_MISMATCH,
            detail=f"commit {ev.event_id} refused: {result.detail}",
        )
        if state is not None and state.running is not None and state.running.sync_id == ev.sync_id:
            # The running sync produced a commit we cannot apply: that sync is over.
            released = state.model_copy(update={"running": None, "last_failure": LINEAGE_MISMATCH})
            return _finish(released, now, [failed], fences)
        return state, [failed]
    assert state is not None and state.running is not None  # guaranteed by ACCEPT
    applied = state.model_copy(
        update={
            "disk": ev.disk,
            "change_id": ev.change_id,
            "committed_at": ev.occurred_at,
            "commit_sync_id": ev.sync_id,
            "commit_event_id": ev.event_id,
            "commit_taken_at": state.running.taken_at,
            "replica_digest": ev.replica_digest,
            "replication_type": ev.replication_type,
            "commits": state.commits + 1,
            "running": None,
            "last_failure": None,
        }
    )
    return _finish(applied, now, [], fences)


def on_failed(
    state: DiskState | None, ev: SyncFailed, now: datetime,
    fences: Sequence[ChangeIdFence] = (),
) -> tuple[DiskState | None, list[Output]]:
    """A sync failed: release the disk if it was the running one, then start what waits."""
    if state is None or state.running is None or state.running.sync_id != ev.sync_id:
        return state, []
    released = state.model_copy(update={"running": None, "last_failure": ev.reason})
    return _finish(released, now, [], fences)
