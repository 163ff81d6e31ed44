"""Lifecycle notices (``streams.lifecycle``): one notice per disk and VM snapshot, only for
snapshots the pipeline removes, carrying ``snapshot_device_keys``. Pure functions, no broker."""

from __future__ import annotations

from schemas import SnapshotTaken, SyncFailed, SyncPlanned
from streams import lifecycle
from streams.planner import commit_step, failed_step, snapshot_step
from streams.state import DiskState
from tests.unit.factories import EPOCH_A, T0, commit_for, disk, snap

KEYS = (2000, 2001)


def _keyed(ev: SnapshotTaken, keys: tuple[int, ...] | None = KEYS) -> SnapshotTaken:
    return ev.model_copy(update={"snapshot_device_keys": keys})


def _plan(out: list[object]) -> SyncPlanned:
    (plan,) = [o for o in out if isinstance(o, SyncPlanned)]
    return plan


def _step_snapshot(state: DiskState | None, ev: SnapshotTaken
                   ) -> tuple[DiskState, list[object], list[lifecycle.Notice]]:
    step = snapshot_step(state, ev, T0)
    assert step.state is not None
    return step.state, list(step.outputs), lifecycle.notices(step.ended)


def _commit(state: DiskState, plan: SyncPlanned) -> list[lifecycle.Notice]:
    return lifecycle.notices(commit_step(state, commit_for(plan), T0).ended)


def _fail(state: DiskState, plan: SyncPlanned) -> list[lifecycle.Notice]:
    return lifecycle.notices(failed_step(state, _failure(plan), T0).ended)


def test_planned_sync_remembers_whether_to_release() -> None:
    s, _, notices = _step_snapshot(None, _keyed(snap(disk(), f"{EPOCH_A}/1")))
    assert s.running is not None and s.running.release
    assert s.running.snapshot_device_keys == KEYS
    assert notices == []  # no "taken" notice: only finishing counts
    s2, _, _ = _step_snapshot(None, snap(disk(), f"{EPOCH_A}/1"))
    assert s2.running is not None and not s2.running.release


def test_commit_of_a_removable_snapshot_sends_one_notice_with_device_keys() -> None:
    s, out, _ = _step_snapshot(None, _keyed(snap(disk(), f"{EPOCH_A}/1")))
    (notice,) = _commit(s, _plan(out))
    assert notice.kind == "finished" and notice.outcome == "committed"
    assert notice.expected == KEYS and notice.vm_snapshot == "snapshot-1"


def test_upstream_snapshot_without_device_keys_sends_nothing() -> None:
    s, out, notices = _step_snapshot(None, snap(disk(), f"{EPOCH_A}/1"))
    assert notices == []
    assert _commit(s, _plan(out)) == []
    assert _fail(s, _plan(out)) == []


def _failure(plan: SyncPlanned) -> SyncFailed:
    return SyncFailed(disk=plan.disk, sync_id=plan.sync_id, vm_snapshot=plan.vm_snapshot,
                      reason="nbd_server_error", detail="x")


def test_failed_sync_notice_says_failed() -> None:
    s, out, _ = _step_snapshot(None, _keyed(snap(disk(), f"{EPOCH_A}/1")))
    (notice,) = _fail(s, _plan(out))
    assert notice.outcome == "failed" and notice.expected == KEYS


def test_superseded_notices_follow_the_superseded_snapshot() -> None:
    d = disk()
    running, _, _ = _step_snapshot(None, _keyed(snap(d, f"{EPOCH_A}/1")))
    # a removable snapshot waits, then a newer upstream one supersedes it: notice for the first
    waiting, _, notices = _step_snapshot(
        running, _keyed(snap(d, f"{EPOCH_A}/2", minutes=5, snapshot="snapshot-2")))
    assert notices == []
    _, _, notices = _step_snapshot(
        waiting, snap(d, f"{EPOCH_A}/3", minutes=9, snapshot="snapshot-3"))
    (notice,) = notices
    assert notice.outcome == "superseded" and notice.vm_snapshot == "snapshot-2"
    assert notice.expected == KEYS
    # the other way round: an upstream snapshot waits and a removable one supersedes it
    waiting, _, _ = _step_snapshot(
        running, snap(d, f"{EPOCH_A}/2", minutes=5, snapshot="snapshot-2"))
    _, _, notices = _step_snapshot(
        waiting, _keyed(snap(d, f"{EPOCH_A}/3", minutes=9, snapshot="snapshot-3")))
    assert notices == []
    # an arriving removable snapshot older than the running one is superseded at once
    _, _, notices = _step_snapshot(
        running, _keyed(snap(d, f"{EPOCH_A}/2", minutes=-5, snapshot="snapshot-0")))
    (notice,) = notices
    assert notice.vm_snapshot == "snapshot-0" and notice.expected == KEYS


def test_snapshot_becomes_releasable_from_finished_notices_alone() -> None:
    row = None
    for key in KEYS:
        s, out, _ = _step_snapshot(None, _keyed(snap(disk(key), f"{EPOCH_A}/1")))
        (notice,) = _commit(s, _plan(out))
        assert row is None or not lifecycle.releasable(row)
        row = lifecycle.apply(row, notice)
    assert row is not None and lifecycle.releasable(row)
    assert sorted(row.disks) == list(KEYS)


def test_rows_from_before_the_release_flag_still_send_notices() -> None:
    """A running sync stored by an earlier version has no ``release`` field: it defaults to
    sending the notice (the snapshot may be one the pipeline must remove)."""
    s, out, _ = _step_snapshot(None, snap(disk(), f"{EPOCH_A}/1"))
    raw = s.model_dump(mode="json")
    assert raw["running"] is not None
    del raw["running"]["release"], raw["running"]["snapshot_device_keys"]
    old = DiskState.model_validate(raw)
    (notice,) = _commit(old, _plan(out))
    assert notice.outcome == "committed" and notice.expected is None
    # an old "taken" notice still tells the row which disks to wait for
    taken = lifecycle.Notice(kind="taken", disk=disk(2001), vm_snapshot="snapshot-1",
                             expected=KEYS)
    row = lifecycle.apply(lifecycle.apply(None, taken), notice)
    assert row.expected == KEYS and not lifecycle.releasable(row)
