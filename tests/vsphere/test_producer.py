"""Producer and CLI: one snapshot per VM, one SnapshotTaken per disk, on the real broker."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from cbtstream.config import Settings
from cbtstream.kafka import Publisher
from cbtstream.vsphere.adapter import SnapshotInfo, VmRef, VSphereClient
from cbtstream.vsphere.errors import VSphereError
from cbtstream.vsphere.simctl import SimNic, SimulatorControl
from producers.scheduler import parse_interval, run_schedule
from producers.snapshot import describe_snapshot, snapshot_and_publish
from schemas.events import SnapshotTaken, VmDescribed, stable_event_id
from schemas.topics import SNAPSHOT_TAKEN, VM_DESCRIBED
from tests.support import read_topic, settings_env

MiB = 1 << 20


class OrderedPublisher:
    """The real publisher, noting each event once the broker acknowledged it."""

    def __init__(self, publisher: Publisher) -> None:
        self.publisher = publisher
        self.acked: list[BaseModel] = []

    async def publish(self, event: BaseModel) -> tuple[int, int]:
        where = await self.publisher.publish(event)
        self.acked.append(event)
        return where


async def read_described(settings: Settings, n: int) -> list[VmDescribed]:
    """The records of cbt.vm.described (keyed by VM), checked and decoded."""
    records = await read_topic(settings, VM_DESCRIBED, raw=True, until=lambda e: len(e) >= n)
    out = [VmDescribed.model_validate_json(r.value) for r in records]
    assert [r.key.decode() for r in records] == [e.key for e in out]
    return out


@pytest.mark.integration
async def test_snapshot_and_publish_one_event_per_disk(
    sim: SimulatorControl, producer_settings: Settings, vm_name: str
) -> None:
    simvm = sim.create_vm(vm_name, [1 << 20, 2 << 20, 3 << 20], cbt=True)
    sim.write(simvm.moref, simvm.disks[1].key, 0, b"data")
    async with VSphereClient(producer_settings.vsphere) as client, Publisher(
        producer_settings.kafka
    ) as pub:
        events = await snapshot_and_publish(client, pub, simvm.instance_uuid, name="p1")
        vcenter = client.vcenter
    assert [e.disk.device_key for e in events] == [d.key for d in simvm.disks]
    assert len({e.vm_snapshot for e in events}) == 1  # ONE snapshot for all disks
    for e, d in zip(events, simvm.disks, strict=True):
        assert e.disk.key == f"{simvm.instance_uuid.lower()}/disk-{d.key}"
        assert e.change_id is not None and e.change_id.endswith("/1")
        assert e.event_id == stable_event_id("SnapshotTaken", vcenter, simvm.instance_uuid.lower(),
                                             e.vm_snapshot, d.key)
    got = await read_topic(producer_settings, SNAPSHOT_TAKEN, until=lambda ev: len(ev) >= 3)
    assert sorted(got, key=lambda e: e.disk.device_key) == events


@pytest.mark.integration
async def test_scheduler_keeps_going_when_one_vm_fails(
    sim: SimulatorControl, producer_settings: Settings, vm_name: str
) -> None:
    simvm = sim.create_vm(vm_name, [1 << 20], cbt=True)
    seen: list[list[SnapshotTaken]] = []
    async with VSphereClient(producer_settings.vsphere) as client, Publisher(
        producer_settings.kafka
    ) as pub:
        failures = await run_schedule(client, pub, ["/DC0/vm/missing-" + vm_name, simvm.path],
                                      0.05, ticks=2, on_events=seen.append)
    assert failures == 2
    assert len(seen) == 2 and seen[0][0].vm_snapshot != seen[1][0].vm_snapshot
    assert seen[1][0].change_id is not None and seen[1][0].change_id.endswith("/2")


def test_parse_interval() -> None:
    assert parse_interval("15m") == 900 and parse_interval("30s") == 30
    assert parse_interval("1h") == 3600 and parse_interval("2") == 2
    for bad in ("", "0m", "5x", "-1s"):
        with pytest.raises(ValueError):
            parse_interval(bad)


@pytest.mark.integration
async def test_cli_prints_one_json_line_per_event(
    sim: SimulatorControl, producer_settings: Settings, vm_name: str, tmp_path: Path
) -> None:
    simvm = sim.create_vm(vm_name, [1 << 20, 1 << 20], cbt=True)
    env = settings_env(producer_settings)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cbtctl.cli", "snapshot", simvm.path,
        "--vcenter", producer_settings.vsphere.url, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    lines = [json.loads(line) for line in out.decode().splitlines()]
    assert [doc["event_type"] for doc in lines] == ["SnapshotTaken", "SnapshotTaken"]
    assert [doc["disk"]["device_key"] for doc in lines] == [d.key for d in simvm.disks]
    got = await read_topic(producer_settings, SNAPSHOT_TAKEN, until=lambda ev: len(ev) >= 2)
    assert {str(e.event_id) for e in got} == {doc["event_id"] for doc in lines}
    [described] = await read_described(producer_settings, 1)  # published, not printed
    assert described.vm_snapshot == lines[0]["vm_snapshot"]


@pytest.mark.integration
async def test_each_snapshot_publishes_its_vm_description_first(
    sim: SimulatorControl, producer_settings: Settings, vm_name: str
) -> None:
    simvm = sim.create_vm(
        vm_name, [MiB, 2 * MiB], cbt=True, disk_controllers=["sata", "pvscsi"],
        nics=[SimNic("vmxnet3", "VM Network", "00:50:56:01:02:03"),
              SimNic("e1000e", "DC0_DVPG0")],
        firmware="efi", guest_id="ubuntu64Guest", cpus=2, memory_mb=1024)
    async with VSphereClient(producer_settings.vsphere) as client, Publisher(
        producer_settings.kafka
    ) as pub:
        ordered = OrderedPublisher(pub)
        events = await snapshot_and_publish(client, ordered, simvm.path)  # type: ignore[arg-type]
        vcenter = client.vcenter
        ref = await client.find_vm(path=simvm.path)
        # the same snapshot described and published again (a retry): the same event id
        snap = SnapshotInfo(moref=events[0].vm_snapshot, name=events[0].snapshot_name,
                            created=events[0].taken_at, vm=ref, quiesced=False, disks=[])
        again = await describe_snapshot(client, ref, snap)
        assert again is not None
        await pub.publish(again)
    # acknowledged before any SnapshotTaken: whoever sees a disk's snapshot finds the VM's
    assert [type(e) for e in ordered.acked] == [VmDescribed, SnapshotTaken, SnapshotTaken]
    assert ordered.acked[1:] == events
    vm = simvm.instance_uuid.lower()
    first, repeat = await read_described(producer_settings, 2)
    assert first == ordered.acked[0] and repeat == again
    assert first.event_id == repeat.event_id == stable_event_id(
        "VmDescribed", vcenter, vm, events[0].vm_snapshot)
    assert (first.key, first.vm_snapshot, first.taken_at) == (
        vm, events[0].vm_snapshot, events[0].taken_at)
    d = first.description
    assert (d.firmware, d.num_cpus, d.memory_mib, d.guest_id) == ("efi", 2, 1024, "ubuntu64Guest")
    # disks in controller order (scsi before sata), the same disks the events name
    assert [(k.controller, k.capacity_bytes) for k in d.disks] == [("scsi", 2 * MiB),
                                                                   ("sata", MiB)]
    assert {k.device_key for k in d.disks} == {e.disk.device_key for e in events}
    assert [(n.adapter_type, n.network) for n in d.nics] == [("vmxnet3", "VM Network"),
                                                             ("e1000e", "DC0_DVPG0")]
    assert d.nics[0].mac_address == "00:50:56:01:02:03"


@pytest.mark.integration
async def test_a_description_that_fails_does_not_lose_the_snapshot_events(
    sim: SimulatorControl, producer_settings: Settings, vm_name: str,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    simvm = sim.create_vm(vm_name, [MiB, MiB], cbt=True)
    undescribed: list[None] = []
    async with VSphereClient(producer_settings.vsphere) as client, Publisher(
        producer_settings.kafka
    ) as pub:
        async def broken(ref: VmRef) -> None:
            raise VSphereError(f"describe {ref.path}: connection reset")

        monkeypatch.setattr(client, "describe_vm", broken)
        lost = await snapshot_and_publish(client, pub, simvm.instance_uuid,
                                          on_undescribed=lambda: undescribed.append(None))
        monkeypatch.undo()
        kept = await snapshot_and_publish(client, pub, simvm.instance_uuid)
    assert undescribed == [None] and len(lost) == 2 and lost[0].change_id is not None
    got = await read_topic(producer_settings, SNAPSHOT_TAKEN, until=lambda ev: len(ev) >= 4)
    assert sorted(got, key=lambda e: str(e.event_id)) == sorted(
        [*lost, *kept], key=lambda e: str(e.event_id))  # disks' partitions differ
    # the failed one published no description: the topic's only record is the second one's
    [described] = await read_described(producer_settings, 1)
    assert described.vm_snapshot == kept[0].vm_snapshot != lost[0].vm_snapshot
