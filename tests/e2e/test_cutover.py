"""Cutover of a 3-disk VM on the real stack (``cbtstream cutover``).

1. A powered-on VM with VMware Tools, three disks on three kinds of controller and two NICs;
   a first (full) sync, then the guest writes more.
2. ``cutover VM`` without saying how to stop it: refused, the VM still runs, nothing held.
3. ``cutover VM --shutdown``: the guest shuts down through the tools, the final snapshot is
   taken and synced (incremental), each replica is proven equal to the snapshot's export, the
   VM is held ``cut_over`` and ``CutoverCompleted`` names each replica and digest (in the
   description's controller order) with the VM's description. Each replica equals the guest's
   final bytes; the final snapshot is removed.
4. A later snapshot of the VM is refused (``vm_cut_over``, no plan); the replicas are unchanged.
5. ``failover --undo`` is refused for a cut-over VM without ``--force``.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
from aiokafka import AIOKafkaConsumer

from cbtctl.demo.processes import child_env
from cbtctl.demo.scenario import Scenario, files_equal, random_name
from cbtctl.demo.workload import MiB, initial_fill, scattered
from cbtstream.config import Settings
from cbtstream.kafka import client_kwargs, topic_name, topic_partitions
from cbtstream.vsphere.simctl import SimNic
from schemas.events import (
    ChangeIdCommitted,
    CutoverCompleted,
    FailureReason,
    ReplicationType,
    SyncFailed,
)
from schemas.topics import CUTOVERS
from tests.e2e.conftest import Pipeline

pytestmark = pytest.mark.integration


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cbtctl.cli", *args], env=child_env(settings),
                          capture_output=True, text=True, timeout=300)


async def cutovers_of(settings: Settings, vm: str) -> list[CutoverCompleted]:
    """Every ``CutoverCompleted`` of ``vm`` on the topic, as a kcat user would read it."""
    consumer = AIOKafkaConsumer(**client_kwargs(settings.kafka), group_id=None,
                                enable_auto_commit=False, auto_offset_reset="earliest")
    await consumer.start()
    try:
        tps = await topic_partitions(consumer, topic_name(CUTOVERS, settings.kafka))
        consumer.assign(tps)
        end = await consumer.end_offsets(tps)
        out = []
        async def behind() -> bool:
            return any([await consumer.position(tp) < end[tp] for tp in tps])

        while await behind():
            for records in (await consumer.getmany(timeout_ms=1000)).values():
                for r in records:
                    ev = CutoverCompleted.model_validate_json(r.value)
                    if str(ev.vm_instance_uuid) == vm:
                        out.append(ev)
        return out
    finally:
        await consumer.stop()


async def test_cutover_of_a_three_disk_vm(scenario: Scenario, pipeline: Pipeline) -> None:
    settings = pipeline.settings
    await scenario.create_vm(
        random_name("e2e-cutover"), [4 * MiB, 2 * MiB, 3 * MiB], power_on=True, tools=True,
        disk_controllers=["nvme", "pvscsi", "sata"],
        nics=[SimNic("vmxnet3", "VM Network"), SimNic("e1000e", "DC0_DVPG0", "00:50:56:AA:BB:01")],
        firmware="efi", guest_id="ubuntu64Guest", cpus=2, memory_mb=1024)
    assert scenario.vm is not None and scenario.watcher is not None and scenario.vmref
    w, vm, ref = scenario.watcher, scenario.vm.instance_uuid, scenario.vmref
    keys = [d.key for d in scenario.vm.disks]
    await scenario.write([x for d in scenario.vm.disks
                          for x in initial_fill(scenario.rng, d.key, d.capacity, 0.5)])
    pipeline.start_copier()
    first = await scenario.snapshot()
    await scenario.wait(first[0].vm_snapshot, keys)
    await scenario.write([x for d in scenario.vm.disks
                          for x in scattered(scenario.rng, d.key, d.capacity)])

    # 2. a running VM is refused unless the operator says how to stop it
    out = cli(settings, "cutover", vm, "--json")
    assert out.returncode == 1 and "--shutdown" in out.stderr, out.stdout + out.stderr
    assert await scenario.client.power_state(ref) == "poweredOn"
    assert await cutovers_of(settings, vm) == []

    # 3. the cutover
    out = cli(settings, "cutover", vm, "--shutdown", "--reason", "migration wave 1", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    print(out.stderr)  # the timeline
    [done] = [CutoverCompleted.model_validate_json(line) for line in out.stdout.splitlines()
              if line.startswith("{")]
    assert await scenario.client.power_state(ref) == "poweredOff"
    assert done.stopped_by == "shutdown" and done.reason == "migration wave 1"
    assert done.description is not None and done.description.firmware == "efi"
    assert [(n.network, n.mac_address) for n in done.description.nics][1] == (
        "DC0_DVPG0", "00:50:56:aa:bb:01")
    order = [d.device_key for d in done.description.disks]
    assert [d.disk.device_key for d in done.disks] == order and sorted(order) == sorted(keys)
    assert list(done.timeline) == ["found", "stopped", "snapshot", "synced", "verified", "held"]
    await w.wait_for(lambda: set(keys) <= set(w.outcomes(done.vm_snapshot)), 30)
    final = w.outcomes(done.vm_snapshot)
    for d in done.disks:
        commit = final[d.disk.device_key]
        assert isinstance(commit, ChangeIdCommitted), commit
        assert commit.replication_type == ReplicationType.INCREMENTAL
        assert (d.sync_id, d.change_id) == (commit.sync_id, commit.change_id)
        assert d.replica_digest == d.source_digest == commit.replica_digest
        assert d.replica_location == str(scenario.replica(d.disk.device_key))
        assert files_equal(scenario.replica(d.disk.device_key), scenario.model(d.disk.device_key))
    assert await cutovers_of(settings, vm) == [done]  # what --json printed was published
    snaps = {s.vm.instance_uuid: s for s in await scenario.client.list_snapshots()}
    assert done.vm_snapshot not in {s.moref for s in snaps[vm].snapshots}

    # 4. a later snapshot is refused, the replicas stay as cut over
    before = {k: scenario.replica(k).read_bytes() for k in keys}
    later = await scenario.snapshot()
    await scenario.wait(later[0].vm_snapshot, keys)
    refused = w.outcomes(later[0].vm_snapshot)
    assert all(isinstance(o, SyncFailed) and o.reason == FailureReason.VM_CUT_OVER
               for o in refused.values()), refused
    assert w.plans(later[0].vm_snapshot) == {}
    await asyncio.sleep(1)
    assert {k: scenario.replica(k).read_bytes() for k in keys} == before

    # 5. failing back a cut-over VM needs --force
    out = cli(settings, "failover", vm, "--undo", "--json")
    assert out.returncode == 1 and "cut over" in out.stderr, out.stdout + out.stderr
