"""Re-emission and duplicates (issue 13, items 1, 2 and 4): pure planner steps, no broker.

The rule under test: a step's outputs are a function of the row and the input, also for an input
the row has already seen, so a crash between the changelog write and the sends is repaired by the
redelivery of the input. The last test drives one disk through random snapshots, commits and
crashes (a crash loses the outputs of the steps since the last offset commit, and their inputs
are redelivered) and checks what the issue's reproducer checks, at the level of the rules.
"""

from __future__ import annotations

import functools
import random
import uuid
from datetime import timedelta

from schemas import ChangeIdCommitted, SnapshotTaken, SyncFailed, SyncPlanned, SyncSuperseded
from schemas.events import FailureReason
from streams import lifecycle
from streams.planner import (
    Output,
    Step,
    commit_step,
    failed_step,
    snapshot_step,
    timeout_step,
)
from streams.state import ENDED_HISTORY, DiskState, Position
from tests.unit.factories import EPOCH_A, EPOCH_B, T0, commit_for, disk, snap

KEYS = (2000,)


@functools.cache
def _snap(n: int, *, keys: tuple[int, ...] | None = KEYS) -> SnapshotTaken:
    """Snapshot ``n`` of the disk (the same event every call: a redelivery is the same record)."""
    return snap(disk(), f"{EPOCH_A}/{n}", minutes=n, snapshot=f"snapshot-{n}").model_copy(
        update={"snapshot_device_keys": keys})


def _plan(out: list[Output]) -> SyncPlanned:
    (plan,) = [o for o in out if isinstance(o, SyncPlanned)]
    return plan


def _state(step: Step) -> DiskState:
    assert step.state is not None
    return step.state


def test_redelivered_running_snapshot_republishes_the_identical_plan() -> None:
    first = snapshot_step(None, _snap(1), T0)
    again = snapshot_step(first.state, _snap(1), T0 + timedelta(hours=1))
    assert again.kind == "redelivered" and again.state == first.state
    assert again.outputs == first.outputs  # same ids, generation, occurred_at: identical
    assert _plan(again.outputs).generation == _plan(first.outputs).generation > 0


def test_redelivered_waiting_snapshot_republishes_what_it_superseded() -> None:
    s = _state(snapshot_step(None, _snap(1), T0))
    s = _state(snapshot_step(s, _snap(2), T0))
    third = snapshot_step(s, _snap(3), T0)
    (sup,) = third.outputs
    assert isinstance(sup, SyncSuperseded) and sup.vm_snapshot == "snapshot-2"
    again = snapshot_step(third.state, _snap(3), T0)
    assert again.outputs == third.outputs
    assert lifecycle.notices(again.ended) == lifecycle.notices(third.ended)
    # and the superseded snapshot itself, redelivered, republishes its SyncSuperseded
    assert snapshot_step(third.state, _snap(2), T0).outputs == [sup]


def test_redelivered_commit_republishes_the_next_plan_and_the_notice() -> None:
    s = _state(snapshot_step(None, _snap(1), T0))
    plan1 = _plan(snapshot_step(None, _snap(1), T0).outputs)
    s = _state(snapshot_step(s, _snap(2), T0))
    commit = commit_for(plan1)
    first = commit_step(s, commit, T0)
    plan2 = _plan(first.outputs)
    assert plan2.vm_snapshot == "snapshot-2" and plan2.base_change_id == f"{EPOCH_A}/1"
    again = commit_step(first.state, commit, T0 + timedelta(minutes=5))
    assert again.kind == "duplicate" and again.state == first.state
    assert again.outputs == [plan2]
    assert lifecycle.notices(again.ended) == lifecycle.notices(first.ended) != []


