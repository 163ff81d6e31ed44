"""The VM description and power operations against the simulator: disks on four kinds of
controller, NICs on a standard network and a distributed portgroup, power off/on, guest shutdown
(obeyed, delayed, ignored: time-out) and its refusal without VMware Tools; ``cbtstream vm
describe``."""

from __future__ import annotations

import json
import time

import pytest

from cbtctl.cli import main
from cbtctl.stack.vcsim import VcsimService
from cbtstream.vsphere.adapter import VmRef, VSphereClient
from cbtstream.vsphere.errors import (
    GuestShutdownTimeout,
    InvalidPowerState,
    ToolsNotRunning,
    VSphereInvalidArgument,
)
from cbtstream.vsphere.simctl import SimNic, SimulatorControl
from schemas.vm import VmDescription

MiB = 1 << 20


def _hardware_vm(sim: SimulatorControl, name: str, **kw: object) -> str:
    simvm = sim.create_vm(
        name, [MiB, 2 * MiB, 3 * MiB, 4 * MiB, 5 * MiB],
        disk_controllers=["nvme", "pvscsi", "ide", "sata", "lsilogic"],
        nics=[SimNic("vmxnet3", "VM Network"), SimNic("e1000e", "DC0_DVPG0", "00:50:56:AA:BB:CC")],
        firmware="efi", secure_boot=True, guest_id="ubuntu64Guest", cpus=4, cores_per_socket=2,
        memory_mb=2048, **kw)  # type: ignore[arg-type]
    return simvm.path


@pytest.mark.integration
async def test_describe_a_vm_with_disks_on_four_controllers_and_two_nics(
    sim: SimulatorControl, client: VSphereClient, vm_name: str
) -> None:
    vm = await client.find_vm(path=_hardware_vm(sim, vm_name, tools=True, power_on=True))
    d = await client.describe_vm(vm)
    assert (d.vm_instance_uuid, d.name, d.vm_path) == (vm.instance_uuid, vm_name, vm.path)
    assert d.vcenter == client.vcenter and d.esxi_host == "DC0_H0"
    assert d.bios_uuid and d.bios_uuid != d.vm_instance_uuid
    assert (d.power_state, d.tools_running_status) == ("poweredOn", "guestToolsRunning")
    assert (d.firmware, d.secure_boot) == ("efi", True)
    assert (d.num_cpus, d.cores_per_socket, d.memory_mib) == (4, 2, 2048)
    assert d.guest_id == "ubuntu64Guest" and d.hardware_version.startswith("vmx-")
    # Controller order (ide, scsi by bus, sata, nvme), whatever order the disks were added in.
    assert [(k.controller, k.controller_model, k.bus_number, k.unit_number, k.capacity_bytes)
            for k in d.disks] == [
        ("ide", "ide", 0, 0, 3 * MiB),
        ("scsi", "pvscsi", 0, 0, 2 * MiB),
        ("scsi", "lsilogic", 1, 0, 5 * MiB),
        ("sata", "ahci", 0, 0, 4 * MiB),
        ("nvme", "nvme", 0, 0, MiB),
    ]
    assert all(k.captured and k.thin_provisioned and k.disk_mode == "persistent"
               and k.backing_file.endswith(".vmdk") for k in d.disks)
    simvm = sim.vm(vm.moref)
    assert {k.device_key: k.backing_file for k in d.disks} == {
        s.key: s.file for s in simvm.disks}
    vmx, e1000e = d.nics
    assert (vmx.adapter_type, vmx.network, vmx.address_type) == (
        "vmxnet3", "VM Network", "generated")
    assert vmx.mac_address.count(":") == 5 and vmx.connected and vmx.start_connected
    assert (e1000e.adapter_type, e1000e.network, e1000e.mac_address, e1000e.address_type) == (
        "e1000e", "DC0_DVPG0", "00:50:56:aa:bb:cc", "manual")
    # An independent disk stays in the description, marked as not captured.
    sim.set_disk_mode(vm.moref, d.disks[0].device_key, disk_mode="independent_persistent")
    again = await client.describe_vm(vm)
    assert (again.disks[0].captured, again.disks[0].skip_reason) == (
        False, "independent_persistent")
    # The description survives its JSON form (what an event will carry).
    assert VmDescription.model_validate_json(again.model_dump_json()) == again


@pytest.mark.integration
async def test_describe_the_stock_vm_and_a_bios_vm_without_nics(
    sim: SimulatorControl, client: VSphereClient, vm_name: str
) -> None:
    stock = await client.describe_vm(await client.find_vm(path="/DC0/vm/DC0_H0_VM0"))
    assert stock.firmware == "bios" and not stock.secure_boot
    assert [n.network for n in stock.nics] == ["DC0_DVPG0"]  # a distributed portgroup
    assert [(k.controller, k.controller_model) for k in stock.disks] == [("scsi", "pvscsi")]
    plain = await client.describe_vm(await client.find_vm(
        path=sim.create_vm(vm_name, [MiB]).path))
    assert (plain.power_state, plain.tools_running_status) == ("poweredOff",
                                                               "guestToolsNotRunning")
    assert plain.nics == () and len(plain.disks) == 1 and plain.guest_id == "otherGuest"


