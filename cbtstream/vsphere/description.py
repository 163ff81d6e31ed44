"""From a VM's vSphere properties to its :class:`~schemas.vm.VmDescription`: pure code, no I/O
and no pyvmomi.

The adapter reads the properties (one PropertyCollector call, then the VM's networks and host)
and classifies each device by its pyvmomi type into a :class:`DeviceClass`; everything else is
read here from plain attributes (``key``, ``controllerKey``, ``unitNumber``, ``busNumber``,
``backing.fileName``, ``macAddress``...), so tests feed it simple objects.

Rules:

- Disks are ordered by controller kind (ide, scsi, sata, nvme: ESXi's device key ranges, see
  :data:`schemas.vm.CONTROLLER_ORDER`), then the controller's bus number, then the unit number.
  A disk whose controller is not among the devices is refused: its place is unknown.
- A NIC's network is the standard network's ``backing.deviceName``, the distributed portgroup
  named by ``backing.port.portgroupKey``, or the opaque network ``backing.opaqueNetworkId``,
  resolved through ``networks`` (key or id -> name); an unresolved key is kept as it is.
- ``memory_mib`` is ``config.hardware.memoryMB`` (vSphere's "MB" are MiB).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from pydantic import ValidationError

from cbtstream.errors import CbtStreamError
from schemas.vm import CONTROLLER_ORDER, VmDescription, VmDisk, VmNic

#: The VM properties :func:`describe` reads, for the adapter's PropertyCollector call.
VM_PATHS: tuple[str, ...] = (
    "name", "config.uuid", "config.instanceUuid", "config.firmware",
    "config.bootOptions", "config.hardware.numCPU", "config.hardware.numCoresPerSocket",
    "config.hardware.memoryMB", "config.guestId", "config.guestFullName", "config.version",
    "config.hardware.device", "runtime.powerState", "guest.toolsRunningStatus",
)


class DescriptionError(CbtStreamError):
    """The VM's properties do not make a valid description (a disk on an unknown controller,
    a malformed MAC address...)."""

    reason = "vm_description_invalid"


class DeviceClass(NamedTuple):
    """What the adapter knows from a device's pyvmomi type."""

    #: controller, disk or nic.
    role: str
    #: Controllers: scsi, nvme, sata or ide.
    kind: str = ""
    #: Controllers: pvscsi, lsilogic, ahci...; NICs: vmxnet3, e1000e...
    model: str = ""
    #: Disks a snapshot does not capture: why (independent_persistent, physical_rdm...).
    skip_reason: str | None = None


class VmPlace(NamedTuple):
    """Where the VM was read: identity the properties do not hold."""

    vm_path: str
    vcenter: str
    esxi_host: str | None


def _network(backing: Any, networks: Mapping[str, str]) -> str:
    port = getattr(backing, "port", None)
    if port is not None and getattr(port, "portgroupKey", None):
        key = str(port.portgroupKey)
        return networks.get(key, key)
    opaque = getattr(backing, "opaqueNetworkId", None)
    if opaque:
        return networks.get(str(opaque), str(opaque))
    return str(getattr(backing, "deviceName", None) or "")


def _disk(device: Any, cls: DeviceClass, controllers: Mapping[int, tuple[DeviceClass, Any]]
          ) -> VmDisk:
    found = controllers.get(device.controllerKey)
    if found is None:
        raise DescriptionError(f"disk {device.key} sits on controller {device.controllerKey}, "
                               "which the VM does not have")
    ctrl_cls, ctrl = found
    backing = device.backing
    thin = getattr(backing, "thinProvisioned", None)
    return VmDisk(
        device_key=device.key,
        controller=ctrl_cls.kind,  # type: ignore[arg-type]  # validated by the model
        controller_model=ctrl_cls.model,
        controller_key=ctrl.key,
        bus_number=ctrl.busNumber or 0,
        unit_number=device.unitNumber or 0,
        capacity_bytes=device.capacityInBytes or (device.capacityInKB or 0) * 1024,
        backing_file=getattr(backing, "fileName", None) or "",
        disk_mode=getattr(backing, "diskMode", None) or "",
        thin_provisioned=None if thin is None else bool(thin),
        captured=cls.skip_reason is None,
        skip_reason=cls.skip_reason,
    )


def _nic(device: Any, cls: DeviceClass, networks: Mapping[str, str]) -> VmNic:
    conn = device.connectable
    return VmNic(
        device_key=device.key,
        adapter_type=cls.model,
        mac_address=device.macAddress or "",
        address_type=device.addressType or "",
        network=_network(device.backing, networks),
        connected=bool(conn and conn.connected),
        start_connected=bool(conn and conn.startConnected),
    )


def describe(props: Mapping[str, Any], devices: Iterable[tuple[DeviceClass, Any]],
             place: VmPlace, networks: Mapping[str, str]) -> VmDescription:
    """The description of one VM from its :data:`VM_PATHS` properties, its classified devices
    (others left out), where it was read, and its networks (portgroup key or opaque id ->
    name)."""
    classified = list(devices)
    controllers = {d.key: (c, d) for c, d in classified if c.role == "controller"}
    try:
        disks = sorted(
            (_disk(d, c, controllers) for c, d in classified if c.role == "disk"),
            key=lambda d: (CONTROLLER_ORDER[d.controller], d.bus_number, d.unit_number,
                           d.device_key))
        nics = sorted((_nic(d, c, networks) for c, d in classified if c.role == "nic"),
                      key=lambda n: n.device_key)
        boot = props.get("config.bootOptions")
        return VmDescription(
            vm_instance_uuid=str(props.get("config.instanceUuid") or ""),
            bios_uuid=str(props.get("config.uuid") or ""),
            name=str(props.get("name") or ""),
            vm_path=place.vm_path,
            vcenter=place.vcenter,
            esxi_host=place.esxi_host,
            power_state=str(props.get("runtime.powerState") or ""),  # type: ignore[arg-type]
            tools_running_status=str(props.get("guest.toolsRunningStatus") or ""),
            firmware=str(props.get("config.firmware") or "bios"),  # type: ignore[arg-type]
            secure_boot=bool(getattr(boot, "efiSecureBootEnabled", False)),
            num_cpus=props.get("config.hardware.numCPU") or 1,
            cores_per_socket=props.get("config.hardware.numCoresPerSocket") or 1,
            memory_mib=props.get("config.hardware.memoryMB") or 0,
            guest_id=str(props.get("config.guestId") or ""),
            guest_full_name=str(props.get("config.guestFullName") or ""),
            hardware_version=str(props.get("config.version") or ""),
            disks=tuple(disks),
            nics=tuple(nics),
        )
    except ValidationError as exc:
        name = props.get("name") or place.vm_path
        raise DescriptionError(f"cannot describe VM {name}: {exc}") from exc
