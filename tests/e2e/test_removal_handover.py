"""A snapshot removal a worker could not finish is done by the next worker as soon as it holds
the row, not a sweep interval (60 s by default) later: vCenter refuses every attempt of the
first worker, which is then restarted, as in a rolling deploy. Until the snapshot is removed
the scheduler skips the VM as still being copied, so an interval here is an RPO slot lost. The
replicas are checked against their models."""

from __future__ import annotations

import asyncio
import time

import pytest

from cbtctl.demo.scenario import Scenario, files_equal
from cbtstream.vsphere.errors import VSphereNotFound
from cbtstream.vsphere.simctl import SimulatorControl
from streams.removals import ATTEMPTS
from tests.e2e.conftest import Pipeline, vm_with_data

pytestmark = pytest.mark.integration


async def test_a_removal_left_by_a_stopped_worker_is_done_by_the_next_one_at_once(
        scenario: Scenario, pipeline: Pipeline, sim: SimulatorControl) -> None:
    assert pipeline.settings.streams.remove_sweep_interval_s >= 60  # the default
    keys = await vm_with_data(scenario, pipeline, "e2e-rmhand")
    assert scenario.vmref is not None and scenario.watcher
    sim.inject_fault("RemoveSnapshot_Task", "timeout", count=ATTEMPTS)  # every attempt
    try:
        taken = await scenario.snapshot()
        snap = taken[0].vm_snapshot
        await scenario.wait(snap, keys)
        w = scenario.watcher
        deadline = time.monotonic() + 60
        worker_log = pipeline.logs / "worker.log"
        while worker_log.read_text().count("snapshot removal failed") < ATTEMPTS:
            assert time.monotonic() < deadline, "the worker did not try the removal"
            pipeline.check()
            await asyncio.sleep(0.5)
        assert w.removed(snap) == set()
        pipeline.restart_worker()
        t0 = time.monotonic()
        await w.wait_for(lambda: w.removed(snap) == set(keys), 20, alive=pipeline.check)
        handed_over_s = time.monotonic() - t0
    finally:
        sim.clear_faults()
    assert handed_over_s < 20
    with pytest.raises(VSphereNotFound):
        await scenario.client.snapshot_info(scenario.vmref, snap)
    log = "\n".join(p.read_text() for p in pipeline.logs.glob("worker-*.log"))
    assert "snapshot removals retried" in log  # the new worker's sweep did it
    for k in keys:
        assert files_equal(scenario.replica(k), scenario.model(k))