async def _vm(sim: SimulatorControl, client: VSphereClient, name: str, *, tools: bool) -> VmRef:
    return await client.find_vm(path=sim.create_vm(name, [MiB], tools=tools,
                                                   power_on=True).path)


@pytest.mark.integration
async def test_power_off_and_on_and_tools_follow(
    sim: SimulatorControl, client: VSphereClient, vm_name: str
) -> None:
    vm = await _vm(sim, client, vm_name, tools=True)
    assert await client.power_state(vm) == "poweredOn"
    await client.power_off(vm)
    assert await client.power_state(vm) == "poweredOff"
    assert (await client.describe_vm(vm)).tools_running_status == "guestToolsNotRunning"
    await client.power_off(vm)  # already off: nothing to do
    await client.power_on(vm)
    await client.power_on(vm)
    d = await client.describe_vm(vm)
    assert (d.power_state, d.tools_running_status) == ("poweredOn", "guestToolsRunning")


@pytest.mark.integration
async def test_guest_shutdown_waits_for_power_off(
    sim: SimulatorControl, client: VSphereClient, vm_name: str
) -> None:
    vm = await _vm(sim, client, vm_name, tools=True)
    await client.shutdown_guest(vm, 10)
    assert await client.power_state(vm) == "poweredOff"
    await client.shutdown_guest(vm, 10)  # already off
    # A guest that takes its time: the call returns once it is off, not before.
    await client.power_on(vm)
    sim.set_guest(vm.moref, tools=True, shutdown_delay_ms=1200)
    t0 = time.monotonic()
    await client.shutdown_guest(vm, 10)
    assert time.monotonic() - t0 >= 1.1
    assert await client.power_state(vm) == "poweredOff"


@pytest.mark.integration
async def test_guest_shutdown_times_out_on_a_guest_that_ignores_it(
    sim: SimulatorControl, client: VSphereClient, vm_name: str
) -> None:
    vm = await _vm(sim, client, vm_name, tools=True)
    sim.set_guest(vm.moref, tools=True, ignore_shutdown=True)
    t0 = time.monotonic()
    with pytest.raises(GuestShutdownTimeout, match="still poweredOn 1s") as info:
        await client.shutdown_guest(vm, 1)
    assert 0.9 <= time.monotonic() - t0 < 5 and info.value.reason == "guest_shutdown_timeout"
    assert await client.power_state(vm) == "poweredOn"  # nothing forced
    with pytest.raises(VSphereInvalidArgument):
        await client.shutdown_guest(vm, 0)


@pytest.mark.integration
async def test_guest_shutdown_is_refused_without_tools_and_when_suspended(
    sim: SimulatorControl, client: VSphereClient, vm_name: str
) -> None:
    vm = await _vm(sim, client, vm_name, tools=False)
    with pytest.raises(ToolsNotRunning, match="guestToolsNotRunning"):
        await client.shutdown_guest(vm, 5)
    assert await client.power_state(vm) == "poweredOn"
    # Tools installed but the VM suspended: no guest to ask.
    sim.set_guest(vm.moref, tools=True)
    # The adapter has no suspend (nothing of ours suspends a VM): its plumbing does it here.
    await client._wait(await client._call(client._vm(vm).SuspendVM_Task), "suspend")
    assert await client.power_state(vm) == "suspended"
    with pytest.raises(InvalidPowerState, match="suspended"):
        await client.shutdown_guest(vm, 5)


@pytest.mark.integration
def test_cli_describe_table_and_json(sim: SimulatorControl, vcsim: VcsimService, vm_name: str,
                                     monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    path = _hardware_vm(sim, vm_name)
    monkeypatch.delenv("CBTSTREAM_CONFIG", raising=False)
    monkeypatch.setenv("CBTSTREAM_VSPHERE__URL", vcsim.sdk_url)
    monkeypatch.setenv("CBTSTREAM_VSPHERE__CAFILE", str(vcsim.cert_file))
    assert main(["vm", "describe", path, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["vm_path"] == path and len(doc["disks"]) == 5 and doc["firmware"] == "efi"
    assert main(["vm", "describe", doc["vm_instance_uuid"]]) == 0
    table = capsys.readouterr().out
    assert "efi (secure boot)" in table and "00:50:56:aa:bb:cc" in table
    assert "scsi/lsilogic  1:0" in table and "DC0_DVPG0" in table
    assert main(["vm", "describe", "/DC0/vm/no-such-vm"]) == 1
    assert "no VM with path" in capsys.readouterr().err
