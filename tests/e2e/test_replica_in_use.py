"""A replica file another process has open is not written (consumers.copy.targets.lock_replica).

Real QEMU: ``qemu-io`` opens one disk's replica read-write, as a VM booted from it for a test
would, and holds it (QEMU locks the images it opens). The next sync of that disk fails with
``replica_in_use`` and leaves the replica as it was, byte for byte; the VM's other disk syncs.
Once QEMU has closed it, the next sync writes it and it equals the model again. While the
copier writes a replica, QEMU cannot open it (checked at the file level in
tests/unit/test_replica_lock.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

from cbtctl.demo.scenario import Scenario, files_equal, random_name
from cbtctl.demo.workload import MiB, initial_fill, scattered
from consumers.copy.targets import ReplicaInUse, lock_replica
from schemas.events import ChangeIdCommitted, SyncFailed
from tests.e2e.conftest import Pipeline

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(shutil.which("qemu-io") is None, reason="needs qemu-io")]


def _hold(path: str) -> subprocess.Popen[bytes]:
    """``qemu-io`` with the image open read-write for up to 5 minutes (``sleep`` is in ms;
    the test kills it sooner)."""
    proc = subprocess.Popen(["qemu-io", "-f", "raw", "-c", "sleep 300000", path],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # QEMU holds its locks once the image is open
        fd = os.open(path, os.O_RDWR)
        try:
            lock_replica(fd, path)
        except ReplicaInUse:
            return proc
        finally:
            os.close(fd)
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("qemu-io did not lock the image")


async def test_a_replica_open_in_qemu_is_not_written(
        scenario: Scenario, pipeline: Pipeline) -> None:
    await scenario.create_vm(random_name("e2e-inuse"), [4 * MiB, 2 * MiB])
    assert scenario.vm is not None and scenario.watcher is not None
    held_key, other_key = (d.key for d in scenario.vm.disks)
    await scenario.write([w for d in scenario.vm.disks
                          for w in initial_fill(scenario.rng, d.key, d.capacity, 0.5)])
    pipeline.start_copier()
    first = await scenario.snapshot()
    await scenario.wait(first[0].vm_snapshot, [held_key, other_key])
    for k in (held_key, other_key):
        assert files_equal(scenario.replica(k), scenario.model(k))
    before = scenario.replica(held_key).read_bytes()

    qemu = _hold(str(scenario.replica(held_key)))
    try:
        await scenario.write([w for d in scenario.vm.disks
                              for w in scattered(scenario.rng, d.key, d.capacity)])
        second = await scenario.snapshot()
        await scenario.wait(second[0].vm_snapshot, [held_key, other_key])
        outcomes = scenario.watcher.outcomes(second[0].vm_snapshot)
        refused = outcomes[held_key]
        assert isinstance(refused, SyncFailed) and refused.reason == "replica_in_use", refused
        assert "locked by another process" in refused.detail
        assert isinstance(outcomes[other_key], ChangeIdCommitted)
        assert scenario.replica(held_key).read_bytes() == before  # not a byte written
        assert files_equal(scenario.replica(other_key), scenario.model(other_key))
    finally:
        qemu.kill()
        qemu.wait()

    third = await scenario.snapshot()
    await scenario.wait(third[0].vm_snapshot, [held_key, other_key])
    outcomes = scenario.watcher.outcomes(third[0].vm_snapshot)
    assert all(isinstance(o, ChangeIdCommitted) for o in outcomes.values()), outcomes
    for k in (held_key, other_key):
        assert files_equal(scenario.replica(k), scenario.model(k))