def test_commit_of_an_older_finished_sync_is_a_duplicate_not_a_lineage_mismatch() -> None:
    """The issue's contradictory audit trail: sync 1 committed, sync 2 committed, then sync 1's
    commit is redelivered. It must be dropped, not refused."""
    s = _state(snapshot_step(None, _snap(1), T0))
    c1 = commit_for(_plan(snapshot_step(None, _snap(1), T0).outputs))
    s = _state(commit_step(s, c1, T0))
    step2 = snapshot_step(s, _snap(2), T0)
    s = _state(commit_step(step2.state, commit_for(_plan(step2.outputs)), T0))
    again = commit_step(s, c1, T0)
    assert again.kind == "duplicate" and again.state == s
    assert not any(isinstance(o, SyncFailed) for o in again.outputs)
    # a failure of a committed sync is a duplicate too
    late = SyncFailed(disk=disk(), sync_id=c1.sync_id, reason="nbd_server_error")
    assert failed_step(s, late, T0).state == s
    assert not any(isinstance(o, SyncFailed) for o in failed_step(s, late, T0).outputs)


def test_real_lineage_conflict_is_still_refused_and_its_refusal_republished() -> None:
    s = _state(snapshot_step(None, _snap(1), T0))
    plan = _plan(snapshot_step(None, _snap(1), T0).outputs)
    bad = commit_for(plan, previous_change_id=f"{EPOCH_B}/7")
    first = commit_step(s, bad, T0)
    (failed,) = first.outputs
    assert isinstance(failed, SyncFailed) and failed.reason == FailureReason.LINEAGE_MISMATCH
    assert first.kind == "refused"
    again = commit_step(first.state, bad, T0 + timedelta(minutes=1))
    assert again.outputs == [failed]  # the very same event, detail included
    # our own failure coming back on cbt.sync.failed changes nothing and sends nothing
    echo = failed_step(first.state, failed, T0)
    assert echo.state == first.state and echo.outputs == [] and echo.ended == ()


def test_silent_sync_is_reissued_then_timed_out_and_the_waiting_snapshot_starts() -> None:
    timeout = timedelta(minutes=10)
    s = _state(snapshot_step(None, _snap(1), T0))
    plan1 = _plan(snapshot_step(None, _snap(1), T0).outputs)
    s = _state(snapshot_step(s, _snap(2), T0))
    sid = plan1.sync_id
    assert timeout_step(s, sid, T0 + timedelta(minutes=9), timeout).kind == "idle"
    # progress seen recently: not silent
    busy = timeout_step(s, sid, T0 + timedelta(minutes=15), timeout,
                        last_progress=T0 + timedelta(minutes=14))
    assert busy.kind == "idle"
    re = timeout_step(s, sid, T0 + timedelta(minutes=11), timeout)
    assert re.kind == "reissued" and re.outputs == [plan1]  # the same plan, same sync id
    s = _state(re)
    assert timeout_step(s, sid, T0 + timedelta(minutes=20), timeout).kind == "idle"
    out = timeout_step(s, sid, T0 + timedelta(minutes=22), timeout)
    assert out.kind == "timed_out"
    failed, plan2 = out.outputs
    assert isinstance(failed, SyncFailed) and failed.reason == FailureReason.SYNC_TIMED_OUT
    assert failed.sync_id == sid
    assert isinstance(plan2, SyncPlanned) and plan2.vm_snapshot == "snapshot-2"
    assert [n.outcome for n in lifecycle.notices(out.ended)] == ["failed"]
    s = _state(out)
    assert s.last_failure == FailureReason.SYNC_TIMED_OUT and s.running is not None
    # the check redelivered after a crash republishes the same outputs
    assert timeout_step(s, sid, T0 + timedelta(minutes=22), timeout).outputs == out.outputs
    # a late commit of the timed-out sync is dropped, never a lineage mismatch
    late = commit_step(s, commit_for(plan1), T0)
    assert late.kind == "duplicate" and late.state == s
    assert not any(isinstance(o, SyncFailed) and o.reason == FailureReason.LINEAGE_MISMATCH
                   for o in late.outputs)


def test_history_is_bounded() -> None:
    s = _state(snapshot_step(None, _snap(1), T0))
    for n in range(2, 40):
        s = _state(snapshot_step(s, _snap(n), T0))
    assert len(s.ended) == ENDED_HISTORY


