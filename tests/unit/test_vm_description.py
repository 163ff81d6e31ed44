"""The VM description: the pure mapping from vSphere properties (plain objects here), its
ordering and network rules, the model's checks, the ToolsUnavailable fault, the console table."""

from __future__ import annotations

from types import SimpleNamespace as NS
from typing import Any

import pytest
from pydantic import ValidationError

from cbtctl.commands.vm import _size, render
from cbtstream.vsphere.adapter import _classify, translate, vim
from cbtstream.vsphere.description import (
    DescriptionError,
    DeviceClass,
    VmPlace,
    describe,
)
from cbtstream.vsphere.errors import ToolsNotRunning
from schemas.vm import VmDescription

UUID = "5029C1A2-0B7E-4E8F-9C1D-2E3F4A5B6C7D"
BIOS = "4229c1a2-0b7e-4e8f-9c1d-2e3f4a5b6c7d"
PLACE = VmPlace("/DC/vm/web", "vc.example:443", "esx1")

CTRL = {
    "scsi0": (DeviceClass("controller", "scsi", "pvscsi"), NS(key=1000, busNumber=0)),
    "scsi1": (DeviceClass("controller", "scsi", "lsilogic"), NS(key=1001, busNumber=1)),
    "sata": (DeviceClass("controller", "sata", "ahci"), NS(key=15000, busNumber=0)),
    "nvme": (DeviceClass("controller", "nvme", "nvme"), NS(key=31000, busNumber=0)),
    "ide": (DeviceClass("controller", "ide", "ide"), NS(key=200, busNumber=0)),
}


def _disk(key: int, ctrl: int, unit: int, *, skip: str | None = None, **backing: Any
          ) -> tuple[DeviceClass, Any]:
    b = {"fileName": f"[ds] web/web_{key}.vmdk", "diskMode": "persistent",
         "thinProvisioned": True, **backing}
    return DeviceClass("disk", skip_reason=skip), NS(
        key=key, controllerKey=ctrl, unitNumber=unit, capacityInBytes=None,
        capacityInKB=key, backing=NS(**b))


def _nic(key: int, model: str, backing: Any, mac: str = "00:50:56:AB:CD:EF",
         connected: bool = True) -> tuple[DeviceClass, Any]:
    return DeviceClass("nic", model=model), NS(
        key=key, macAddress=mac, addressType="assigned", backing=backing,
        connectable=NS(connected=connected, startConnected=True))


def _props(**over: Any) -> dict[str, Any]:
    return {"name": "web", "config.uuid": BIOS, "config.instanceUuid": UUID,
            "config.firmware": "efi", "config.bootOptions": NS(efiSecureBootEnabled=True),
            "config.hardware.numCPU": 8, "config.hardware.numCoresPerSocket": 4,
            "config.hardware.memoryMB": 16384, "config.guestId": "rhel9_64Guest",
            "config.guestFullName": "Red Hat Enterprise Linux 9 (64-bit)",
            "config.version": "vmx-19", "runtime.powerState": "poweredOn",
            "guest.toolsRunningStatus": "guestToolsRunning", **over}


def _describe(devices: list[tuple[DeviceClass, Any]], networks: dict[str, str] | None = None,
              **over: Any) -> VmDescription:
    return describe(_props(**over), [*CTRL.values(), *devices], PLACE, networks or {})


def test_disks_in_controller_order_and_facts() -> None:
    d = _describe([
        _disk(31001, 31000, 0), _disk(2001, 1001, 0), _disk(2000, 1000, 1),
        _disk(2002, 1000, 0), _disk(3000, 200, 1), _disk(16000, 15000, 0),
    ])
    assert [(k.controller, k.bus_number, k.unit_number, k.device_key) for k in d.disks] == [
        ("ide", 0, 1, 3000), ("scsi", 0, 0, 2002), ("scsi", 0, 1, 2000), ("scsi", 1, 0, 2001),
        ("sata", 0, 0, 16000), ("nvme", 0, 0, 31001)]
    assert d.disks[3].controller_model == "lsilogic" and d.disks[3].controller_key == 1001
    assert d.disks[0].capacity_bytes == 3000 * 1024  # capacityInKB when capacityInBytes unset
    assert d.vm_instance_uuid == UUID.lower() and d.bios_uuid == BIOS
    assert (d.firmware, d.secure_boot, d.num_cpus, d.cores_per_socket, d.memory_mib) == (
        "efi", True, 8, 4, 16384)
    assert (d.vm_path, d.vcenter, d.esxi_host) == PLACE
    assert d.guest_full_name.startswith("Red Hat") and d.hardware_version == "vmx-19"


def test_skipped_disks_and_rdm_backings() -> None:
    d = _describe([
        _disk(2000, 1000, 0, skip="independent_persistent", diskMode="independent_persistent"),
        _disk(2001, 1000, 1, skip="physical_rdm", thinProvisioned=None, diskMode=None),
    ])
    assert [(k.captured, k.skip_reason, k.thin_provisioned, k.disk_mode) for k in d.disks] == [
        (False, "independent_persistent", True, "independent_persistent"),
        (False, "physical_rdm", None, "")]


