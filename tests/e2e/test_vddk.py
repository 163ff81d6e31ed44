"""The production export path end to end: the worker and copier processes with
``copier.exports = "vddk"`` (nbdkit running the stand-in vddk plugin per disk and snapshot),
and the simulator's own exports (``"simulator"``) kept working.

* nbdkit killed mid-copy: the copier's NBD connection breaks, the sync is retried with a new
  nbdkit, resumes from its checkpoint and commits exactly the snapshot's content;
* every nbdkit is gone once the syncs are done;
* ``exports = "simulator"`` still replicates byte for byte.
"""

from __future__ import annotations

import asyncio
import os
import signal
import tempfile
from pathlib import Path

import pytest

from cbtctl.demo.scenario import Scenario, files_equal, random_name
from cbtctl.demo.workload import MiB, initial_fill, scattered
from schemas.events import ChangeIdCommitted, SyncFailed
from tests.e2e.conftest import Pipeline

pytestmark = pytest.mark.integration


def nbdkits(run_dir: Path) -> list[int]:
    """The live nbdkits of exports under ``run_dir``."""
    pids = []
    for pidfile in run_dir.glob("*/nbdkit.pid"):
        try:
            pid = int(pidfile.read_text())
            os.kill(pid, 0)
        except (OSError, ValueError):
            continue
        pids.append(pid)
    return pids


async def test_nbdkit_killed_mid_copy_is_retried_then_committed(
    scenario: Scenario, pipeline: Pipeline
) -> None:
    assert pipeline.settings.copier.exports == "vddk"
    # A folder of this test's own (short: unix socket paths), so no other test's exports count.
    run_dir = Path(tempfile.mkdtemp(prefix="vddk-", dir="/tmp"))
    vddk = pipeline.settings.copier.vddk.model_copy(update={"run_dir": run_dir})
    own = pipeline.settings.copier.model_copy(update={
        "vddk": vddk, "nbd_allow": (*pipeline.settings.copier.nbd_allow, f"unix:{run_dir}/")})
    pipeline.settings = pipeline.settings.model_copy(update={"copier": own})
    vm = await scenario.create_vm(random_name("e2e-vddk"), [64 * MiB])
    (key,) = [d.key for d in vm.disks]
    await scenario.write(initial_fill(scenario.rng, key, vm.disks[0].capacity, fraction=0.9))
    throttled = pipeline.settings.copier.model_copy(update={"max_bytes_per_s": 16 * MiB})
    pipeline.settings = pipeline.settings.model_copy(update={"copier": throttled})
    copier = pipeline.start_copier()
    events = await scenario.snapshot()
    snap = events[0].vm_snapshot
    watcher = scenario.watcher
    assert watcher is not None
    checkpoints = pipeline.settings.copier.target_root  # beside the replica's record

    # Wait until the copy is under way (a checkpoint saved), then kill its nbdkit.
    await watcher.wait_for(lambda: any(checkpoints.rglob("disk-*.img.checkpoint.*")) or bool(
        watcher.outcomes(snap)), 60, alive=pipeline.check)
    assert not watcher.outcomes(snap), "sync finished before nbdkit could be killed"
    [victim] = nbdkits(run_dir)
    os.kill(victim, signal.SIGKILL)

    await scenario.wait(snap, [key])
    outcome = watcher.outcomes(snap)[key]
    assert isinstance(outcome, ChangeIdCommitted), outcome
    assert files_equal(scenario.replica(key), scenario.model(key))
    log = copier.output()
    assert '"msg":"retrying sync"' in log
    assert log.count('"msg":"starting nbdkit"') >= 2
    assert not any(isinstance(e, SyncFailed) for e in watcher.events)
    for _ in range(50):  # the retried sync's nbdkit is stopped once it committed
        if not nbdkits(run_dir) and not any(run_dir.iterdir()):
            break
        await asyncio.sleep(0.1)
    assert nbdkits(run_dir) == [] and list(run_dir.iterdir()) == []


async def test_simulator_exports_still_replicate(scenario: Scenario, pipeline: Pipeline) -> None:
    simulator = pipeline.settings.copier.model_copy(update={"exports": "simulator"})
    pipeline.settings = pipeline.settings.model_copy(update={"copier": simulator})
    pipeline.start_copier()
    vm = await scenario.create_vm(random_name("e2e-simexp"), [8 * MiB, 4 * MiB])
    keys = [d.key for d in vm.disks]
    for cycle in (1, 2):
        writes = [w for d in vm.disks for w in (
            initial_fill(scenario.rng, d.key, d.capacity) if cycle == 1
            else scattered(scenario.rng, d.key, d.capacity))]
        await scenario.write(writes)
        events = await scenario.snapshot()
        await scenario.wait(events[0].vm_snapshot, keys)
        for key in keys:
            assert isinstance(scenario.watcher.outcomes(events[0].vm_snapshot)[key],  # type: ignore[union-attr]
                              ChangeIdCommitted)
            assert files_equal(scenario.replica(key), scenario.model(key))
    assert '"msg":"starting nbdkit"' not in pipeline.copier.output()  # type: ignore[union-attr]
