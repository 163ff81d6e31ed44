"""``cbtstream status`` tells queued, running, silent and just planned syncs apart, from what the
copier last reported of each (``SyncProgress.state``)."""

from __future__ import annotations

import io
from datetime import timedelta

from rich.console import Console

from cbtctl.replay.lineage import replay
from cbtctl.replay.render import print_status, status_json
from cbtctl.replay.status import DiskStatus, disk_status
from schemas.events import SyncPlanned, SyncProgress
from tests.replay.history import History
from tests.unit.factories import EPOCH_A, disk

QUIET = timedelta(minutes=3)


def _report(plan: SyncPlanned, **fields: object) -> SyncProgress:
    values: dict[str, object] = {"bytes_done": 0, "bytes_total": 0, "rate_bytes_per_s": 0.0,
                                 **fields}
    return SyncProgress(disk=plan.disk, sync_id=plan.sync_id, **values)  # type: ignore[arg-type]


def _status(h: History, after: timedelta = timedelta(0)) -> DiskStatus:
    [lin] = replay(h.records, complete=True).disks.values()
    return disk_status(lin, h.clock + after, QUIET)


def test_a_sync_is_planned_then_queued_then_running_then_silent() -> None:
    h = History()
    plan = h.snapshot(disk(2000), f"{EPOCH_A}/1")
    assert plan is not None
    assert _status(h).state == "planned"
    assert _status(h, QUIET * 2).state == "silent"  # no copier said a word since planning
    h.append(_report(plan, state="queued", queue_position=7))
    s = _status(h)
    assert s.running is not None
    assert (s.state, s.running.queue_position, s.running.bytes_done) == ("queued", 7, None)
    [doc] = [j for j in status_json([s], []) if j["type"] == "status"]
    assert doc["state"] == "queued" and doc["running"]["queue_position"] == 7
    h.append(_report(plan, bytes_done=5, bytes_total=10, rate_bytes_per_s=1.0))
    s = _status(h)
    assert s.running is not None and (s.state, s.running.percent) == ("running", 50.0)
    assert _status(h, QUIET * 2).state == "silent"


def test_status_counts_the_syncs_of_each_state() -> None:
    h = History()
    plans = [h.snapshot(disk(k), f"{EPOCH_A}/1") for k in (2000, 2001, 2002)]
    assert all(plans)
    h.append(_report(plans[0], state="queued", queue_position=1))  # type: ignore[arg-type]
    h.append(_report(plans[1], bytes_done=1, bytes_total=2))  # type: ignore[arg-type]
    result = replay(h.records, complete=True)
    rows = [disk_status(d, h.clock, QUIET) for d in result.disks.values()]
    [counts] = [j for j in status_json(rows, []) if j["type"] == "syncs"]
    assert counts == {"type": "syncs", "queued": 1, "running": 1, "silent": 0, "planned": 1,
                      "waiting_for_pool": 0}


def test_a_sync_of_a_pool_without_copiers_waits_for_it_and_is_never_silent() -> None:
    h = History()
    plan = h.snapshot(disk(), f"{EPOCH_A}/1")
    assert plan is not None and plan.pool == "default"
    [lin] = replay(h.records, complete=True).disks.values()
    s = disk_status(lin, h.clock + QUIET * 5, QUIET, frozenset({"default"}))
    assert s.running is not None and s.state == "waiting_for_pool" and s.pool == "default"
    [doc] = [j for j in status_json([s], []) if j["type"] == "status"]
    assert doc["running"]["state"] == "waiting_for_pool" and doc["pool"] == "default"
    out = io.StringIO()
    print_status(Console(file=out, width=250), [s], [])
    assert "pool 'default' has no live copier" in out.getvalue()
    # once a copier of the pool reports it, its report tells the state
    h.append(_report(plan, state="queued", queue_position=2, wait_reason="a copy slot"))
    [lin] = replay(h.records, complete=True).disks.values()
    s = disk_status(lin, h.clock, QUIET, frozenset({"default"}))
    assert s.running is not None and s.state == "queued"
    assert s.running.wait_reason == "a copy slot"
    # without the pool survey it is silent as before
    [lin] = replay(h.records[:-1], complete=True).disks.values()
    assert disk_status(lin, h.clock + QUIET * 5, QUIET).state == "silent"


def test_the_table_shows_the_queue_position_and_the_silence() -> None:
    h = History()
    a, b = (h.snapshot(disk(k), f"{EPOCH_A}/1") for k in (2000, 2001))
    assert a is not None and b is not None
    h.append(_report(a, state="queued", queue_position=3))
    result = replay(h.records, complete=True)
    rows = [disk_status(d, h.clock + QUIET / 2, QUIET) for d in result.disks.values()]
    rows.append(disk_status(result.disks[b.disk.key], h.clock + QUIET * 2, QUIET))
    out = io.StringIO()
    print_status(Console(file=out, width=250), rows, [])
    text = out.getvalue()
    assert "#3 in queue" in text and "silent" in text and "last heard" in text
    assert "Syncs: 1 queued, 0 running, 1 silent, 1 planned, 0 waiting_for_pool" in text
