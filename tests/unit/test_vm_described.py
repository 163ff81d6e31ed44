"""VmDescribed: the event, its topic, the producer's order of effects (with a fake vCenter) and
what the audit makes of it (pure parts)."""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from cbtstream.config import KafkaSettings
from cbtstream.topic_check import catalogue_layout, co_partitioned
from cbtstream.vsphere.adapter import CbtStatus, HostRef, SnapshotInfo, VmRef
from cbtstream.vsphere.description import DescriptionError
from cbtstream.vsphere.errors import CbtNotEnabled
from consumers.audit.decoding import audited_event
from consumers.audit.projection import event_row, project
from producers.snapshot import snapshot_and_publish, vm_described
from schemas.codec import EventDecodeError, decode, encode
from schemas.events import (
    EVENT_TYPES,
    DiskSkipped,
    SnapshotTaken,
    VmDescribed,
    stable_event_id,
    vm_described_id,
)
from schemas.topics import (
    ALL_TOPICS,
    AUDITED_TOPICS,
    CONTROL_TOPICS,
    VM_DESCRIBED,
    topic_for,
)
from tests.unit.factories import T0, VM, disk, vm_description

VCENTER = "vc1.example"
REF = VmRef(moref="vm-42", name="pgtest1", instance_uuid=VM.upper(), path="/DC/vm/pgtest1")


def info(moref: str = "snapshot-7", *, skipped: bool = False) -> SnapshotInfo:
    return SnapshotInfo(moref=moref, name="cbtstream-1", created=T0, vm=REF, quiesced=False,
                        disks=[(disk(2000), "52 aa/3"), (disk(2001), "52 aa/4")],
                        skipped=[(disk(2002), "independent_persistent")] if skipped else [])


# -- the event and its topic --------------------------------------------------------------------
def test_the_event_is_keyed_by_vm_and_its_id_names_vcenter_vm_and_snapshot() -> None:
    ev = vm_described(VCENTER, info(), vm_description())
    assert ev.key == VM and ev.vm_instance_uuid == uuid.UUID(VM)
    assert (ev.vm_snapshot, ev.snapshot_name, ev.taken_at) == ("snapshot-7", "cbtstream-1", T0)
    assert ev.event_id == stable_event_id("VmDescribed", VCENTER, VM, "snapshot-7")
    assert ev.event_id == vm_described_id(VCENTER, VM.upper(), "snapshot-7")
    # read again later (another occurred_at, another CPU count): still the same fact's id
    again = vm_described(VCENTER, info(), vm_description(cpus=8))
    assert again.event_id == ev.event_id
    assert vm_described(VCENTER, info("snapshot-8"), vm_description()).event_id != ev.event_id
    assert vm_described("vc2.example", info(), vm_description()).event_id != ev.event_id
    assert VmDescribed.model_validate_json(ev.model_dump_json()) == ev
    assert EVENT_TYPES["VmDescribed"] is VmDescribed


def test_the_event_is_frozen_refuses_unknown_fields_and_another_vms_description() -> None:
    ev = vm_described(VCENTER, info(), vm_description())
    with pytest.raises(ValidationError):
        ev.vm_snapshot = "snapshot-9"  # type: ignore[misc]
    body = ev.model_dump(mode="json")
    with pytest.raises(ValidationError, match="extra"):
        VmDescribed.model_validate(body | {"disk": None})
    other = "5012abcd-9999-2222-3333-444455556666"
    with pytest.raises(ValidationError, match="another VM"):
        VmDescribed.model_validate(body | {"vm_instance_uuid": other})
    with pytest.raises(ValidationError):
        VmDescribed.model_validate(body | {"vm_snapshot": ""})


def test_the_topic_is_a_control_topic_audited_and_not_read_as_disk_history() -> None:
    ev = vm_described(VCENTER, info(), vm_description())
    assert topic_for(ev) is VM_DESCRIBED
    assert VM_DESCRIBED in CONTROL_TOPICS and VM_DESCRIBED in AUDITED_TOPICS
    assert VM_DESCRIBED not in ALL_TOPICS
    assert VM_DESCRIBED.config == {"cleanup.policy": "delete",
                                   "retention.ms": str(365 * 24 * 3600 * 1000)}
    k = KafkaSettings(topic_prefix="t.")
    assert "t.cbt.vm.described" in catalogue_layout(k)  # `cbtstream topics create` makes it
    assert not co_partitioned("t.cbt.vm.described", k)  # keyed by VM, not by disk
    key, value, headers = encode(ev)
    assert key == VM.encode() and dict(headers)["event-type"] == b"VmDescribed"
    with pytest.raises(EventDecodeError, match="unknown event_type"):
        decode(value, key=key)  # disk readers never take it for a disk event


