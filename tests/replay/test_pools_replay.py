"""The replay (and so ``cbtstream table rebuild``) gives each disk back the pool of its latest
logged plan: its rules do not know ``[pools]`` or the operator's moves, the log does. A move's
full copy (``pool_moved``) is a decision the replay accepts, not a lineage break."""

from __future__ import annotations

from cbtctl.replay.lineage import Severity, replay
from schemas.events import FullReason, ReplicationType
from streams.planner import move_step
from tests.replay.history import History
from tests.unit.factories import EPOCH_A, disk


def test_the_replayed_row_keeps_the_logged_pool_and_its_moves() -> None:
    h = History(pool="nfs")
    d = disk()
    h.cycle(d, f"{EPOCH_A}/1")
    h.cycle(d, f"{EPOCH_A}/2")
    [lin] = replay(h.records, complete=True).disks.values()
    assert lin.state is not None and lin.state.pool == "nfs"
    assert lin.state.commit_pool == "nfs"

    moved = move_step(h.rows[d.key], "san").state
    h.rows[d.key] = moved
    plan = h.snapshot(d, f"{EPOCH_A}/3")
    assert plan is not None and (plan.pool, plan.replication_type, plan.reason) == (
        "san", ReplicationType.FULL, FullReason.POOL_MOVED)
    result = replay(h.records, complete=True)
    [lin] = result.disks.values()
    assert lin.state is not None and lin.state.pool == "san"
    assert lin.state.running is not None and lin.state.running.pool == "san"
    assert not [f for f in result.findings if f.severity == Severity.BREAK], result.findings
    assert any(f.code == "pool_moved" for f in result.findings)


def test_a_window_that_starts_at_a_plan_takes_its_pool() -> None:
    h = History(pool="nfs")
    d = disk()
    h.cycle(d, f"{EPOCH_A}/1")
    h.snapshot(d, f"{EPOCH_A}/2")
    later = [r for r in h.records if r.coord.topic != "cbt.snapshot.taken"][2:]
    [lin] = replay(later, complete=False).disks.values()
    assert lin.state is not None and lin.state.pool == "nfs"
