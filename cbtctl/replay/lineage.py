"""Rebuild and verify each disk's change-ID lineage from the log. Pure: no I/O.

The replay does not re-implement the pipeline's rules: it feeds the log's inputs through the very
functions the Faust worker runs (``streams.planner.on_snapshot``, ``on_commit``, ``on_failed``,
with ``streams.guard.check_commit`` deciding every commit), in the causal order of
:mod:`cbtctl.replay.order`, and compares what they decide with what the log says happened:

* every ``SyncPlanned`` in the log must start from the disk's own latest applied change ID and be
  the decision ``streams.planner.decide`` gives for its snapshot (else ``plan_lineage`` /
  ``plan_decision`` breaks);
* every ``ChangeIdCommitted`` goes through the guard. Accepted commits form the chain (its
  previous change ID is the prior commit's new one; a new epoch only with a full sync; never
  without a plan). A refused commit is a *refused record* when the log also holds the planner's
  ``SyncFailed(lineage_mismatch)`` for it, and a *break* when it does not;
* an applied commit whose plan is not in ``cbt.sync.planned`` is a break (``commit_without_plan``).

When the replay starts in the middle of the log (``--since``, offsets), a disk's state before the
window is unknown: its first plan or commit in the window sets the baseline (reported as info),
and checks start from there.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from cbtctl.replay.order import CausalQueue
from cbtctl.replay.records import Coord, LogRecord
from schemas.disk import DiskRef
from schemas.events import (
    ChangeIdCommitted,
    DiskSkipped,
    FailureReason,
    FullReason,
    ReplicationType,
    SnapshotRemoved,
    SnapshotTaken,
    SyncFailed,
    SyncPlanned,
    SyncProgress,
    SyncSuperseded,
    lineage_refusal_id,
)
from streams.external import EXTERNAL, Ownership, apply_external, check_external, skip_snapshot
from streams.guard import Verdict, check_commit
from streams.holds import HELD, refusal_id, refuse_snapshot
from streams.planner import Output, decide, on_commit, on_failed, on_snapshot
from streams.state import DiskState, RunningSync, new_state

COMMITTED_TOPIC = "cbt.changeid.committed"


class Severity(StrEnum):
    BREAK = "break"  # the chain is not what the rules allow: exit non-zero
    REFUSED = "refused"  # a record the pipeline refused (and recorded so): not a break
    WARNING = "warning"
    INFO = "info"


@dataclass(frozen=True)
class Finding:
    """Something the replay has to tell an auditor, with the records it is about."""

    severity: Severity
    code: str
    disk_key: str | None
    message: str
    coords: tuple[Coord, ...]
    time: datetime | None = None


@dataclass(frozen=True)
class Link:
    """One applied commit: a link of a disk's chain."""

    index: int
    coord: Coord
    time: datetime
    commit: ChangeIdCommitted
    plan_coord: Coord | None


@dataclass
class DiskLineage:
    """Everything the replay learnt about one disk."""

    key: str
    disk: DiskRef
    state: DiskState | None = None
    links: list[Link] = field(default_factory=list)
    baseline: str | None = None
    plans: dict[uuid.UUID, tuple[SyncPlanned, Coord]] = field(default_factory=dict)
    progress: dict[uuid.UUID, tuple[SyncProgress, datetime]] = field(default_factory=dict)
    last_failed: tuple[SyncFailed, Coord, datetime] | None = None
    records: int = 0
    refused: int = 0
    superseded: int = 0
    removed: int = 0
    #: The disk's latest ``DiskSkipped`` (not captured by its VM's snapshots), unless a later
    #: snapshot captured it again.
    skipped: DiskSkipped | None = None

    def change_id_at(self, t: datetime) -> Link | None:
        """The last applied commit whose record time is at or before ``t``."""
        found = None
        for link in self.links:
            if link.time > t:
                break
            found = link
        return found


