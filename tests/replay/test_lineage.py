"""The replay's pure logic: lineage, verification, causal order, window mode, as-of."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from cbtctl.replay.lineage import Severity, replay
from cbtctl.replay.records import LogRecord
from schemas.events import (
    ChangeIdCommitted,
    FailureReason,
    SnapshotTaken,
    SyncFailed,
    SyncPlanned,
    stable_event_id,
)
from tests.replay.history import History
from tests.unit.factories import EPOCH_A, EPOCH_B, commit_for, disk

D1, D2 = disk(2000), disk(2001)


def three_cycles() -> tuple[History, list[ChangeIdCommitted]]:
    h = History()
    commits = []
    for n, (e1, e2) in enumerate([(EPOCH_A, EPOCH_A), (EPOCH_A, EPOCH_A), (EPOCH_A, EPOCH_B)]):
        commits.append(h.cycle(D1, f"{e1}/{n + 1}"))
        commits.append(h.cycle(D2, f"{e2}/{n + 11}"))
    return h, commits


def test_clean_history_rebuilds_each_disk_chain() -> None:
    h, _ = three_cycles()
    result = replay(h.records, complete=True)
    assert result.findings == []
    l1, l2 = result.disks[D1.key], result.disks[D2.key]
    assert [lk.commit.change_id for lk in l1.links] == [f"{EPOCH_A}/{i}" for i in (1, 2, 3)]
    assert [(lk.commit.replication_type, lk.commit.reason) for lk in l2.links] == [
        ("full", "no_previous_commit"), ("incremental", "previous_commit"),
        ("full", "epoch_changed")]
    for lk in l1.links:
        assert lk.plan_coord is not None and lk.plan_coord.topic == "cbt.sync.planned"
    assert l1.state is not None and l1.state.running is None


def test_foreign_change_id_is_a_break_with_coordinates() -> None:
    h, _ = three_cycles()
    plan = h.snapshot(D1, f"{EPOCH_A}/4")
    assert plan is not None
    # the classic bug: the commit claims to continue from the other disk's change ID
    bad = commit_for(plan, previous_change_id=f"{EPOCH_B}/13")
    rec = h.append(bad)  # the pipeline never saw it: no SyncFailed
    result = replay(h.records, complete=True)
    [brk] = result.breaks
    assert brk.code == "commit_refused_unrecorded" and brk.coords == (rec.coord,)
    assert brk.disk_key == D1.key and "is not the disk's current" in brk.message
    assert len(result.disks[D1.key].links) == 3


def test_refused_commit_recorded_by_the_pipeline_is_not_a_break() -> None:
    h, _ = three_cycles()
    plan = h.snapshot(D1, f"{EPOCH_A}/4")
    assert plan is not None
    h.commit(commit_for(plan, previous_change_id=f"{EPOCH_B}/13"))  # planner refuses it
    assert any(isinstance(r.event, SyncFailed) and r.event.reason == FailureReason.LINEAGE_MISMATCH
               for r in h.records)
    result = replay(h.records, complete=True)
    assert result.breaks == []
    [ref] = [f for f in result.findings if f.severity == Severity.REFUSED]
    assert ref.code == "commit_refused" and len(ref.coords) == 2
    assert result.disks[D1.key].refused == 1


def test_plan_from_another_disks_change_id_is_a_break() -> None:
    h, _ = three_cycles()
    plan = h.snapshot(D1, f"{EPOCH_A}/4")
    assert plan is not None
    # rewrite the logged plan as a buggy planner would have made it
    idx = next(i for i, r in enumerate(h.records) if r.event is plan)
    forged = plan.model_copy(update={"previous_change_id": f"{EPOCH_A}/13",
                                     "base_change_id": f"{EPOCH_A}/13"})
    h.records[idx] = replace(h.records[idx], event=forged)
    result = replay(h.records, complete=True)
    codes = {f.code for f in result.breaks}
    assert "plan_lineage" in codes and "plan_decision" in codes
    assert all(f.coords == (h.records[idx].coord,) for f in result.breaks)


def test_epoch_change_without_full_sync_is_refused() -> None:
    h, _ = three_cycles()
    plan = h.snapshot(D1, f"{EPOCH_A}/4")
    assert plan is not None
    h.append(commit_for(plan, change_id=f"{EPOCH_B}/1"))
    [brk] = replay(h.records, complete=True).breaks
    assert "not the planned snapshot's" in brk.message


def test_commit_without_plan_is_a_break() -> None:
    h, _ = three_cycles()
    plan = h.snapshot(D1, f"{EPOCH_A}/4")
    assert plan is not None
    h.commit(commit_for(plan))
    # drop the plan from the log: the replayed planner still makes it, the log lacks it
    h.records = [r for r in h.records if not (isinstance(r.event, SyncPlanned)
                                              and r.event.sync_id == plan.sync_id)]
    [brk] = replay(h.records, complete=True).breaks
    assert brk.code == "commit_without_plan"


def test_same_millisecond_and_skewed_clocks_keep_causal_order() -> None:
    h, _ = three_cycles()
    # a copier whose clock is 2 s behind: every commit appears before its own plan
    skewed: list[LogRecord] = []
    for r in h.records:
        if isinstance(r.event, ChangeIdCommitted):
            r = replace(r, timestamp_ms=r.timestamp_ms - 2000)
        skewed.append(r)
    result = replay(skewed, complete=True)
    assert result.findings == []
    assert len(result.disks[D1.key].links) == 3
    # each snapshot and everything it causes (plan, commit, reaction) in one millisecond
    flat, bucket = [], 0
    for r in h.records:
        bucket += isinstance(r.event, SnapshotTaken)
        flat.append(replace(r, timestamp_ms=bucket))
    assert replay(flat, complete=True).findings == []


def test_snapshot_waiting_for_running_sync() -> None:
    h = History()
    p1 = h.snapshot(D1, f"{EPOCH_A}/1")
    assert h.snapshot(D1, f"{EPOCH_A}/2") is None  # waits
    assert p1 is not None
    [p2] = h.commit(commit_for(p1))
    h.commit(commit_for(p2))
    result = replay(h.records, complete=True)
    assert result.findings == []
    assert [lk.commit.change_id for lk in result.disks[D1.key].links] == [
        f"{EPOCH_A}/1", f"{EPOCH_A}/2"]


def test_window_mode_starts_from_a_baseline() -> None:
    h, _ = three_cycles()
    cut = next(i for i, r in enumerate(h.records)
               if isinstance(r.event, ChangeIdCommitted) and r.event.change_id.endswith("/2"))
    result = replay(h.records[cut:], complete=False)
    assert result.breaks == []
    l1 = result.disks[D1.key]
    assert l1.baseline == f"{EPOCH_A}/1"
    assert [lk.commit.change_id for lk in l1.links] == [f"{EPOCH_A}/2", f"{EPOCH_A}/3"]
    assert {f.code for f in result.findings} == {"window_start"}


def test_as_of() -> None:
    h, commits = three_cycles()
    result = replay(h.records, complete=True)
    l1 = result.disks[D1.key]
    assert l1.change_id_at(l1.links[0].time - timedelta(milliseconds=1)) is None
    for lk in l1.links:
        got = l1.change_id_at(lk.time)
        assert got is not None and got.commit.change_id == lk.commit.change_id
    assert commits[0].change_id == l1.links[0].commit.change_id


def test_duplicate_commit_is_info() -> None:
    h, commits = three_cycles()
    h.append(commits[-1])
    result = replay(h.records, complete=True)
    assert [f.code for f in result.findings] == ["duplicate"]
    assert stable_event_id("x") == stable_event_id("x")


def test_rebuilt_rows_record_the_latest_source_offsets_of_each_disk() -> None:
    """``cbtstream table rebuild``'s rows: the replay's state, plus per source partition of the
    worker the offset of the disk's latest record (so a re-read record counts as processed);
    plans and progress are not inputs of the worker and set nothing."""
    from cbtctl.replay.table import rebuilt_rows

    h, _ = three_cycles()
    h.snapshot(D1, f"{EPOCH_A}/4")  # a sync left running
    result = replay(h.records, complete=True)
    rows = rebuilt_rows(result, h.records)
    assert set(rows) == {D1.key, D2.key}
    assert rows[D1.key].change_id == f"{EPOCH_A}/3" and rows[D1.key].running is not None
    assert rows[D2.key].change_id == f"{EPOCH_B}/13" and rows[D2.key].running is None
    for d in (D1, D2):
        expected: dict[str, int] = {}
        for r in h.records:
            if r.disk_key == d.key and r.topic_name in (
                    "cbt.snapshot.taken", "cbt.changeid.committed", "cbt.sync.failed"):
                where = f"{r.coord.topic}#{r.coord.partition}"
                expected[where] = max(expected.get(where, -1), r.coord.offset)
        assert rows[d.key].read == expected and expected
        assert not any("planned" in source for source in rows[d.key].read)
