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
* **Re-emission.** Every step's outputs are a function of the row and the input, including for an
  input the row has already seen: a redelivered ``SnapshotTaken`` republishes what its first
  delivery published (its plan if it is the running sync's, the ``SyncSuperseded`` it caused or
  got), a redelivered commit or failure of a finished sync republishes what followed it (the
  planner's own ``SyncFailed``, the plan of the sync running now, the lifecycle notice). The row is
  written to the changelog before the outputs are sent and the two are not atomic, so a crash in
  between is repaired by the redelivery of the input instead of being hidden by it.
* **Duplicates.** A commit or failure of a sync the row remembers as finished (``DiskState.ended``)
  is a duplicate, never a lineage mismatch; a refusal is reserved for a real lineage conflict.
  An input at an offset the row has processed (``redelivered``, from ``DiskState.processed``) is
  a redelivery even when that bounded history forgot it: an old commit is then a duplicate and
  an old snapshot publishes nothing (its outcome was published long ago).
* **No disk waits forever.** A running sync without outcome and progress for the configured time
  is re-issued once (the same plan), then ended as ``SyncFailed(sync_timed_out)`` so the waiting
  snapshot starts (:func:`timeout_step`).
* Every plan of a disk gets a **generation** larger than any earlier plan of that disk
  (:func:`next_generation`); the copier refuses to write a plan older than what its replica holds,
  so an offset reset or a re-produced old plan can never roll a replica back.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from schemas.changeid import ChangeId
from schemas.disk import DiskRef
from schemas.events import (
    DEFAULT_POOL,
    ChangeIdCommitted,
    ChangeIdFence,
    FailureReason,
    FullReason,
    ReplicationType,
    SnapshotTaken,
    SyncFailed,
    SyncPlanned,
    SyncSuperseded,
    lineage_refusal_id,
    stable_event_id,
)
from streams.fence import trusted
from streams.guard import Verdict, check_commit
from streams.state import DiskState, Ended, Outcome, RunningSync, new_state

Output = SyncPlanned | SyncSuperseded | SyncFailed

#: ``SyncFailed.reason`` of a sync the planner ended because nothing came of it.
#: Times a silent sync is re-issued (same plan, same sync id) before it is ended as timed out.
REISSUES = 1

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
    return _decide(committed, committed_change_id, snap.disk, snap.change_id)


def _decide(committed: DiskRef | None, committed_change_id: str | None, disk: DiskRef,
            change_id: str | None) -> Decision:
    def full(reason: FullReason) -> Decision:
        return Decision(ReplicationType.FULL, reason, None)

    if change_id is None:
        return full(FullReason.CBT_NOT_ENABLED)
    if committed is None or committed_change_id is None:
        return full(FullReason.NO_PREVIOUS_COMMIT)
    if committed.backing_uuid and disk.backing_uuid != committed.backing_uuid:
        return full(FullReason.BACKING_UUID_CHANGED)
    if not _same_file(disk.backing_file, committed.backing_file):
        return full(FullReason.BACKING_FILE_CHANGED)
    if disk.capacity_bytes != committed.capacity_bytes:
        return full(FullReason.CAPACITY_CHANGED)
    prev, new = ChangeId.parse(committed_change_id), ChangeId.parse(change_id)
    if not prev.same_epoch(new):
        return full(FullReason.EPOCH_CHANGED)
    if new.sequence <= prev.sequence:
        return full(FullReason.SEQUENCE_NOT_INCREASING)
    return Decision(ReplicationType.INCREMENTAL, FullReason.PREVIOUS_COMMIT, committed_change_id)


@dataclass(frozen=True)
class Step:
    """One planner step: the new row, the events to publish, and the syncs or snapshots the
    step finished (or finishes again, on a redelivery): one lifecycle notice each."""

    state: DiskState | None
    outputs: list[Output] = field(default_factory=list)
    ended: tuple[Ended, ...] = ()
    #: What happened, for logs and metrics: ``applied`` (a new input), ``redelivered`` (an input
    #: the row has seen; outputs republished), ``duplicate`` (an outcome of a finished sync),
    #: ``refused``, ``ignored``, ``reissued``, ``timed_out``, ``idle`` (a timeout check with
    #: nothing to do).
    kind: str = "applied"


def _ended_superseded(snap: SnapshotTaken, by: uuid.UUID, now: datetime) -> Ended:
    return Ended(snapshot_event_id=snap.event_id, vm_snapshot=snap.vm_snapshot,
                 outcome="superseded", superseded_by=by, disk=snap.disk, at=now,
                 release=snap.snapshot_device_keys is not None,
                 snapshot_device_keys=snap.snapshot_device_keys)


def _ended_sync(running: RunningSync, outcome: Outcome, now: datetime,
                failure: SyncFailed | None = None) -> Ended:
    return Ended(snapshot_event_id=running.snapshot_event_id, vm_snapshot=running.vm_snapshot,
                 outcome=outcome, sync_id=running.sync_id, failure=failure, disk=running.disk,
                 at=now, previous_change_id=running.previous_change_id,
                 change_id=running.change_id,
                 release=running.release, snapshot_device_keys=running.snapshot_device_keys)


def superseded_event(e: Ended) -> SyncSuperseded:
    """The ``SyncSuperseded`` of a superseded snapshot (the same event id every time)."""
    assert e.superseded_by is not None
    return SyncSuperseded(
        event_id=stable_event_id("SyncSuperseded", e.snapshot_event_id),
        occurred_at=e.at,
        disk=e.disk,
        snapshot_event_id=e.snapshot_event_id,
        vm_snapshot=e.vm_snapshot,
        superseded_by=e.superseded_by,
    )


def plan_of(state: DiskState) -> SyncPlanned:
    """The ``SyncPlanned`` of the row's running sync, rebuilt from the row: identical (ids,
    generation, time) to the one published when the sync started."""
    r = state.running
    assert r is not None
    reason = r.reason
    if reason is None:  # a row written before RunningSync kept the reason: decide again
        reason = _decide(state.committed_disk, state.change_id, r.disk, r.change_id).reason
    return SyncPlanned(
        event_id=stable_event_id("SyncPlanned", r.sync_id),
        occurred_at=r.planned_at,
        disk=r.disk,
        sync_id=r.sync_id,
        snapshot_event_id=r.snapshot_event_id,
        vm_snapshot=r.vm_snapshot,
        replication_type=r.replication_type,
        reason=reason,
        previous_change_id=r.previous_change_id,
        base_change_id=r.previous_change_id if r.replication_type == ReplicationType.INCREMENTAL
        else None,
        change_id=r.change_id,
        generation=r.generation,
        snapshot_taken_at=r.taken_at,
        pool=r.pool,
        esxi_host=r.esxi_host,
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
    pool = state.pool or DEFAULT_POOL
    if (d.replication_type == ReplicationType.INCREMENTAL and state.commit_pool is not None
            and state.commit_pool != pool):
        # The operator moved the disk (``move_step``): the new pool holds no replica of it.
        d = Decision(ReplicationType.FULL, FullReason.POOL_MOVED, None)
    generation = next_generation(state.plan_generation, snap)
    running = RunningSync(
        sync_id=stable_event_id("sync", snap.event_id),
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
        reason=d.reason,
        pool=pool,
        esxi_host=snap.esxi_host,
    )
    update = {"running": running, "waiting": None, "plan_generation": generation,
              "reissued": 0, "reissued_at": None, "pool": pool}
    state = state.model_copy(update=update)
    plan = plan_of(state)
    assert plan.base_change_id == d.base_change_id
    return state, plan


def _running_plan(state: DiskState | None) -> list[Output]:
    """The running sync's plan, republished after a redelivered input: either that input's step
    started it, or it started earlier and the copy is a duplicate consumers drop."""
    return [plan_of(state)] if state is not None and state.running is not None else []


def snapshot_step(state: DiskState | None, snap: SnapshotTaken, now: datetime,
                  fences: Sequence[ChangeIdFence] = (), redelivered: bool = False,
                  pool: str = DEFAULT_POOL) -> Step:
    """A disk was snapshotted: plan it now, or let it wait for the running sync.

    ``redelivered``: the record's offset is one the row has processed (``DiskState.processed``),
    so a snapshot the bounded history forgot is still a redelivery, unless it is newer than
    every snapshot the row has seen (then the topic's offsets started again: it is new).
    ``pool``: the disk's configured pool (``PoolsSettings.pool_for``), taken by a row that has
    none yet; a row keeps its pool afterwards (only :func:`move_step` changes it)."""
    if state is not None and (snap.event_id in state.seen_snapshots
                              or _synced(state, stable_event_id("sync", snap.event_id))
                              or (redelivered and not _newest(state, snap))):
        return _snapshot_again(state, snap)
    state = (state or new_state(snap.disk)).with_snapshot(snap)
    if state.pool is None:
        state = state.model_copy(update={"pool": pool})
    if state.commit_taken_at is not None and snap.taken_at <= state.commit_taken_at:
        # Older than what the replica already holds: copying it would roll the replica back.
        return _supersede(state, _ended_superseded(snap, snap.event_id, now))
    if state.running is None:
        state, plan = start_sync(state, snap, now, fences)
        return Step(state, [plan])
    if snap.taken_at <= state.running.taken_at:
        return _supersede(state, _ended_superseded(snap, snap.event_id, now))
    waiting = state.waiting
    if waiting is not None and waiting.taken_at >= snap.taken_at:
        return _supersede(state, _ended_superseded(snap, waiting.event_id, now))
    state = state.model_copy(update={"waiting": snap})
    if waiting is None:
        return Step(state)
    return _supersede(state, _ended_superseded(waiting, snap.event_id, now))


def _newest(state: DiskState, snap: SnapshotTaken) -> bool:
    """Whether ``snap`` is newer than every snapshot the row has processed (rows written before
    ``newest_snapshot_at`` existed know none)."""
    return state.newest_snapshot_at is None or snap.taken_at > state.newest_snapshot_at


def _synced(state: DiskState, sync_id: uuid.UUID) -> bool:
    """Whether the row knows the sync as committed or finished (its snapshot was planned)."""
    return state.commit_sync_id == sync_id or state.ended_sync(sync_id) is not None


def _supersede(state: DiskState, e: Ended) -> Step:
    return Step(state.with_ended(e), [superseded_event(e)], (e,))


def _snapshot_again(state: DiskState, snap: SnapshotTaken) -> Step:
    """A redelivered snapshot: republish what its first delivery published."""
    mine = [e for e in state.ended if e.outcome == "superseded"
            and snap.event_id in (e.snapshot_event_id, e.superseded_by)]
    out: list[Output] = [superseded_event(e) for e in mine]
    running = state.running
    if running is not None and running.snapshot_event_id == snap.event_id:
        out.append(plan_of(state))
    return Step(state, out, tuple(mine), "redelivered")


def _finish(state: DiskState, now: datetime, out: list[Output], ended: Ended,
            kind: str = "applied", fences: Sequence[ChangeIdFence] = ()) -> Step:
    """The running sync ended; start the waiting snapshot, if any."""
    state = state.with_ended(ended)
    if state.waiting is None:
        return Step(state, out, (ended,), kind)
    state, plan = start_sync(state, state.waiting, now, fences)
    return Step(state, [*out, plan], (ended,), kind)


def lineage_refusal(ev: ChangeIdCommitted, now: datetime, detail: str,
                    source: str = "commit") -> SyncFailed:
    """The ``SyncFailed(lineage_mismatch)`` refusing ``ev`` (an internal or external commit);
    its id is :func:`schemas.events.lineage_refusal_id`, so a redelivery refuses with the same
    event and the audit finds the refused row by it."""
    return SyncFailed(
        event_id=lineage_refusal_id(ev.event_id),
        occurred_at=now,
        disk=ev.disk,
        sync_id=ev.sync_id,
        vm_snapshot=ev.vm_snapshot,
        reason=FailureReason.LINEAGE_MISMATCH,
        detail=f"{source} {ev.event_id} refused: {detail}",
    )


def _outcome_again(state: DiskState, e: Ended, failure_id: uuid.UUID | None = None) -> Step:
    """An outcome of a sync the row remembers as finished: a duplicate. Republish what followed
    the first delivery: the planner's own failure for it (if this input caused it), the plan
    of the sync running now, the lifecycle notice."""
    out: list[Output] = []
    if e.failure is not None and e.failure.event_id == failure_id:
        out.append(e.failure)
    return Step(state, [*out, *_running_plan(state)], (e,), "duplicate")


def commit_step(state: DiskState | None, ev: ChangeIdCommitted, now: datetime,
                fences: Sequence[ChangeIdFence] = (), redelivered: bool = False) -> Step:
    """Apply a commit through the guard; refused commits become ``SyncFailed``.

    ``redelivered``: the record's offset is one the row has processed, so a commit of a sync
    that is not running and that the bounded history forgot is a duplicate, not a conflict."""
    running = state.running if state is not None else None
    result = check_commit(state, ev)
    if state is not None and (running is None or running.sync_id != ev.sync_id):
        e = state.ended_sync(ev.sync_id)
        failure_id = lineage_refusal_id(ev.event_id)
        caused = e is not None and e.failure is not None and e.failure.event_id == failure_id
        if e is not None and (result.verdict == Verdict.DUPLICATE or caused):
            # a duplicate, or the redelivery of the commit that ended this sync refused
            return _outcome_again(state, e, failure_id)
        if e is None and redelivered:
            return Step(state, _running_plan(state), (), "duplicate")
    if result.verdict == Verdict.DUPLICATE:
        return Step(state, _running_plan(state), (), "duplicate")
    if result.verdict == Verdict.REFUSE:
        failed = lineage_refusal(ev, now, result.detail)
        if state is not None and running is not None and running.sync_id == ev.sync_id:
            # The running sync produced a commit we cannot apply: that sync is over.
            released = state.model_copy(update={"running": None,
                                                 "last_failure": FailureReason.LINEAGE_MISMATCH})
            return _finish(released, now, [failed], _ended_sync(running, "failed", now, failed),
                           "refused", fences)
        return Step(state, [failed], (), "refused")
    assert state is not None and running is not None  # guaranteed by ACCEPT
    applied = state.model_copy(
        update={
            "disk": ev.disk,
            "change_id": ev.change_id,
            "committed_at": ev.occurred_at,
            "commit_sync_id": ev.sync_id,
            "commit_event_id": ev.event_id,
            "commit_taken_at": running.taken_at,
            "replica_digest": ev.replica_digest,
            "replication_type": ev.replication_type,
            "commits": state.commits + 1,
            "running": None,
            "last_failure": None,
            "commit_pool": running.pool,
        }
    )
    return _finish(applied, now, [], _ended_sync(running, "committed", now), fences=fences)


def failed_step(state: DiskState | None, ev: SyncFailed, now: datetime,
                fences: Sequence[ChangeIdFence] = ()) -> Step:
    """A sync failed: release the disk if it was the running one, then start what waits."""
    if state is None or ev.sync_id is None:
        return Step(state, [], (), "ignored")
    running = state.running
    if running is not None and running.sync_id == ev.sync_id:
        released = state.model_copy(update={"running": None, "last_failure": ev.reason})
        return _finish(released, now, [], _ended_sync(running, "failed", now), fences=fences)
    e = state.ended_sync(ev.sync_id)
    if e is None:
        return Step(state, [], (), "ignored")
    if e.failure is not None and e.failure.event_id == ev.event_id:
        # The planner's own failure coming back: its step already published what followed.
        return Step(state, [], (), "ignored")
    return _outcome_again(state, e)


def timeout_step(state: DiskState | None, sync_id: uuid.UUID, now: datetime,
                 timeout: timedelta, last_progress: datetime | None = None,
                 fences: Sequence[ChangeIdFence] = ()) -> Step:
    """A timeout check of the running sync ``sync_id`` at ``now`` (the time the check was
    decided, carried in its record, so a redelivered check decides the same).

    Silent means no outcome and no progress (``last_progress``, the latest ``SyncProgress`` the
    worker saw) for ``timeout`` since the plan or the last re-issue. A silent sync is re-issued
    ``REISSUES`` times (its plan again, same ids: a copier that never received it runs it, one
    that already published its outcome skips it), then ended as ``SyncFailed(sync_timed_out)``
    and the waiting snapshot starts. A redelivered check of a sync it ended republishes the
    failure and what followed.
    """
    if state is None:
        return Step(state, [], (), "idle")
    running = state.running
    if running is None or running.sync_id != sync_id:
        e = state.ended_sync(sync_id)
        if e is not None and e.failure is not None and (
                e.failure.reason == FailureReason.SYNC_TIMED_OUT):
            return Step(state, [e.failure, *_running_plan(state)], (e,), "redelivered")
        return Step(state, [], (), "idle")
    since = max(t for t in (running.planned_at, state.reissued_at, last_progress)
                if t is not None)
    if now - since < timeout:
        return Step(state, [], (), "idle")
    if state.reissued < REISSUES:
        state = state.model_copy(update={"reissued": state.reissued + 1, "reissued_at": now})
        return Step(state, [plan_of(state)], (), "reissued")
    failed = SyncFailed(
        event_id=stable_event_id("SyncFailed", FailureReason.SYNC_TIMED_OUT, running.sync_id),
        occurred_at=now,
        disk=running.disk,
        sync_id=running.sync_id,
        vm_snapshot=running.vm_snapshot,
        reason=FailureReason.SYNC_TIMED_OUT,
        detail=f"no outcome and no progress for {(now - since).total_seconds():.0f}s "
               f"(re-issued {state.reissued} times)",
        retriable=True,
    )
    released = state.model_copy(update={"running": None,
                                        "last_failure": FailureReason.SYNC_TIMED_OUT})
    ended = _ended_sync(running, "failed", now, failed)
    return _finish(released, now, [failed], ended, "timed_out", fences)


def move_step(state: DiskState | None, pool: str) -> Step:
    """The operator moves the disk to copier pool ``pool`` (``cbtstream pools move``): its next
    plan goes to that pool, in full (``pool_moved``) since that pool holds no replica of it. A
    sync running now finishes in the old pool. Moving to the pool it is in changes nothing."""
    if state is None or state.pool == pool:
        return Step(state, [], (), "idle")
    return Step(state.model_copy(update={"pool": pool}), [], (), "pool_moved")


def on_snapshot(
    state: DiskState | None, snap: SnapshotTaken, now: datetime,
    fences: Sequence[ChangeIdFence] = (),
) -> tuple[DiskState, list[Output]]:
    """:func:`snapshot_step` as (row, outputs), for the replay tools."""
    step = snapshot_step(state, snap, now, fences)
    assert step.state is not None
    return step.state, step.outputs


def on_commit(
    state: DiskState | None, ev: ChangeIdCommitted, now: datetime,
    fences: Sequence[ChangeIdFence] = (),
) -> tuple[DiskState | None, list[Output]]:
    """:func:`commit_step` as (row, outputs)."""
    step = commit_step(state, ev, now, fences)
    return step.state, step.outputs


def on_failed(
    state: DiskState | None, ev: SyncFailed, now: datetime,
    fences: Sequence[ChangeIdFence] = (),
) -> tuple[DiskState | None, list[Output]]:
    """:func:`failed_step` as (row, outputs)."""
    step = failed_step(state, ev, now, fences)
    return step.state, step.outputs