@dataclass
class ReplayResult:
    disks: dict[str, DiskLineage]
    findings: list[Finding]
    records: int

    @property
    def breaks(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == Severity.BREAK]


def _sync_of(rec: LogRecord) -> uuid.UUID | None:
    ev = rec.event
    if isinstance(ev, SyncPlanned | ChangeIdCommitted | SyncProgress):
        return ev.sync_id
    if isinstance(ev, SyncFailed):
        return ev.sync_id
    return None


def _running_from_plan(plan: SyncPlanned, snap: SnapshotTaken | None, t: datetime
                       ) -> RunningSync:
    return RunningSync(
        sync_id=plan.sync_id, snapshot_event_id=plan.snapshot_event_id,
        vm_snapshot=plan.vm_snapshot, previous_change_id=plan.previous_change_id,
        change_id=plan.change_id, replication_type=plan.replication_type, disk=plan.disk,
        taken_at=snap.taken_at if snap is not None else plan.occurred_at, planned_at=t,
        generation=plan.generation, reason=plan.reason, pool=plan.pool,
        esxi_host=plan.esxi_host,
    )


def _snapshot_for(plan: SyncPlanned, snaps: dict[uuid.UUID, SnapshotTaken]) -> SnapshotTaken:
    """The plan's snapshot; if it is no longer in the log (30-day retention) a stand-in with the
    two fields ``decide`` reads, both of which the plan repeats (disk and change ID)."""
    snap = snaps.get(plan.snapshot_event_id)
    if snap is not None:
        return snap
    return SnapshotTaken(event_id=plan.snapshot_event_id, disk=plan.disk, vcenter="",
                         vm_snapshot=plan.vm_snapshot, change_id=plan.change_id,
                         taken_at=plan.occurred_at)