# -- a whole disk under crashes, at the level of the rules -------------------------------------
Input = SnapshotTaken | ChangeIdCommitted | SyncFailed


def _run(seed: int, snapshots: int = 40) -> None:
    """One disk. Inputs go through a log; a "worker" processes them, writing the row at once and
    publishing outputs into a pending buffer that is flushed at each offset commit. A crash
    drops the pending outputs and rewinds to the last committed offset (the row survives: it is
    in the changelog). A "copier" commits published plans (each distinct plan once, like the
    copier's ledger) and republishes a recent commit now and then (its own at-least-once)."""
    rng = random.Random(seed)
    log: list[Input] = []
    offset = committed = 0
    row: DiskState | None = None
    pending: list[Output] = []
    published: list[Output] = []
    copied: set[uuid.UUID] = set()
    commits: dict[uuid.UUID, ChangeIdCommitted] = {}
    sent = 0
    while sent < snapshots or offset < len(log) or pending:
        r = rng.random()
        if sent < snapshots and r < 0.3:
            sent += 1
            log.append(_snap(sent))
        elif r < 0.4:  # crash: outputs not flushed are lost, inputs redelivered
            pending.clear()
            offset = committed
        elif r < 0.55 or offset >= len(log) or offset - committed >= ENDED_HISTORY:
            # offset commit: flush, then commit. The row remembers ENDED_HISTORY outcomes, so
            # redelivery may reach back that many inputs (Faust commits every few seconds).
            published += pending
            for o in pending:
                if isinstance(o, SyncPlanned) and o.sync_id not in copied:
                    copied.add(o.sync_id)
                    c = commit_for(o)
                    commits[o.sync_id] = c
                    log.append(c)
            pending.clear()
            committed = offset
            if commits and rng.random() < 0.2:  # the copier republishes a recent commit
                log.append(rng.choice(list(commits.values())[-3:]))
        else:
            ev = log[offset]
            offset += 1
            if isinstance(ev, SnapshotTaken):
                step = snapshot_step(row, ev, T0)
            elif isinstance(ev, ChangeIdCommitted):
                step = commit_step(row, ev, T0)
            else:
                step = failed_step(row, ev, T0)
            row = step.state
            pending += step.outputs
    assert row is not None
    failures = [o for o in published if isinstance(o, SyncFailed)]
    assert failures == [], failures[:3]
    plans = {o.sync_id: o for o in published if isinstance(o, SyncPlanned)}
    superseded = {o.snapshot_event_id for o in published if isinstance(o, SyncSuperseded)}
    planned = {p.snapshot_event_id for p in plans.values()}
    # every snapshot got exactly one outcome: planned (and committed) or superseded, not both
    every = {_snap(n).event_id for n in range(1, snapshots + 1)}
    assert planned | superseded == every
    assert planned & superseded == set()
    assert set(plans) <= set(commits)
    # the disk ended at its last snapshot, nothing running
    assert row.change_id == f"{EPOCH_A}/{snapshots}" and row.running is None
    # every plan was published identically each time
    for o in published:
        if isinstance(o, SyncPlanned):
            assert o == plans[o.sync_id]


def test_random_crashes_and_redeliveries_lose_nothing_and_contradict_nothing() -> None:
    for seed in range(200):
        _run(seed)


def test_commit_of_a_finished_sync_with_another_lineage_is_refused() -> None:
    """A forged or corrupted commit reusing a finished sync's id is a real conflict."""
    s = _state(snapshot_step(None, _snap(1), T0))
    plan = _plan(snapshot_step(None, _snap(1), T0).outputs)
    s = _state(commit_step(s, commit_for(plan), T0))
    forged = commit_for(plan, previous_change_id=f"{EPOCH_B}/7", change_id=f"{EPOCH_B}/99")
    step = commit_step(s, forged, T0)
    (failed,) = step.outputs
    assert step.kind == "refused" and step.state == s
    assert isinstance(failed, SyncFailed) and failed.reason == FailureReason.LINEAGE_MISMATCH
    assert commit_step(s, forged, T0).outputs == [failed]


