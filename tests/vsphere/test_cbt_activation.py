"""CBT activation (issue 12 item 3) against the simulator: the switch takes effect at the next
stun, ``set_cbt``/``cbtstream cbt`` reconfigure and stun, and ``cbtstream snapshot`` refuses a VM
whose CBT is not in effect instead of starting full copies silently."""

from __future__ import annotations

import asyncio
import json
import sys

import pytest

from cbtstream.config import Settings
from cbtstream.kafka import Publisher
from cbtstream.vsphere.adapter import VSphereClient
from cbtstream.vsphere.errors import CbtNotEnabled
from cbtstream.vsphere.simctl import SimulatorControl
from producers.cbt import set_cbt
from producers.naming import created_by_cbtstream
from producers.snapshot import snapshot_and_publish
from schemas.topics import SNAPSHOT_TAKEN
from tests.support import read_topic, settings_env

pytestmark = pytest.mark.integration

MiB = 1 << 20


async def test_reconfigure_alone_waits_for_the_next_stun(
    sim: SimulatorControl, client: VSphereClient, vm_name: str
) -> None:
    simvm = sim.create_vm(vm_name, [MiB, 2 * MiB])
    vm = await client.find_vm(path=simvm.path)
    await client.enable_cbt(vm)
    status = await client.cbt_status(vm)
    assert status.enabled and not status.active and sim.vm(simvm.moref).cbt_pending
    # The snapshot that stuns the VM was frozen before tracking started: no change IDs yet.
    first = await client.create_snapshot(vm, "stun")
    assert [cid for _, cid in first.disks] == [None, None]
    assert (await client.cbt_status(vm)).active
    second = await client.create_snapshot(vm, "tracked")
    assert all(cid is not None and cid.endswith("/1") for _, cid in second.disks)


async def test_set_cbt_enables_and_disables_with_a_stun_snapshot_left_behind_by_nobody(
    sim: SimulatorControl, client: VSphereClient, vm_name: str
) -> None:
    simvm = sim.create_vm(vm_name, [MiB])
    vm = await client.find_vm(path=simvm.path)
    on = await set_cbt(client, vm, True)
    assert on.enabled and on.active and not sim.vm(simvm.moref).cbt_pending
    [listed] = [v for v in await client.list_snapshots() if v.vm.moref == vm.moref]
    assert listed.snapshots == []  # the stun snapshot was removed again
    snap = await client.create_snapshot(vm, "s")
    assert snap.disks[0][1] is not None
    assert await set_cbt(client, vm, True) == on  # idempotent: no second stun needed
    off = await set_cbt(client, vm, False)
    assert not off.enabled and not off.active
    after = await client.create_snapshot(vm, "off")
    assert after.disks[0][1] is None


async def test_snapshot_refuses_cbt_off_vm_and_publishes_nothing(
    sim: SimulatorControl, producer_settings: Settings, vm_name: str
) -> None:
    simvm = sim.create_vm(vm_name, [MiB, MiB])
    async with VSphereClient(producer_settings.vsphere) as client, Publisher(
        producer_settings.kafka
    ) as pub:
        with pytest.raises(CbtNotEnabled, match="CBT is off"):
            await snapshot_and_publish(client, pub, simvm.instance_uuid)
        vm = await client.find_vm(path=simvm.path)
        [listed] = [v for v in await client.list_snapshots() if v.vm.moref == vm.moref]
        assert listed.snapshots == []  # refused before any snapshot was taken
        # Enabled but not in effect (no stun yet) is refused too.
        await client.enable_cbt(vm)
        with pytest.raises(CbtNotEnabled, match="not in effect"):
            await snapshot_and_publish(client, pub, simvm.instance_uuid)
        events = await snapshot_and_publish(client, pub, simvm.instance_uuid, enable_cbt=True)
        [listed] = [v for v in await client.list_snapshots() if v.vm.moref == vm.moref]
    assert [e.change_id is not None and e.change_id.endswith("/1") for e in events] == [True] * 2
    # Only the replication snapshot remains, and it carries cbtstream's marks.
    assert [s.moref for s in listed.snapshots] == [events[0].vm_snapshot]
    assert created_by_cbtstream(listed.snapshots[0].name, listed.snapshots[0].description)
    got = await read_topic(producer_settings, SNAPSHOT_TAKEN, until=lambda ev: len(ev) >= 2)
    assert {e.event_id for e in got} == {e.event_id for e in events}


async def _cli(settings: Settings, *argv: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cbtctl.cli", *argv, env=settings_env(settings),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_cli_cbt_enable_status_and_snapshot_refusal(
    sim: SimulatorControl, producer_settings: Settings, vm_name: str
) -> None:
    simvm = sim.create_vm(vm_name, [MiB])
    rc, out, err = await _cli(producer_settings, "snapshot", simvm.path)
    assert rc == 1 and out == "" and "CBT is off" in err and "--enable-cbt" in err
    rc, out, _ = await _cli(producer_settings, "cbt", "status", simvm.path)
    assert rc == 1 and json.loads(out)["enabled"] is False
    rc, out, _ = await _cli(producer_settings, "cbt", "enable", simvm.path)
    assert rc == 0 and json.loads(out) | {} == {
        "vm": simvm.instance_uuid.lower(), "path": simvm.path, "enabled": True, "active": True}
    rc, out, _ = await _cli(producer_settings, "cbt", "status", simvm.instance_uuid)
    assert rc == 0 and json.loads(out)["active"] is True
    rc, out, err = await _cli(producer_settings, "snapshot", simvm.path)
    assert rc == 0, err
    assert json.loads(out)["change_id"].endswith("/1")
    rc, out, _ = await _cli(producer_settings, "cbt", "disable", simvm.path)
    assert rc == 0 and json.loads(out)["active"] is False