class _DiskReplay:
    """Feeds one disk's records through the planner's pure functions."""

    def __init__(self, key: str, records: list[LogRecord], complete: bool,
                 ownership: Ownership | None = None) -> None:
        self.ownership = ownership or Ownership()
        first = next(r.event for r in records if r.event is not None)
        assert first is not None
        self.out = DiskLineage(key=key, disk=first.disk, records=len(records))
        self.known = complete
        self.complete = complete
        self.queue = CausalQueue(records)
        self.findings: list[Finding] = []
        self.snaps: dict[uuid.UUID, SnapshotTaken] = {}
        self.failures: dict[uuid.UUID, Coord] = {
            r.event.event_id: r.coord for r in records if isinstance(r.event, SyncFailed)}
        self.logged_plans = {r.event.sync_id for r in records if isinstance(r.event, SyncPlanned)}
        #: The planner's refusals of snapshots of a failed-over VM (streams/holds.py), by id:
        #: the replay does not read the holds, it finds their effect in the log.
        self.hold_refusals: dict[uuid.UUID, SyncFailed] = {
            r.event.event_id: r.event for r in records if isinstance(r.event, SyncFailed)
            and r.event.reason in {reason.value for reason in HELD.values()}}
        #: Plans the replayed planner made itself, to compare with the logged ones.
        self.replayed: dict[uuid.UUID, SyncPlanned] = {}

    @property
    def state(self) -> DiskState | None:
        return self.out.state

    def note(self, severity: Severity, code: str, message: str, *coords: Coord,
             time: datetime | None = None) -> None:
        self.findings.append(Finding(severity, code, self.out.key, message, coords, time))

    # -- causal order ---------------------------------------------------------------------------
    def prerequisites(self, rec: LogRecord) -> list[Callable[[LogRecord], bool]]:
        ev, running = rec.event, self.state.running if self.state is not None else None
        rules: list[Callable[[LogRecord], bool]] = []
        if isinstance(ev, SyncPlanned):
            snap_id = ev.snapshot_event_id
            rules.append(lambda r: isinstance(r.event, SnapshotTaken)
                         and r.event.event_id == snap_id)
            if running is not None and running.sync_id != ev.sync_id:
                ended = running.sync_id  # the sync before it must have ended first
                rules.append(lambda r: isinstance(r.event, ChangeIdCommitted | SyncFailed)
                             and r.event.sync_id == ended)
        sync_id = _sync_of(rec)
        external_commit = isinstance(ev, ChangeIdCommitted) and ev.origin == EXTERNAL
        if (sync_id is not None and not isinstance(ev, SyncPlanned) and not external_commit
                and (running is None or running.sync_id != sync_id)):
            rules.append(lambda r: isinstance(r.event, SyncPlanned) and r.event.sync_id == sync_id)
        if isinstance(ev, SyncFailed) and ev.reason == FailureReason.LINEAGE_MISMATCH:
            fid = ev.event_id
            rules.append(lambda r: isinstance(r.event, ChangeIdCommitted)
                         and lineage_refusal_id(r.event.event_id) == fid)
        return rules

    def run(self) -> DiskLineage:
        while self.queue:
            rec = self.queue.next(self.prerequisites)
            ev = rec.event
            if isinstance(ev, SnapshotTaken):
                self.on_snapshot(rec, ev)
            elif isinstance(ev, SyncPlanned):
                self.on_plan(rec, ev)
            elif isinstance(ev, ChangeIdCommitted):
                self.on_commit(rec, ev)
            elif isinstance(ev, SyncFailed):
                # an old plan refused by the copier is not the disk's current news
                if ev.reason != FailureReason.STALE_PLAN:
                    self.out.last_failed = (ev, rec.coord, rec.time)
                if self.known:
                    self.out.state, outs = on_failed(self.state, ev, rec.time)
                    self.remember(outs)
            elif isinstance(ev, SyncProgress):
                self.out.progress[ev.sync_id] = (ev, rec.time)
            elif isinstance(ev, SyncSuperseded):
                self.out.superseded += 1
            elif isinstance(ev, SnapshotRemoved):
                self.out.removed += 1
            elif isinstance(ev, DiskSkipped):
                self.out.skipped = ev
            if ev is not None:
                self.out.disk = ev.disk
        self.check_plans_logged()
        return self.out

    def remember(self, outputs: list[Output]) -> None:
        for o in outputs:
            if isinstance(o, SyncPlanned):
                self.replayed[o.sync_id] = o

    # -- records --------------------------------------------------------------------------------
    def on_snapshot(self, rec: LogRecord, ev: SnapshotTaken) -> None:
        self.snaps[ev.event_id] = ev
        self.out.skipped = None  # captured again (its disk mode changed back)
        if not self.known:
            return
        row = self.state if self.state is not None else new_state(ev.disk)
        if self.ownership.owned_externally(row):
            self.out.state = skip_snapshot(row, ev, rec.time).state  # left to its copier
            return
        for reason in HELD.values():
            refusal = self.hold_refusals.get(refusal_id(ev, reason))
            if refusal is not None:  # the VM was failed or cut over: the planner refused it
                self.out.state = refuse_snapshot(row, ev, rec.time, refusal.detail,
                                                 reason).state
                return
        self.out.state, outs = on_snapshot(self.state, ev, rec.time)
        self.remember(outs)

    def on_plan(self, rec: LogRecord, plan: SyncPlanned) -> None:
        self.out.plans[plan.sync_id] = (plan, rec.coord)
        snap = _snapshot_for(plan, self.snaps)
        if not self.known:
            self.known = True
            self.out.baseline = plan.previous_change_id
            self.note(Severity.INFO, "window_start",
                      f"state before the window unknown; baseline {plan.previous_change_id!r} "
                      "taken from the first plan", rec.coord, time=rec.time)
            base = new_state(plan.disk) if plan.previous_change_id is None else DiskState(
                disk=plan.disk, change_id=plan.previous_change_id)
            self.out.state = base.model_copy(
                update={"running": _running_from_plan(plan, snap, rec.time), "pool": plan.pool})
            return
        mine = self.replayed.get(plan.sync_id)
        if mine is not None:
            # The replayed planner made this plan itself: it must be the same decision.
            self.compare(rec, plan, mine.previous_change_id, mine.replication_type,
                         mine.reason, mine.base_change_id)
            self.follow_pool(plan)
            return
        state = self.state
        current = state.change_id if state is not None else None
        d = decide(state.committed_disk if state is not None else None, current, snap)
        self.compare(rec, plan, current, d.replication_type, d.reason, d.base_change_id)
        running = state.running if state is not None else None
        if running is not None:
            self.note(Severity.WARNING, "plan_while_running",
                      f"plan {plan.sync_id} while sync {running.sync_id} had no outcome in the "
                      "log; following the log", rec.coord, time=rec.time)
        row = state or new_state(plan.disk)
        waiting = row.waiting
        if waiting is not None and waiting.event_id == plan.snapshot_event_id:
            waiting = None
        self.out.state = row.with_seen(plan.snapshot_event_id).model_copy(update={
            "running": _running_from_plan(plan, snap, rec.time), "waiting": waiting,
            "pool": plan.pool})

    def follow_pool(self, plan: SyncPlanned) -> None:
        """The disk lives in the pool of its latest logged plan: the replayed rules do not know
        ``[pools]`` or the operator's moves, the log does (``cbtstream table rebuild`` must give
        each disk back its pool, or its next plan would go to a pool holding no replica)."""
        state = self.state
        if state is None:
            return
        running = state.running
        update: dict[str, object] = {"pool": plan.pool}
        if running is not None and running.sync_id == plan.sync_id:
            update["running"] = running.model_copy(update={"pool": plan.pool,
                                                           "esxi_host": plan.esxi_host})
        self.out.state = state.model_copy(update=update)

    def compare(self, rec: LogRecord, plan: SyncPlanned, previous: str | None,
                rtype: ReplicationType, reason: FullReason, base: str | None) -> None:
        """A logged plan against the rules' plan: same starting change ID, same decision."""
        if plan.previous_change_id != previous:
            self.note(Severity.BREAK, "plan_lineage",
                      f"plan {plan.sync_id} starts from {plan.previous_change_id!r} but the "
                      f"disk's latest applied change ID is {previous!r}", rec.coord, time=rec.time)
        if plan.reason == FullReason.POOL_MOVED and plan.replication_type == ReplicationType.FULL \
                and plan.base_change_id is None:
            # An operator moved the disk to another copier pool (cbtstream pools move).
            self.note(Severity.INFO, "pool_moved",
                      f"plan {plan.sync_id} is full because the disk moved to pool "
                      f"{plan.pool!r}", rec.coord, time=rec.time)
        elif plan.reason == FullReason.FENCED and plan.replication_type == ReplicationType.FULL \
                and plan.base_change_id is None:
            # An operator fence (cbt.changeid.fences) made it full; a full copy is always safe.
            self.note(Severity.INFO, "fenced",
                      f"plan {plan.sync_id} is full because an operator fence distrusts "
                      f"{plan.previous_change_id!r}", rec.coord, time=rec.time)
        elif (rtype, reason, base) != (plan.replication_type, plan.reason, plan.base_change_id):
            self.note(Severity.BREAK, "plan_decision",
                      f"plan {plan.sync_id} is {plan.replication_type}/{plan.reason} from "
                      f"{plan.base_change_id!r}; the rules give {rtype}/{reason} from {base!r}",
                      rec.coord, time=rec.time)

    def on_commit(self, rec: LogRecord, ev: ChangeIdCommitted) -> None:
        if not self.known:
            self.known = True
            self.out.baseline = ev.previous_change_id
            self.note(Severity.INFO, "window_start",
                      f"state before the window unknown; baseline {ev.previous_change_id!r} "
                      "taken from the first commit", rec.coord, time=rec.time)
            base = new_state(ev.disk) if ev.previous_change_id is None else DiskState(
                disk=ev.disk, change_id=ev.previous_change_id)
            self.out.state = base if ev.origin == EXTERNAL else base.model_copy(update={
                "running": RunningSync(
                sync_id=ev.sync_id, snapshot_event_id=uuid.UUID(int=0),
                vm_snapshot=ev.vm_snapshot, previous_change_id=ev.previous_change_id,
                change_id=ev.change_id, replication_type=ev.replication_type, disk=ev.disk,
                taken_at=ev.occurred_at, planned_at=ev.occurred_at)})
        if ev.origin == EXTERNAL:
            # an external copier's store call: the rules the table applies to it
            verdict = check_external(self.state, ev, self.ownership)
            self.out.state = apply_external(self.state, ev, rec.time, self.ownership).state
        else:
            verdict = check_commit(self.state, ev)
            self.out.state, outs = on_commit(self.state, ev, rec.time)
            self.remember(outs)
        if verdict.verdict == Verdict.ACCEPT:
            plan = self.out.plans.get(ev.sync_id)
            self.out.links.append(Link(len(self.out.links) + 1, rec.coord, rec.time, ev,
                                       plan[1] if plan else None))
            return
        if verdict.verdict == Verdict.DUPLICATE:
            self.note(Severity.INFO, "duplicate", f"commit {ev.event_id} delivered again",
                      rec.coord, time=rec.time)
            return
        self.out.refused += 1
        recorded = self.failures.get(lineage_refusal_id(ev.event_id))
        if recorded is not None:
            self.note(Severity.REFUSED, "commit_refused",
                      f"commit of {ev.change_id!r} refused by the guard ({verdict.detail}); "
                      f"the pipeline recorded SyncFailed(lineage_mismatch) at {recorded}",
                      rec.coord, recorded, time=rec.time)
        else:
            self.note(Severity.BREAK, "commit_refused_unrecorded",
                      f"commit of {ev.change_id!r} breaks the chain ({verdict.detail}) and the "
                      "pipeline recorded no SyncFailed(lineage_mismatch) for it",
                      rec.coord, time=rec.time)

    def check_plans_logged(self) -> None:
        """No commit without a plan: every applied commit's sync must be in cbt.sync.planned.
        In window mode the first commit's plan may lie before the window (one sync at a time:
        every later plan follows an earlier commit, so it is inside)."""
        for link in self.out.links:
            if link.commit.sync_id in self.logged_plans or link.commit.origin == EXTERNAL:
                continue  # external copiers commit without a cbtstream plan
            if not self.complete and link.index == 1:
                continue
            self.note(Severity.BREAK, "commit_without_plan",
                      f"commit {link.commit.event_id} applied for sync {link.commit.sync_id}, "
                      "which has no SyncPlanned in the log", link.coord, time=link.time)


def replay(records: Iterable[LogRecord], *, complete: bool,
           ownership: Ownership | None = None) -> ReplayResult:
    """Replay every disk's records. ``complete``: the records start at the beginning of every
    topic, so a disk's state before its first record is known to be empty. ``ownership``: the
    worker's ``streams.external`` / ``streams.handover`` (who copies which disks)."""
    by_disk: dict[str, list[LogRecord]] = {}
    findings: list[Finding] = []
    total = 0
    for rec in records:
        total += 1
        if rec.event is None:
            severity = Severity.BREAK if rec.topic_name == COMMITTED_TOPIC else Severity.WARNING
            findings.append(Finding(severity, "undecodable",
                                    rec.key, f"record not usable: {rec.error}", (rec.coord,),
                                    rec.time))
            continue
        by_disk.setdefault(rec.event.disk.key, []).append(rec)
    disks: dict[str, DiskLineage] = {}
    for key in sorted(by_disk):
        r = _DiskReplay(key, by_disk[key], complete, ownership)
        disks[key] = r.run()
        findings += r.findings
    return ReplayResult(disks=disks, findings=findings, records=total)