# -- the producer, with a fake vCenter ----------------------------------------------------------
class FakeClient:
    vcenter = VCENTER

    def __init__(self, *, describe: Exception | None = None, cbt: bool = True,
                 skipped: bool = False) -> None:
        self.describe_error, self.cbt, self.skipped = describe, cbt, skipped
        self.calls: list[str] = []

    async def cbt_status(self, ref: VmRef) -> CbtStatus:
        return CbtStatus(vm=ref, enabled=self.cbt, active=self.cbt)

    async def create_snapshot(self, ref: VmRef, name: str, **kw: Any) -> SnapshotInfo:
        self.calls.append("create_snapshot")
        return info(skipped=self.skipped)

    async def vm_host(self, ref: VmRef) -> HostRef:
        return HostRef(moref="host-1", name="esx1.example", thumbprint="")

    async def describe_vm(self, ref: VmRef) -> Any:
        self.calls.append("describe_vm")
        if self.describe_error is not None:
            raise self.describe_error
        return vm_description()


class ListPublisher:
    def __init__(self) -> None:
        self.events: list[BaseModel] = []

    async def publish(self, event: BaseModel) -> tuple[int, int]:
        self.events.append(event)
        return 0, len(self.events)


async def test_one_description_per_snapshot_published_before_the_disk_events() -> None:
    client, pub = FakeClient(skipped=True), ListPublisher()
    events = await snapshot_and_publish(client, pub, REF)  # type: ignore[arg-type]
    assert client.calls == ["create_snapshot", "describe_vm"]  # read after the snapshot
    assert [type(e) for e in pub.events] == [VmDescribed, DiskSkipped, SnapshotTaken,
                                             SnapshotTaken]
    described = pub.events[0]
    assert isinstance(described, VmDescribed)
    assert described.vm_snapshot == events[0].vm_snapshot == "snapshot-7"
    assert described.description == vm_description()
    assert pub.events[2:] == events


@pytest.mark.parametrize("error", [
    DescriptionError("disk 2000 sits on controller 1000, which the VM does not have"),
    AttributeError("'NoneType' object has no attribute 'key'"),  # a bug in the mapping
])
async def test_a_description_that_cannot_be_read_keeps_the_disk_events(
        error: Exception, caplog: pytest.LogCaptureFixture) -> None:
    client, pub = FakeClient(describe=error), ListPublisher()
    counted: list[None] = []
    with caplog.at_level(logging.WARNING, logger="producers.snapshot"):
        events = await snapshot_and_publish(
            client, pub, REF, on_undescribed=lambda: counted.append(None))  # type: ignore[arg-type]
    assert [type(e) for e in pub.events] == [SnapshotTaken, SnapshotTaken]
    assert pub.events == events and counted == [None]
    assert "VM description not recorded" in caplog.text


async def test_cbt_off_still_refuses_before_any_snapshot_or_description() -> None:
    client, pub = FakeClient(cbt=False), ListPublisher()
    with pytest.raises(CbtNotEnabled):
        await snapshot_and_publish(client, pub, REF)  # type: ignore[arg-type]
    assert client.calls == [] and pub.events == []


# -- the audit ----------------------------------------------------------------------------------
def test_the_audit_reads_it_body_only_and_projects_one_row() -> None:
    ev = vm_described(VCENTER, info(), vm_description()).model_copy(
        update={"occurred_at": T0 + timedelta(seconds=2)})
    key, value, _ = encode(ev)
    assert audited_event(VM_DESCRIBED, key, value) == ev
    with pytest.raises(EventDecodeError, match="invalid VmDescribed"):
        audited_event(VM_DESCRIBED, key, b'{"event_type": "VmDescribed"}')
    row = event_row("cbt.vm.described", 0, 5, ev)
    assert row[:6] == (ev.event_id, "VmDescribed", None, uuid.UUID(VM), None, "snapshot-7")
    [stmt] = project(ev)
    assert "INSERT INTO vm_descriptions" in stmt.sql
    assert stmt.args[:9] == (ev.event_id, ev.occurred_at, uuid.UUID(VM), "pgtest1",
                             "/DC/vm/pgtest1", VCENTER, "snapshot-7", "cbtstream-1", T0)
    assert stmt.args[9:18] == ("efi", True, 4, 2, 8192, "rhel9_64Guest", "vmx-19", 2, 1)
    assert stmt.args[18] == ev.description.model_dump_json()

