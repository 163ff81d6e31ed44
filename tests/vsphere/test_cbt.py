"""CBT against the simulator, through the real adapter (pyvmomi over SOAP/TLS).

A three-disk VM (one capacity not a multiple of 64 KiB); guest writes at known offsets, some
unaligned, some ending on the last byte of a disk. Expected changed areas are computed
independently (set of touched 64 KiB blocks, clipped to capacity) and compared exactly.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from cbtstream.extents import Extent
from cbtstream.vsphere.adapter import SnapshotInfo, VmRef, VSphereClient
from cbtstream.vsphere.errors import (
    CbtNotEnabled,
    StaleChangeId,
    VSphereInvalidArgument,
    VSphereNotFound,
)
from cbtstream.vsphere.simctl import SimulatorControl
from consumers.exports import ExportNotFound, SimulatorExports
from producers.cbt import set_cbt
from schemas.changeid import ChangeId

pytestmark = pytest.mark.integration

BLOCK = 64 * 1024
MiB = 1 << 20
#: 3 MiB + 5 KiB: the last block is partial, and the disk spans several 1 MiB pages.
SIZES = [3 * MiB + 5 * 1024, 2 * MiB, 4 * MiB]


def expected_areas(writes: list[tuple[int, int]], capacity: int) -> list[Extent]:
    """Merged block-aligned extents touched by (offset, length) writes, clipped to capacity."""
    blocks = sorted(
        {b for off, n in writes for b in range(off // BLOCK, (off + n - 1) // BLOCK + 1)}
    )
    out: list[Extent] = []
    for b in blocks:
        start, end = b * BLOCK, min((b + 1) * BLOCK, capacity)
        if out and out[-1].end == start:
            out[-1] = Extent(out[-1].start, end - out[-1].start)
        else:
            out.append(Extent(start, end - start))
    return out


def merged(extents: list[Extent]) -> list[Extent]:
    """Adjacent extents joined (pages may split one run of blocks in two)."""
    out: list[Extent] = []
    for e in extents:
        if out and out[-1].end == e.start:
            out[-1] = Extent(out[-1].start, e.end - out[-1].start)
        else:
            out.append(e)
    return out


async def areas(client: VSphereClient, vm: VmRef, snap: SnapshotInfo, key: int,
                change_id: str) -> list[Extent]:
    disk = next(d for d, _ in snap.disks if d.device_key == key)
    return [e async for e in client.changed_areas(vm, snap.moref, key, change_id,
                                                  disk.capacity_bytes)]


def change_id_of(snap: SnapshotInfo, key: int) -> str:
    cid = next(c for d, c in snap.disks if d.device_key == key)
    assert cid is not None
    return cid


def pattern(seed: int, n: int) -> bytes:
    return (bytes([seed % 251 + 1]) + os.urandom(7)) * (n // 8) + os.urandom(n % 8)


# First-generation writes: (offset, length) per disk index; unaligned starts and lengths, and
# the last bytes of each disk.
GEN1 = {
    0: [(0, 10), (BLOCK - 1, 2), (SIZES[0] - 3, 3)],
    1: [(5 * BLOCK + 17, 3 * BLOCK + 5)],
    2: [(SIZES[2] - BLOCK, BLOCK), (MiB - 1, 1)],
}
# Second-generation writes (after snapshot 1); disk 1 gets none.
GEN2 = {
    0: [(2 * MiB + 100, 70_000), (SIZES[0] - 1, 1)],
    1: [],
    2: [(0, 1), (MiB - 1, 2), (3 * MiB - 7, 14), (3 * MiB + 9 * BLOCK, 1), (10 * BLOCK, 5)],
}


@pytest.fixture
async def three_disk_vm(sim: SimulatorControl, client: VSphereClient,
                        vm_name: str) -> tuple[VmRef, list[int]]:
    simvm = sim.create_vm(vm_name, SIZES, cbt=True)
    vm = await client.find_vm(instance_uuid=simvm.instance_uuid)
    return vm, [d.key for d in simvm.disks]


async def test_changed_areas_per_disk_match_writes_exactly(
    sim: SimulatorControl, client: VSphereClient, three_disk_vm: tuple[VmRef, list[int]]
) -> None:
    vm, keys = three_disk_vm
    assert len(keys) == 3 and len(set(keys)) == 3
    for i, key in enumerate(keys):
        for off, n in GEN1[i]:
            sim.write(vm.moref, key, off, pattern(i, n))
    s1 = await client.create_snapshot(vm, "s1")
    for i, key in enumerate(keys):
        for off, n in GEN2[i]:
            sim.write(vm.moref, key, off, pattern(i + 10, n))
    s2 = await client.create_snapshot(vm, "s2")

    # One snapshot for all disks: each disk has its own epoch and its own change ID.
    assert [d.device_key for d, _ in s2.disks] == keys
    assert [d.capacity_bytes for d, _ in s2.disks] == SIZES
    ids1 = [ChangeId.parse(change_id_of(s1, k)) for k in keys]
    ids2 = [ChangeId.parse(change_id_of(s2, k)) for k in keys]
    for a, b in zip(ids1, ids2, strict=True):
        assert a.same_epoch(b) and b.sequence > a.sequence
    assert len({i.epoch for i in ids2}) == 3

    for i, key in enumerate(keys):
        got = await areas(client, vm, s2, key, change_id_of(s1, key))
        assert merged(got) == expected_areas(GEN2[i], SIZES[i]), f"disk {key}"
        # Since tracking began (change ID of generation 0): both generations.
        epoch0 = f"{ids1[i].epoch}/0"
        got_all = await areas(client, vm, s2, key, epoch0)
        assert merged(got_all) == expected_areas(GEN1[i] + GEN2[i], SIZES[i])
        # From a snapshot to itself: nothing changed.
        assert await areas(client, vm, s2, key, change_id_of(s2, key)) == []

    # Disk 0's GEN2 runs across page boundaries with 3 areas max: paging really happened.
    raw = await areas(client, vm, s2, keys[2], change_id_of(s1, keys[2]))
    assert len(raw) >= 4


async def test_other_disks_change_id_is_stale(
    sim: SimulatorControl, client: VSphereClient, three_disk_vm: tuple[VmRef, list[int]]
) -> None:
    vm, keys = three_disk_vm
    sim.write(vm.moref, keys[0], 0, b"a")
    s1 = await client.create_snapshot(vm, "s1")
    sim.write(vm.moref, keys[0], BLOCK, b"b")
    s2 = await client.create_snapshot(vm, "s2")
    with pytest.raises(StaleChangeId) as info:
        await areas(client, vm, s2, keys[0], change_id_of(s1, keys[1]))
    assert info.value.reason == "stale_change_id" and not info.value.retriable
    # A change ID from the future (a later sequence of the same epoch) is not accepted either.
    future = ChangeId.parse(change_id_of(s2, keys[0]))
    with pytest.raises(StaleChangeId):
        await areas(client, vm, s1, keys[0], str(future))


async def test_cbt_reset_starts_new_epoch_and_voids_old_ids(
    sim: SimulatorControl, client: VSphereClient, three_disk_vm: tuple[VmRef, list[int]]
) -> None:
    vm, keys = three_disk_vm
    sim.write(vm.moref, keys[1], 0, b"x" * 100)
    s1 = await client.create_snapshot(vm, "before-reset")
    await set_cbt(client, vm, False)
    assert not await client.cbt_enabled(vm)
    off = await client.create_snapshot(vm, "cbt-off")
    assert all(cid is None for _, cid in off.disks)
    with pytest.raises(CbtNotEnabled) as info:
        await areas(client, vm, off, keys[1], "*")
    assert info.value.reason == "cbt_not_enabled"
    # CBT off now: even an older snapshot with change IDs cannot be queried.
    with pytest.raises(CbtNotEnabled):
        await areas(client, vm, s1, keys[1], "*")

    await set_cbt(client, vm, True)
    assert await client.cbt_enabled(vm)
    s2 = await client.create_snapshot(vm, "after-reset")
    for key in keys:
        old, new = ChangeId.parse(change_id_of(s1, key)), ChangeId.parse(change_id_of(s2, key))
        assert not old.same_epoch(new)
        with pytest.raises(StaleChangeId):
            await areas(client, vm, s2, key, str(old))


async def test_star_returns_allocated_areas(
    sim: SimulatorControl, client: VSphereClient, three_disk_vm: tuple[VmRef, list[int]]
) -> None:
    vm, keys = three_disk_vm
    for i, key in enumerate(keys):
        for off, n in GEN1[i]:
            sim.write(vm.moref, key, off, pattern(i, n))
    s1 = await client.create_snapshot(vm, "s1")
    for i, key in enumerate(keys):
        for off, n in GEN2[i]:
            sim.write(vm.moref, key, off, pattern(i, n))
    s2 = await client.create_snapshot(vm, "s2")
    for i, key in enumerate(keys):
        assert merged(await areas(client, vm, s1, key, "*")) == expected_areas(GEN1[i], SIZES[i])
        assert merged(await areas(client, vm, s2, key, "*")) == expected_areas(
            GEN1[i] + GEN2[i], SIZES[i]
        )


async def test_invalid_arguments_and_removed_snapshot(
    sim: SimulatorControl, client: VSphereClient, three_disk_vm: tuple[VmRef, list[int]]
) -> None:
    vm, keys = three_disk_vm
    snap = await client.create_snapshot(vm, "s")
    vm_obj_calls = [
        (max(keys) + 1000, 0, "*"),  # no such device
        (keys[0], SIZES[0], "*"),  # offset == capacity
        (keys[0], 0, "not-a-change-id"),  # malformed
    ]
    for key, offset, cid in vm_obj_calls:
        with pytest.raises(VSphereInvalidArgument):
            # capacity larger than offset so the adapter really asks
            async for _ in client.changed_areas(vm, snap.moref, key, cid, offset + 1):
                pass
    await client.remove_snapshot(vm, snap.moref)
    with pytest.raises(VSphereNotFound):
        await areas(client, vm, snap, keys[0], "*")
    with pytest.raises(VSphereNotFound):
        await client.snapshot_info(vm, snap.moref)


async def test_snapshot_over_nbd_is_frozen(
    sim: SimulatorControl, client: VSphereClient, three_disk_vm: tuple[VmRef, list[int]],
    tmp_path: Path,
) -> None:
    vm, keys = three_disk_vm
    key, size = keys[0], SIZES[0]
    before = pattern(1, 300_000)
    sim.write(vm.moref, key, 12_345, before)
    sim.write(vm.moref, key, size - 4, b"TAIL")
    snap = await client.create_snapshot(vm, "frozen")
    sim.write(vm.moref, key, 12_345, pattern(2, 300_000))  # the guest keeps writing
    sim.write(vm.moref, key, size - 4, b"tail")
    live = sim.read(vm.moref, key, 0, size)

    disk = next(d for d, _ in snap.disks if d.device_key == key)
    uri = await SimulatorExports(sim).nbd_uri(disk, snap.moref)
    assert uri.startswith("nbd://127.0.0.1:")
    out = tmp_path / "copy.img"
    proc = await asyncio.create_subprocess_exec("nbdcopy", uri, str(out))
    assert await asyncio.wait_for(proc.wait(), 60) == 0
    data = out.read_bytes()
    expected = bytearray(size)
    expected[12_345:12_345 + len(before)] = before
    expected[size - 4:] = b"TAIL"
    assert len(data) == size
    assert data == bytes(expected)
    assert live[12_345:12_345 + 8] != before[:8] and live[-4:] == b"tail"

    await client.remove_snapshot(vm, snap.moref)
    with pytest.raises(ExportNotFound):
        await SimulatorExports(sim).nbd_uri(disk, snap.moref)


async def test_added_and_resized_disks_appear_in_next_snapshot(
    sim: SimulatorControl, client: VSphereClient, three_disk_vm: tuple[VmRef, list[int]]
) -> None:
    vm, keys = three_disk_vm
    s1 = await client.create_snapshot(vm, "s1")
    grown = SIZES[1] + 3 * MiB
    sim.resize_disk(vm.moref, keys[1], grown)
    simvm = sim.add_disk(vm.moref, MiB)
    new_key = next(d.key for d in simvm.disks if d.key not in keys)
    sim.write(vm.moref, keys[1], grown - 2, b"zz")  # writable up to the new end
    sim.write(vm.moref, new_key, MiB - 1, b"!")
    s2 = await client.create_snapshot(vm, "s2")
    caps = {d.device_key: d.capacity_bytes for d, _ in s2.disks}
    assert caps == {keys[0]: SIZES[0], keys[1]: grown, keys[2]: SIZES[2], new_key: MiB}
    assert {d.device_key for d, _ in s1.disks} == set(keys)  # the old snapshot is unchanged
    assert merged(await areas(client, vm, s2, keys[1], change_id_of(s1, keys[1]))) == [
        Extent(grown - BLOCK, BLOCK)
    ]
    assert merged(await areas(client, vm, s2, new_key, "*")) == [Extent(MiB - BLOCK, BLOCK)]


async def test_remove_vm_snapshot_checks_the_owner(
    sim: SimulatorControl, client: VSphereClient, three_disk_vm: tuple[VmRef, list[int]],
    vm_name: str,
) -> None:
    """The lifecycle's removal: only the named VM's snapshot, and a gone one is NotFound."""
    vm, _ = three_disk_vm
    other = sim.create_vm(f"{vm_name}-other", [1 << 20], cbt=True)
    other_vm = await client.find_vm(instance_uuid=other.instance_uuid)
    mine = await client.create_snapshot(vm, "mine")
    theirs = await client.create_snapshot(other_vm, "theirs")
    with pytest.raises(VSphereInvalidArgument):  # an event naming a foreign snapshot
        await client.remove_vm_snapshot(vm.instance_uuid, theirs.moref)
    await client.snapshot_info(other_vm, theirs.moref)  # still there
    await client.remove_vm_snapshot(vm.instance_uuid, mine.moref)
    with pytest.raises(VSphereNotFound):
        await client.snapshot_info(vm, mine.moref)
    with pytest.raises(VSphereNotFound):
        await client.remove_vm_snapshot(vm.instance_uuid, mine.moref)
    with pytest.raises(VSphereNotFound):
        await client.remove_vm_snapshot("00000000-0000-0000-0000-00000000dead", theirs.moref)
