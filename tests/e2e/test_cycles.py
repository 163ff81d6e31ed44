"""The demo scenario as a test, through real Kafka, Faust, the simulator and nbdkit:
cycle 1 full for every disk, cycle 2 incremental for every disk from its own change ID, cycle 3
incremental except the disk whose CBT was reset, which is full with ``epoch_changed``. Replicas
equal the snapshots after every cycle; every snapshot is removed afterwards."""

from __future__ import annotations

import pytest

from cbtctl.demo.scenario import Scenario, random_name
from cbtctl.demo.workload import MiB, initial_fill, scattered
from schemas.changeid import ChangeId
from schemas.events import ChangeIdCommitted
from schemas.topics import CHANGEID_COMMITTED
from tests.e2e.conftest import Pipeline
from tests.support import read_topic

pytestmark = pytest.mark.integration

SIZES = [64 * MiB, 8 * MiB + 64 * 1024, 4 * MiB]


async def test_three_cycles_per_disk_lineage(scenario: Scenario, pipeline: Pipeline) -> None:
    pipeline.start_copier()
    vm = await scenario.create_vm(random_name("e2e-cycles"), SIZES)
    keys = [d.key for d in vm.disks]
    reset_key = keys[1]
    rng = scenario.rng
    fills = [w for d in vm.disks for w in initial_fill(rng, d.key, d.capacity)]
    c1 = await scenario.cycle(1, fills)
    c2 = await scenario.cycle(2, [w for d in vm.disks for w in scattered(rng, d.key, d.capacity)])
    pipeline.restart_worker()  # the table must come back from its changelog
    c3 = await scenario.cycle(3, [w for d in vm.disks for w in scattered(rng, d.key, d.capacity)],
                              reset=(reset_key,))

    for rows in (c1.rows, c2.rows, c3.rows):
        assert all(r.verified for r in rows), rows
    assert {r.replication_type for r in c1.rows} == {"full"}
    assert {r.reason for r in c1.rows} == {"no_previous_commit"}
    assert {r.replication_type for r in c2.rows} == {"incremental"}
    new1 = {e.disk.disk_id: e.change_id for e in c1.events}
    for r in c2.rows:
        assert r.base_change_id == new1[r.disk_id]  # its own, never another disk's
    # each incremental commit says what it read from the snapshot against its changed bytes
    # (issue 24: the read amplification), as the executor measured it
    committed: list[ChangeIdCommitted] = await read_topic(
        pipeline.settings, CHANGEID_COMMITTED, until=lambda evs: len(evs) >= 2 * len(keys))
    c2_commits = [e for e in committed if e.vm_snapshot == c2.vm_snapshot]
    assert len(c2_commits) == len(keys)
    for e in c2_commits:
        assert e.bytes_changed is not None and e.bytes_changed > 0, e
        assert e.bytes_read is not None and e.bytes_read > 0, e
    new2 = {e.disk.disk_id: e.change_id for e in c2.events}
    for r in c3.rows:
        if r.disk_id == f"disk-{reset_key}":
            assert (r.replication_type, r.reason) == ("full", "epoch_changed")
            assert r.base_change_id is None
            old, new = ChangeId.parse(new2[r.disk_id]), ChangeId.parse(r.new_change_id or "")
            assert not old.same_epoch(new)
        else:
            assert (r.replication_type, r.reason) == ("incremental", "previous_commit")
            assert r.base_change_id == new2[r.disk_id]
    # an incremental cycle copies a fraction of a disk (small disks are mostly within the 1 MiB
    # merge gap of the scattered writes, so look at the large one)
    big = next(r for r in c2.rows if r.capacity == SIZES[0])
    full = next(r for r in c1.rows if r.disk_id == big.disk_id)
    assert big.bytes_copied < big.capacity // 2 < full.bytes_copied + big.capacity
    # the lifecycle removed every snapshot once all its disks were committed
    watcher = scenario.watcher
    assert watcher is not None
    snaps = [c1.vm_snapshot, c2.vm_snapshot, c3.vm_snapshot]
    await watcher.wait_for(lambda: all(watcher.removed(s) == set(keys) for s in snaps), 30,
                           alive=pipeline.check)
