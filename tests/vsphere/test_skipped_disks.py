"""Disks a snapshot does not capture (issue 12 item 4), against the simulator and the broker:
independent disks and physical RDMs get ``DiskSkipped`` instead of ``SnapshotTaken``, have no
frozen image, and are left out of ``snapshot_device_keys`` so the lifecycle does not wait for
them. A virtual-compatibility RDM is captured like any disk."""

from __future__ import annotations

import pytest

from cbtstream.config import Settings
from cbtstream.kafka import Publisher
from cbtstream.vsphere.adapter import VSphereClient
from cbtstream.vsphere.simctl import SimulatorControl, SimulatorError
from producers.snapshot import snapshot_and_publish
from schemas.events import DiskSkipped, SkipReason
from schemas.topics import DISK_SKIPPED, SNAPSHOT_TAKEN
from streams import lifecycle
from tests.support import read_topic

pytestmark = pytest.mark.integration

MiB = 1 << 20


def five_disk_vm(sim: SimulatorControl, name: str) -> tuple[str, list[int]]:
    """Disks: plain, independent_persistent, independent_nonpersistent, physical RDM,
    virtual RDM."""
    simvm = sim.create_vm(name, [MiB] * 5, cbt=True)
    keys = [d.key for d in simvm.disks]
    sim.set_disk_mode(simvm.moref, keys[1], disk_mode="independent_persistent")
    sim.set_disk_mode(simvm.moref, keys[2], disk_mode="independent_nonpersistent")
    sim.set_disk_mode(simvm.moref, keys[3], rdm="physical")
    after = sim.set_disk_mode(simvm.moref, keys[4], rdm="virtual")
    assert [d.rdm for d in after.disks] == ["", "", "", "physicalMode", "virtualMode"]
    assert [bool(d.change_id) for d in after.disks] == [True, False, False, False, True]
    return simvm.moref, keys


async def test_snapshot_info_separates_captured_and_skipped_disks(
    sim: SimulatorControl, client: VSphereClient, vm_name: str
) -> None:
    moref, keys = five_disk_vm(sim, vm_name)
    vm = await client.find_vm(path=f"/DC0/vm/{vm_name}")
    sim.write(moref, keys[1], 0, b"independent")
    snap = await client.create_snapshot(vm, "s1")
    assert [d.device_key for d, _ in snap.disks] == [keys[0], keys[4]]
    assert all(cid is not None for _, cid in snap.disks)
    assert [(d.device_key, r) for d, r in snap.skipped] == [
        (keys[1], "independent_persistent"), (keys[2], "independent_nonpersistent"),
        (keys[3], "physical_rdm")]
    # Not captured: no frozen image to copy from, and the disk keeps changing.
    with pytest.raises(SimulatorError, match="404"):
        sim.export(snap.moref, keys[1])
    sim.write(moref, keys[1], 0, b"changed after")
    assert sim.read(moref, keys[1], 0, 13) == b"changed after"
    assert sim.export(snap.moref, keys[4]).capacity == MiB
    # CBT status counts only the captured disks.
    assert (await client.cbt_status(vm)).active


async def test_producer_publishes_disk_skipped_and_keeps_them_out_of_the_lifecycle(
    sim: SimulatorControl, producer_settings: Settings, vm_name: str
) -> None:
    _, keys = five_disk_vm(sim, vm_name)
    skipped: list[DiskSkipped] = []
    async with VSphereClient(producer_settings.vsphere) as client, Publisher(
        producer_settings.kafka
    ) as pub:
        events = await snapshot_and_publish(client, pub, f"/DC0/vm/{vm_name}",
                                            on_skipped=skipped.append)
    assert [e.disk.device_key for e in events] == [keys[0], keys[4]]
    assert {e.snapshot_device_keys for e in events} == {(keys[0], keys[4])}
    assert [(s.disk.device_key, s.reason) for s in skipped] == [
        (keys[1], SkipReason.INDEPENDENT_PERSISTENT),
        (keys[2], SkipReason.INDEPENDENT_NONPERSISTENT), (keys[3], SkipReason.PHYSICAL_RDM)]
    assert {s.vm_snapshot for s in skipped} == {events[0].vm_snapshot}
    got = await read_topic(producer_settings, DISK_SKIPPED, until=lambda ev: len(ev) >= 3)
    assert sorted(got, key=lambda e: e.disk.device_key) == skipped
    taken = await read_topic(producer_settings, SNAPSHOT_TAKEN, until=lambda ev: len(ev) >= 2)
    assert sorted(e.disk.device_key for e in taken) == [keys[0], keys[4]]
    # The lifecycle row is releasable once the two captured disks finished: it never waits
    # for the skipped ones.
    row = None
    for e in events:
        row = lifecycle.apply(row, lifecycle.Notice(kind="finished", disk=e.disk,
                                                    vm_snapshot=e.vm_snapshot,
                                                    outcome="committed",
                                                    expected=e.snapshot_device_keys))
    assert row is not None and lifecycle.releasable(row)
