"""Small builders for events in unit tests (pure data, no I/O)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from schemas import ChangeIdCommitted, DiskRef, SnapshotTaken, SyncPlanned
from schemas.vm import VmDescription, VmDisk, VmNic

VM = "5012abcd-1111-2222-3333-444455556666"
EPOCH_A = "52 8a b4 5c 7b ab 8e 51-7a 73 16 d1 76 9a 0d a6"
EPOCH_B = "52 11 22 33 44 55 66 77-88 99 aa bb cc dd ee ff"
T0 = datetime(2026, 11, 1, tzinfo=UTC)


def disk(key: int = 2000, *, capacity: int = 1 << 30, backing_uuid: str | None = None,
         backing_file: str | None = None, vm: str = VM) -> DiskRef:
    return DiskRef(
        vm_instance_uuid=vm,
        vm_path="/DC/vm/pgtest1",
        vm_name="pgtest1",
        device_key=key,
        backing_uuid=backing_uuid if backing_uuid is not None else f"6000C29{key:05d}",
        backing_file=backing_file if backing_file is not None
        else f"[ds1] pgtest1/pgtest1_{key}.vmdk",
        capacity_bytes=capacity,
    )


def vm_description(vm: str = VM, name: str = "pgtest1", *, disks: tuple[int, ...] = (2000, 2001),
                   cpus: int = 4, memory_mib: int = 8192) -> VmDescription:
    """A VM on vc1.example: EFI, ``disks`` on one pvscsi controller, one vmxnet3 NIC."""
    return VmDescription(
        vm_instance_uuid=vm, bios_uuid="4212abcd-1111-2222-3333-444455556666", name=name,
        vm_path=f"/DC/vm/{name}", vcenter="vc1.example", esxi_host="esx1.example",
        power_state="poweredOn", firmware="efi", secure_boot=True, num_cpus=cpus,
        cores_per_socket=2, memory_mib=memory_mib, guest_id="rhel9_64Guest",
        hardware_version="vmx-19",
        disks=tuple(VmDisk(device_key=key, controller="scsi", controller_model="pvscsi",
                           controller_key=1000, bus_number=0, unit_number=i,
                           capacity_bytes=1 << 30, backing_file=f"[ds1] {name}/{name}_{i}.vmdk",
                           captured=True)
                    for i, key in enumerate(disks)),
        nics=(VmNic(device_key=4000, adapter_type="vmxnet3", mac_address="00:50:56:01:02:03",
                    network="VM Network", connected=True, start_connected=True),),
    )


def snap(d: DiskRef, change_id: str | None, *, minutes: int = 0,
         snapshot: str = "snapshot-1") -> SnapshotTaken:
    return SnapshotTaken(
        disk=d,
        vcenter="vc",
        vm_snapshot=snapshot,
        change_id=change_id,
        taken_at=T0 + timedelta(minutes=minutes),
    )


def commit_for(plan: SyncPlanned, **overrides: object) -> ChangeIdCommitted:
    fields: dict[str, object] = {
        "disk": plan.disk,
        "sync_id": plan.sync_id,
        "vm_snapshot": plan.vm_snapshot,
        "previous_change_id": plan.previous_change_id,
        "change_id": plan.change_id,
        "replication_type": plan.replication_type,
        "reason": plan.reason,
        "bytes_copied": 1,
        "extents": 1,
        "digest": "sha256:00",
        "duration_s": 0.1,
    }
    fields.update(overrides)
    return ChangeIdCommitted(**fields)  # type: ignore[arg-type]


def new_id() -> uuid.UUID:
    return uuid.uuid4()
