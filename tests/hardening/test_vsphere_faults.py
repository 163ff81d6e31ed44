"""vSphere faults during real syncs, injected through the simulator (fault rules on the lane's
own VM, count-limited so they expire by themselves and never touch other tests' VMs).

Each case ends in a commit with the exact reason, or a ``SyncFailed`` with the exact reason and
no commit; whenever a commit happened the replica equals the snapshot (CommitAuditor), and the
cycle after a fault continues the disk's own lineage.
"""

from __future__ import annotations

import asyncio

import pytest

from cbtctl.demo.scenario import files_equal, random_name
from cbtctl.demo.workload import MiB
from producers.snapshot import snapshot_events
from schemas.changeid import ChangeId
from schemas.events import ChangeIdCommitted, SyncFailed
from tests.hardening.conftest import LaneFactory
from tests.hardening.harness import Lane, log_lines

pytestmark = pytest.mark.integration

SIZES = [8 * MiB, 4 * MiB]


async def _start(make_lane: LaneFactory, name: str) -> Lane:
    lane = await make_lane(name, 5, rate=0)
    await lane.start(random_name(f"fault-{name}"), SIZES)
    c1 = await lane.cycle(1)
    assert len(c1.commits) == len(SIZES)
    return lane


def _replicas_equal(lane: Lane) -> bool:
    sc = lane.scenario
    return all(files_equal(sc.replica(k), sc.model(k)) for k in lane.keys)


async def test_transient_fault_is_retried_then_incremental(make_lane: LaneFactory) -> None:
    lane = await _start(make_lane, "transient")
    assert lane.scenario.vm is not None
    await asyncio.to_thread(lane.scenario.sim.inject_fault, "QueryChangedDiskAreas", "timeout",
                            count=2, obj=lane.scenario.vm.name)
    c2 = await lane.cycle(2)
    assert lane.lineage_problems() == [] and lane.auditor.problems == []
    assert {(str(c.replication_type), str(c.reason)) for c in c2.commits.values()} == {
        ("incremental", "previous_commit")}
    assert lane.pipeline.copier is not None
    assert len(log_lines(lane.pipeline.copier, "retrying sync")) == 2
    assert lane.auditor.failures == []


async def test_rejected_base_change_id_falls_back_to_full_with_reason(
        make_lane: LaneFactory) -> None:
    """vSphere refuses a change ID the planner trusted (here: the snapshot event claims the old
    epoch, vSphere's tracking state is a new one, as after a reset that CBT did not report):
    FileFault cannotGetChanges -> full copy of the allocated areas, reason
    ``base_change_id_rejected``; the replica equals the snapshot. An InvalidArgument from
    QueryChangedDiskAreas takes the same path."""
    lane = await _start(make_lane, "rejected")
    sc, vm = lane.scenario, lane.scenario.vm
    assert vm is not None and sc.vmref is not None and sc.watcher is not None
    bad, good = lane.keys
    await sc.write(lane.workload(2))
    await sc.reset_cbt(bad)
    info = await sc.client.create_snapshot(sc.vmref, "forged")
    events = snapshot_events(sc.client.vcenter, info)
    old = ChangeId.parse(lane.cycles[0].commits[bad].change_id)
    forged = []
    for ev in events:
        if ev.disk.device_key == bad:
            assert ev.change_id is not None and not ChangeId.parse(ev.change_id).same_epoch(old)
            ev = ev.model_copy(update={"change_id": str(old).rsplit("/", 1)[0]
                                       + f"/{old.sequence + 7}"})
        forged.append(ev)
    lane.auditor.current = info.moref
    for ev in forged:
        await sc.publisher.publish(ev)
    await sc.wait(info.moref, lane.keys)
    await lane.auditor.drain()
    out = sc.watcher.outcomes(info.moref)
    plans = sc.watcher.plans(info.moref)
    assert plans[bad].replication_type == "incremental"  # the planner trusted it
    assert isinstance(out[bad], ChangeIdCommitted)
    assert (out[bad].replication_type, out[bad].reason) == ("full", "base_change_id_rejected")
    assert isinstance(out[good], ChangeIdCommitted)
    assert (out[good].replication_type, out[good].reason) == ("incremental", "previous_commit")
    assert lane.auditor.problems == [] and lane.auditor.checked == 4
    assert _replicas_equal(lane)

    # InvalidArgument on the first query of the next cycle: one disk falls back the same way
    await asyncio.to_thread(sc.sim.inject_fault, "QueryChangedDiskAreas", "invalid_argument",
                            count=1, obj=vm.name)
    c3 = await lane.cycle(3)
    kinds = sorted((str(c.replication_type), str(c.reason)) for c in c3.commits.values())
    # The reset disk is in a new epoch now: planned full (epoch_changed), its "*" query may be
    # the one that fails (-> whole disk, allocated_areas_failed); else the other disk's
    # incremental query fails (-> full, base_change_id_rejected).
    assert kinds in ([("full", "allocated_areas_failed"), ("incremental", "previous_commit")],
                     [("full", "base_change_id_rejected"), ("full", "epoch_changed")]), kinds
    assert lane.auditor.problems == []
    assert _replicas_equal(lane)


async def test_snapshot_not_found_fails_without_commit(make_lane: LaneFactory) -> None:
    """The snapshot disappears between planning and copying: ``SyncFailed(not_found)`` for every
    disk, nothing committed; the next cycle is incremental from the last real commit."""
    lane = await _start(make_lane, "notfound")
    sc = lane.scenario
    assert sc.watcher is not None and sc.vmref is not None and lane.pipeline.copier is not None
    lane.pipeline.copier.stop()  # plans wait in the topic while the snapshot is removed
    await sc.write(lane.workload(2))
    events = await sc.snapshot()
    snap = events[0].vm_snapshot
    lane.auditor.current = snap
    watcher = sc.watcher
    await watcher.wait_for(lambda: set(watcher.plans(snap)) == set(lane.keys), 60)
    await sc.client.remove_snapshot(sc.vmref, snap)
    lane.pipeline.start_copier()
    await sc.wait(snap, lane.keys)
    await lane.auditor.drain()
    out = watcher.outcomes(snap)
    assert all(isinstance(o, SyncFailed) and o.reason == "not_found" and not o.retriable
               for o in out.values()), out
    assert lane.auditor.commits and all(c.vm_snapshot != snap
                                        for c in lane.auditor.commits.values())
    c3 = await lane.cycle(3)
    prev = lane.cycles[0].commits
    for key, commit in c3.commits.items():
        assert (commit.replication_type, commit.reason) == ("incremental", "previous_commit")
        assert commit.previous_change_id == prev[key].change_id
    assert lane.auditor.problems == [] and _replicas_equal(lane)
