"""VM snapshot removal on the real stack (streams.removals): vCenter refuses every attempt the
worker makes, and the snapshot is still removed, by the worker's sweep, once vCenter accepts.
The replicas are checked against their models and the VM against the simulator."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from cbtctl.demo.run import stack_settings
from cbtctl.demo.scenario import Scenario, files_equal
from cbtstream.config import Settings
from cbtstream.vsphere.errors import VSphereNotFound
from cbtstream.vsphere.simctl import SimulatorControl
from schemas.events import SnapshotRemoved
from tests.e2e.conftest import Pipeline, vm_with_data

pytestmark = pytest.mark.integration


@pytest.fixture
def e2e_settings(kafka_settings: Settings, tmp_path: Path) -> Settings:
    s = stack_settings(kafka_settings)
    copier = s.copier.model_copy(update={"state_dir": tmp_path / "copier"})
    streams = s.streams.model_copy(update={"remove_sweep_interval_s": 1.0})
    return s.model_copy(update={"copier": copier, "streams": streams})


async def test_a_refused_removal_is_done_by_the_sweep(
        scenario: Scenario, pipeline: Pipeline, sim: SimulatorControl) -> None:
    keys = await vm_with_data(scenario, pipeline, "e2e-rmsweep")
    assert scenario.vmref is not None and scenario.watcher
    # more refusals than the worker's attempts per removal (streams.removals.ATTEMPTS)
    sim.inject_fault("RemoveSnapshot_Task", "timeout", count=4)
    try:
        taken = await scenario.snapshot()
        snap = taken[0].vm_snapshot
        await scenario.wait(snap, keys)
        w = scenario.watcher
        await w.wait_for(lambda: w.removed(snap) == set(keys), 90, alive=pipeline.check)
    finally:
        sim.clear_faults()
    with pytest.raises(VSphereNotFound):
        await scenario.client.snapshot_info(scenario.vmref, snap)
    await asyncio.sleep(3)  # three more sweeps: the dropped row is not removed or told again
    removed = [e for e in w.events if isinstance(e, SnapshotRemoved) and e.vm_snapshot == snap]
    assert sorted(e.disk.device_key for e in removed) == sorted(keys)
    log = "\n".join(p.read_text() for p in pipeline.logs.glob("worker*.log"))
    assert log.count("snapshot removal failed") >= 3  # the worker's attempts were refused
    assert "snapshot removals retried" in log  # ... and the sweep did it
    for k in keys:
        assert files_equal(scenario.replica(k), scenario.model(k))