def test_a_disk_on_an_unknown_controller_is_refused() -> None:
    with pytest.raises(DescriptionError, match="controller 1234"):
        _describe([_disk(2000, 1234, 0)])


def test_nic_networks_and_order() -> None:
    dvs = NS(port=NS(portgroupKey="dvportgroup-12", switchUuid="50 2a"))
    d = _describe([
        _nic(4002, "e1000e", NS(opaqueNetworkId="nsx-seg-1")),
        _nic(4000, "vmxnet3", NS(deviceName="VM Network"), connected=False),
        _nic(4001, "vmxnet3", dvs),
        _nic(4003, "vmxnet3", NS(port=NS(portgroupKey="dvportgroup-99"))),
    ], networks={"dvportgroup-12": "prod-web", "nsx-seg-1": "seg-web"})
    assert [(n.device_key, n.network) for n in d.nics] == [
        (4000, "VM Network"), (4001, "prod-web"), (4002, "seg-web"),
        (4003, "dvportgroup-99")]  # unresolved: the key itself
    assert d.nics[0].mac_address == "00:50:56:ab:cd:ef" and not d.nics[0].connected
    assert d.nics[0].start_connected and d.nics[0].address_type == "assigned"


def test_defaults_for_unset_properties() -> None:
    d = _describe([], **{"config.firmware": None, "config.bootOptions": None,
                         "guest.toolsRunningStatus": None, "config.guestFullName": None})
    assert (d.firmware, d.secure_boot, d.tools_running_status, d.guest_full_name) == (
        "bios", False, "", "")
    assert d.disks == () and d.nics == ()


@pytest.mark.parametrize(("over", "devices"), [
    ({"runtime.powerState": "unknown"}, []),
    ({"config.firmware": "uefi"}, []),
    ({"config.instanceUuid": "not-a-uuid"}, []),
    ({}, [_nic(4000, "vmxnet3", NS(deviceName="x"), mac="00:50:56")]),
])
def test_invalid_properties_are_a_description_error(
        over: dict[str, Any], devices: list[tuple[DeviceClass, Any]]) -> None:
    with pytest.raises(DescriptionError, match="cannot describe VM web"):
        _describe(devices, **over)


def test_model_is_frozen_versioned_and_refuses_unknown_fields() -> None:
    d = _describe([_disk(2000, 1000, 0)])
    assert d.schema_version == 1
    doc = d.model_dump(mode="json")
    with pytest.raises(ValidationError):
        VmDescription.model_validate({**doc, "surprise": 1})
    with pytest.raises(ValidationError):
        VmDescription.model_validate({**doc, "schema_version": 2})
    with pytest.raises(ValidationError):
        d.name = "other"  # type: ignore[misc]
    assert VmDescription.model_validate_json(d.model_dump_json()) == d


def test_device_classes_from_pyvmomi_types() -> None:
    dev = vim.vm.device
    assert _classify(dev.ParaVirtualSCSIController()) == ("controller", "scsi", "pvscsi", None)
    assert _classify(dev.VirtualLsiLogicSASController()).model == "lsilogic-sas"  # type: ignore[union-attr]
    assert _classify(dev.VirtualAHCIController())[1:3] == ("sata", "ahci")  # type: ignore[index]
    assert _classify(dev.VirtualVmxnet3Vrdma()).model == "vmxnet3vrdma"  # type: ignore[union-attr]
    assert _classify(dev.VirtualE1000e()).model == "e1000e"  # type: ignore[union-attr]
    assert _classify(dev.VirtualKeyboard()) is None
    disk = dev.VirtualDisk(backing=dev.VirtualDisk.FlatVer2BackingInfo(
        diskMode="independent_nonpersistent"))
    assert _classify(disk) == DeviceClass("disk", skip_reason="independent_nonpersistent")


def test_tools_unavailable_fault_is_tools_not_running() -> None:
    err = translate(vim.fault.ToolsUnavailable(msg="no tools"), "guest shutdown of /DC/vm/x")
    assert isinstance(err, ToolsNotRunning) and err.reason == "tools_not_running"
    assert "guest shutdown of /DC/vm/x" in str(err)


def test_console_table() -> None:
    dvs = NS(port=NS(portgroupKey="dvportgroup-12"))
    text = render(_describe([_disk(2000, 1000, 0), _disk(2001, 1001, 2, skip="physical_rdm")],
                            {"dvportgroup-12": "prod-web"}, **{"config.bootOptions": None})
                  .model_copy(update={"nics": _describe([_nic(4000, "vmxnet3", dvs)],
                                                        {"dvportgroup-12": "prod-web"}).nics}))
    assert "firmware:       efi\n" in text
    assert "Red Hat Enterprise Linux 9 (64-bit)" in text
    assert "scsi/lsilogic  1:2" in text and "no (physical_rdm)" in text
    assert "00:50:56:ab:cd:ef  assigned  prod-web" in text
    assert [_size(n) for n in (512, 2048, 10 << 30, 3 << 40)] == [
        "512 B", "2.0 KiB", "10.0 GiB", "3.0 TiB"]