def test_committed_snapshot_forgotten_by_seen_is_still_not_superseded() -> None:
    """A redelivery reaching back past the seen window: the snapshot's sync is known as
    committed, so it is not turned into a SyncSuperseded after its plan committed."""
    s = _state(snapshot_step(None, _snap(1), T0))
    s = _state(commit_step(s, commit_for(_plan(snapshot_step(None, _snap(1), T0).outputs)), T0))
    forgot = s.model_copy(update={"seen_snapshots": ()})
    again = snapshot_step(forgot, _snap(1), T0)
    assert again.kind == "redelivered"
    assert not any(isinstance(o, SyncSuperseded) for o in again.outputs)


def _forget(s: DiskState) -> DiskState:
    """The row after a redelivery window longer than its bounded history."""
    return s.model_copy(update={"seen_snapshots": (), "ended": ()})


def test_a_processed_offset_recognises_a_snapshot_the_history_forgot() -> None:
    """An operator's offset reset far back: the row no longer names snapshot 1, but the record's
    offset is one the row processed, so it is a redelivery (no SyncSuperseded contradicting the
    plan that committed), while a snapshot newer than any seen is planned even at an old offset
    (the topic was recreated and its offsets started again)."""
    at = Position("t.cbt.snapshot.taken", 2, 10)
    s = _state(snapshot_step(None, _snap(1), T0)).with_read(at)
    s = _state(commit_step(s, commit_for(_plan(snapshot_step(None, _snap(1), T0).outputs)), T0))
    second = snapshot_step(s, _snap(2), T0)
    s = _state(second).with_read(at._replace(offset=11))
    s = _state(commit_step(s, commit_for(_plan(second.outputs)), T0))
    forgot = _forget(s)
    assert forgot.processed(at) and not forgot.processed(at._replace(offset=12))
    assert not forgot.processed(at._replace(partition=3)) and not forgot.processed(None)
    # without the offset the forgotten snapshot 1 is older than the commit: superseded by itself
    blind = snapshot_step(forgot, _snap(1), T0)
    assert any(isinstance(o, SyncSuperseded) for o in blind.outputs)
    again = snapshot_step(forgot, _snap(1), T0, redelivered=True)
    assert again.kind == "redelivered" and again.outputs == [] and again.state == forgot
    new = snapshot_step(forgot, _snap(3), T0, redelivered=True)
    assert new.kind == "applied" and isinstance(_plan(new.outputs), SyncPlanned)


def test_a_processed_offset_makes_a_forgotten_commit_a_duplicate() -> None:
    """A redelivered commit of a sync the history forgot is a duplicate, never a
    lineage_mismatch; without the offset it would be refused."""
    first = snapshot_step(None, _snap(1), T0)
    commit = commit_for(_plan(first.outputs))
    s = _state(commit_step(_state(first), commit, T0))
    second = snapshot_step(s, _snap(2), T0)
    s = _state(commit_step(_state(second), commit_for(_plan(second.outputs)), T0))
    running = snapshot_step(s, _snap(3), T0)
    forgot = _forget(_state(running))
    refused = commit_step(forgot, commit, T0)
    assert refused.kind == "refused"
    dup = commit_step(forgot, commit, T0, redelivered=True)
    assert dup.kind == "duplicate" and dup.state == forgot
    assert dup.outputs == running.outputs  # the running sync's plan, republished
    assert not any(isinstance(o, SyncFailed) for o in dup.outputs)


def test_read_positions_only_move_forward() -> None:
    s = DiskState(disk=disk())
    at = Position("t", 0, 5)
    s = s.with_read(at)
    assert s.with_read(at._replace(offset=3)) is s
    assert s.with_read(at._replace(offset=9)).read == {"t#0": 9}
