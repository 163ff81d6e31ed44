"""Adapter behaviour against the simulator: TLS, lookups, fault mapping, snapshot identity."""

from __future__ import annotations

import pytest

from cbtctl.stack.vcsim import VcsimService
from cbtstream.config import VSphereSettings
from cbtstream.vsphere.adapter import VSphereClient
from cbtstream.vsphere.errors import (
    VSphereAuthError,
    VSphereInvalidArgument,
    VSphereNotFound,
    VSphereTransient,
)
from cbtstream.vsphere.simctl import SimulatorControl
from producers.cbt import set_cbt
from tests.support import free_port


@pytest.mark.integration
async def test_tls_is_verified_by_default(vcsim: VcsimService) -> None:
    # No cafile: the simulator's self-signed certificate is not trusted.
    with pytest.raises(VSphereAuthError, match="certificate"):
        async with VSphereClient(VSphereSettings(url=vcsim.sdk_url)):
            pass
    # The explicit opt-out connects.
    async with VSphereClient(VSphereSettings(url=vcsim.sdk_url, insecure=True)) as c:
        assert c.vcenter == f"127.0.0.1:{vcsim.port}"


async def test_connection_refused_is_transient() -> None:
    settings = VSphereSettings(url=f"https://127.0.0.1:{free_port()}/sdk", insecure=True)
    with pytest.raises(VSphereTransient) as info:
        async with VSphereClient(settings):
            pass
    assert info.value.retriable


@pytest.mark.integration
async def test_bad_login_is_auth_error(vcsim: VcsimService) -> None:
    # vcsim accepts only the configured user (default user:pass).
    settings = VSphereSettings(url=vcsim.sdk_url, cafile=vcsim.cert_file, username="nobody",
                               password="wrong")  # type: ignore[arg-type]
    with pytest.raises(VSphereAuthError):
        async with VSphereClient(settings):
            pass


@pytest.mark.integration
async def test_find_vm_by_uuid_and_path(sim: SimulatorControl, client: VSphereClient,
                                        vm_name: str) -> None:
    simvm = sim.create_vm(vm_name, [1 << 20])
    by_uuid = await client.find_vm(instance_uuid=simvm.instance_uuid)
    by_path = await client.find_vm(path=simvm.path)
    assert by_uuid == by_path
    assert by_uuid.path == f"/DC0/vm/{vm_name}" and by_uuid.name == vm_name
    assert by_uuid.instance_uuid == simvm.instance_uuid.lower()
    with pytest.raises(VSphereNotFound):
        await client.find_vm(path="/DC0/vm/does-not-exist")
    with pytest.raises(VSphereNotFound):
        await client.find_vm(instance_uuid="00000000-0000-4000-8000-000000000000")
    with pytest.raises(VSphereInvalidArgument):
        await client.find_vm()


@pytest.mark.integration
async def test_snapshot_of_cbt_off_vm_has_no_change_ids_and_quiesce_flag(
    sim: SimulatorControl, client: VSphereClient, vm_name: str
) -> None:
    simvm = sim.create_vm(vm_name, [1 << 20, 2 << 20])
    vm = await client.find_vm(path=simvm.path)
    snap = await client.create_snapshot(vm, "q", quiesce=True)
    assert snap.quiesced and snap.name == "q" and snap.created.tzinfo is not None
    assert [cid for _, cid in snap.disks] == [None, None]
    assert [d.backing_uuid for d, _ in snap.disks] == [d.uuid for d in simvm.disks]
    assert [d.backing_file for d, _ in snap.disks] == [d.file for d in simvm.disks]
    await set_cbt(client, vm, True)  # reconfigure + stun: CBT in effect from now on
    snap2 = await client.create_snapshot(vm, "after-enable")
    assert all(cid is not None and cid.endswith("/1") for _, cid in snap2.disks)
    # snapshot_info re-reads the same facts from the snapshot's config.
    assert await client.snapshot_info(vm, snap2.moref) == snap2
    # A snapshot of another VM is refused, not silently read.
    other = await client.find_vm(path=sim.create_vm(vm_name + "-b", [1 << 20]).path)
    with pytest.raises(VSphereInvalidArgument):
        await client.snapshot_info(other, snap2.moref)


@pytest.mark.integration
async def test_injected_fault_is_transient_then_recovers(
    sim: SimulatorControl, client: VSphereClient, vm_name: str
) -> None:
    simvm = sim.create_vm(vm_name, [1 << 20], cbt=True)
    vm = await client.find_vm(path=simvm.path)
    snap = await client.create_snapshot(vm, "s")
    key = simvm.disks[0].key
    sim.inject_fault("QueryChangedDiskAreas", "timeout", count=1, obj=vm_name)
    try:
        with pytest.raises(VSphereTransient):
            async for _ in client.changed_areas(vm, snap.moref, key, "*", 1 << 20):
                pass
        assert [e async for e in client.changed_areas(vm, snap.moref, key, "*", 1 << 20)] == []
    finally:
        sim.clear_faults()
