"""The description of a VM for its target platform: what a failover or cutover needs to start
the replicated disks as the same machine somewhere else (firmware, CPUs, memory, guest OS, the
disks in controller order, the NICs with their MAC addresses and networks).

It is read from the live VM (:meth:`cbtstream.vsphere.adapter.VSphereClient.describe_vm`) and is
meant to be recorded at every VM snapshot, so the last one before a failover describes the
machine as it was replicated. Frozen and versioned like the events; unknown fields are refused.
"""

from __future__ import annotations

import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from schemas.disk import MAX_TEXT

VM_DESCRIPTION_VERSION: Literal[1] = 1

PowerState = Literal["poweredOn", "poweredOff", "suspended"]
Firmware = Literal["bios", "efi"]
ControllerKind = Literal["scsi", "nvme", "sata", "ide"]

#: Order of controller kinds in :attr:`VmDescription.disks`: ESXi's own device key ranges
#: (IDE 200.., SCSI 1000.., SATA 15000.., NVMe 31000..), so the order is the one vSphere lists.
CONTROLLER_ORDER: dict[str, int] = {"ide": 0, "scsi": 1, "sata": 2, "nvme": 3}

_MAC = r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$"


def _lower_uuid(value: str) -> str:
    try:
        return str(uuid.UUID(value)).lower()
    except ValueError as exc:
        raise ValueError("must be a UUID") from exc


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class VmDisk(_Frozen):
    """One virtual disk and where it sits: controller kind, model, bus and unit."""

    device_key: int = Field(ge=0, le=999_999_999, description="VirtualDisk.key within the VM.")
    controller: ControllerKind = Field(description="Kind of controller the disk sits on.")
    controller_model: str = Field(
        max_length=64,
        description="pvscsi, lsilogic, lsilogic-sas, buslogic (SCSI); ahci (SATA); nvme; ide.")
    controller_key: int = Field(ge=0, le=999_999_999)
    bus_number: int = Field(ge=0, le=255, description="The controller's busNumber.")
    unit_number: int = Field(ge=0, le=255, description="The disk's unit on the controller.")
    capacity_bytes: int = Field(ge=0, le=1 << 50)
    backing_file: str = Field(max_length=MAX_TEXT, description="e.g. '[datastore1] vm/vm.vmdk'.")
    disk_mode: str = Field(default="", max_length=64,
                           description="persistent, independent_persistent, ...")
    thin_provisioned: bool | None = Field(
        default=None, description="null when the backing does not say (RDMs).")
    captured: bool = Field(
        description="A snapshot captures the disk, so it is replicated with change tracking "
        "(false: independent disk or physical RDM).")
    skip_reason: str | None = Field(
        default=None, max_length=64,
        description="Why it is not captured: independent_persistent, "
        "independent_nonpersistent, physical_rdm.")


class VmNic(_Frozen):
    """One virtual network adapter and the network it is on."""

    device_key: int = Field(ge=0, le=999_999_999)
    adapter_type: str = Field(
        max_length=64, description="vmxnet3, vmxnet2, e1000, e1000e, pcnet32, sriov, ...")
    mac_address: str = Field(pattern=_MAC, description="Lower case, colon separated.")
    address_type: str = Field(default="", max_length=32,
                              description="manual, generated or assigned.")
    network: str = Field(max_length=MAX_TEXT,
                         description="Network or distributed portgroup name.")
    connected: bool
    start_connected: bool

    @field_validator("mac_address", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value


class VmDescription(_Frozen):
    """A VM as the target platform must recreate it, read from vSphere at one moment."""

    schema_version: Literal[1] = VM_DESCRIPTION_VERSION
    vm_instance_uuid: str = Field(description="config.instanceUuid (lower case).")
    bios_uuid: str = Field(description="config.uuid: the SMBIOS UUID the guest sees.")
    name: str = Field(max_length=MAX_TEXT)
    vm_path: str = Field(max_length=MAX_TEXT, description="Inventory path, /DC/vm/name.")
    vcenter: str = Field(max_length=MAX_TEXT, description="vCenter/ESXi it was read from.")
    esxi_host: str | None = Field(default=None, max_length=MAX_TEXT,
                                  description="Host the VM is registered on (runtime.host).")
    power_state: PowerState
    tools_running_status: str = Field(
        default="", max_length=64,
        description="guest.toolsRunningStatus: guestToolsRunning, guestToolsNotRunning, ...")
    firmware: Firmware
    secure_boot: bool = Field(description="bootOptions.efiSecureBootEnabled.")
    num_cpus: int = Field(ge=1, le=4096)
    cores_per_socket: int = Field(ge=1, le=4096)
    memory_mib: int = Field(ge=1, le=1 << 32)
    guest_id: str = Field(max_length=128, description="config.guestId, e.g. ubuntu64Guest.")
    guest_full_name: str = Field(default="", max_length=MAX_TEXT)
    hardware_version: str = Field(max_length=32, description="config.version, e.g. vmx-19.")
    disks: tuple[VmDisk, ...] = Field(
        max_length=512,
        description="In controller order: kind (ide, scsi, sata, nvme: ESXi's key ranges), "
        "bus number, unit number.")
    nics: tuple[VmNic, ...] = Field(max_length=64, description="In device key order.")

    _v_uuid = field_validator("vm_instance_uuid", "bios_uuid")(_lower_uuid)
