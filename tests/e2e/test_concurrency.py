"""Two hard cases end to end: snapshots of a disk in quick succession (the later one waits, the
one in between is superseded and released), and a copier killed mid-sync (it resumes from its
checkpoint and commits exactly the snapshot's content)."""

from __future__ import annotations

import asyncio
import json

import pytest

from cbtctl.demo.scenario import Scenario, files_equal, random_name
from cbtctl.demo.workload import MiB, initial_fill, scattered
from schemas.events import ChangeIdCommitted, SyncPlanned, SyncSuperseded
from tests.e2e.conftest import Pipeline

pytestmark = pytest.mark.integration


async def test_snapshots_in_quick_succession(scenario: Scenario, pipeline: Pipeline) -> None:
    vm = await scenario.create_vm(random_name("e2e-quick"), [8 * MiB, 4 * MiB])
    keys = [d.key for d in vm.disks]
    rng = scenario.rng
    # Three snapshots are published before any copier runs: the first is planned, the second
    # waits, the third supersedes the second.
    await scenario.write([w for d in vm.disks for w in initial_fill(rng, d.key, d.capacity)])
    s1 = await scenario.snapshot()
    await scenario.write([w for d in vm.disks for w in scattered(rng, d.key, d.capacity)])
    s2 = await scenario.snapshot()
    await scenario.write([w for d in vm.disks for w in scattered(rng, d.key, d.capacity)])
    s3 = await scenario.snapshot()
    first, middle, last = s1[0].vm_snapshot, s2[0].vm_snapshot, s3[0].vm_snapshot
    watcher = scenario.watcher
    assert watcher is not None
    await watcher.wait_for(lambda: set(watcher.outcomes(middle)) == set(keys), 60,
                           alive=pipeline.check)
    assert all(isinstance(o, SyncSuperseded) for o in watcher.outcomes(middle).values())
    assert watcher.plans(middle) == {}  # never planned, never copied

    pipeline.start_copier()
    await scenario.wait(last, keys)
    c1, c3 = watcher.outcomes(first), watcher.outcomes(last)
    for key in keys:
        assert isinstance(c1[key], ChangeIdCommitted) and isinstance(c3[key], ChangeIdCommitted)
        plan: SyncPlanned = watcher.plans(last)[key]
        assert plan.replication_type == "incremental"
        assert plan.base_change_id == c1[key].change_id  # from the first, skipping the middle
        assert files_equal(scenario.replica(key), scenario.model(key))
    # the superseded snapshot is released too
    await watcher.wait_for(lambda: watcher.removed(middle) == set(keys), 30,
                           alive=pipeline.check)


async def test_copier_killed_mid_sync_resumes(scenario: Scenario, pipeline: Pipeline) -> None:
    vm = await scenario.create_vm(random_name("e2e-resume"), [160 * MiB])
    (key,) = [d.key for d in vm.disks]
    await scenario.write(initial_fill(scenario.rng, key, vm.disks[0].capacity, fraction=0.9))
    # A bandwidth limit makes the copy last a few seconds, so the kill lands mid-sync.
    throttled = pipeline.settings.copier.model_copy(update={"max_bytes_per_s": 48 * MiB})
    pipeline.settings = pipeline.settings.model_copy(update={"copier": throttled})
    copier = pipeline.start_copier()
    events = await scenario.snapshot()
    snap = events[0].vm_snapshot
    # the resume checkpoint sits beside the replica's record (disk-N.img.checkpoint.<sync id>)
    checkpoints = scenario.settings.copier.target_root
    watcher = scenario.watcher
    assert watcher is not None

    def checkpointed() -> bool:
        return any(checkpoints.rglob("disk-*.img.checkpoint.*"))

    await watcher.wait_for(lambda: checkpointed() or bool(watcher.outcomes(snap)), 60,
                           alive=pipeline.check)
    assert not watcher.outcomes(snap), "sync finished before it could be interrupted"
    copier.kill()  # SIGKILL mid-sync
    saved = json.loads(next(checkpoints.rglob("disk-*.img.checkpoint.*")).read_text())
    assert saved["durable_until"] > 0
    await asyncio.sleep(0.5)
    assert not watcher.outcomes(snap), "a commit was published by a killed copier"

    restarted = pipeline.start_copier()
    await scenario.wait(snap, [key])
    outcome = watcher.outcomes(snap)[key]
    assert isinstance(outcome, ChangeIdCommitted)
    assert files_equal(scenario.replica(key), scenario.model(key))
    resumed = [json.loads(line) for line in restarted.output().splitlines()
               if '"msg":"copied"' in line]
    assert resumed and resumed[-1]["resumed_from"] >= saved["durable_until"], resumed
    # exactly one commit for the sync, however often it was attempted
    commits = [e for e in watcher.events if isinstance(e, ChangeIdCommitted)]
    assert len({c.event_id for c in commits}) == 1
