"""Orphaned snapshots (issue 12 item 5): the pure selection, pruning against the simulator and
the broker, consolidation, and the CLI's refusal without the worker's answer. Snapshots that
cbtstream did not create are never touched."""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from cbtctl.demo.processes import Proc
from cbtstream.config import Settings
from cbtstream.kafka import Publisher
from cbtstream.vsphere.adapter import VmRef, VmSnapshot, VmSnapshots, VSphereClient
from cbtstream.vsphere.simctl import SimulatorControl
from producers.naming import SNAPSHOT_DESCRIPTION, snapshot_name
from producers.orphans import prune, select
from producers.snapshot import snapshot_and_publish
from schemas.events import RemovalReason
from schemas.topics import SNAPSHOT_REMOVED
from streams.orphans import needed_snapshots
from streams.planner import on_snapshot
from tests.load.loadgen import Fleet, publish_cycle
from tests.support import free_port, read_topic, settings_env
from tests.unit.factories import EPOCH_A, T0, disk, snap

MiB = 1 << 20
NOW = datetime(2024, 6, 1, 12, tzinfo=UTC)
VM = VmRef(moref="vm-1", name="a", instance_uuid="u1", path="/DC0/vm/a")


def node(moref: str, name: str, description: str, hours_ago: float) -> VmSnapshot:
    return VmSnapshot(vm=VM, moref=moref, name=name, description=description,
                      created=NOW - timedelta(hours=hours_ago))


def test_select_only_old_unneeded_snapshots_of_ours() -> None:
    inventory = [VmSnapshots(vm=VM, consolidation_needed=True, snapshots=[
        node("s1", "cbtstream-20240601T000000Z", SNAPSHOT_DESCRIPTION, 12),  # orphan
        node("s2", "cbtstream-20240601T010000Z", SNAPSHOT_DESCRIPTION, 11),  # needed
        node("s3", "cbtstream-20240601T113000Z", SNAPSHOT_DESCRIPTION, 0.5),  # too young
        node("s4", "cbtstream-backup", "the admin's", 100),  # name alone is not enough
        node("s5", "nightly", SNAPSHOT_DESCRIPTION, 100),  # description alone neither
        node("s6", "cbtstream-20240101T000000Z", "taken by cbtstream", 100),  # older versions
    ])]
    sel = select(inventory, {("u1", "s2")}, NOW, timedelta(hours=6))
    assert [(v.snapshot.moref, v.decision) for v in sel.verdicts] == [
        ("s1", "orphaned"), ("s2", "needed"), ("s3", "too_young"), ("s4", "not_ours"),
        ("s5", "not_ours"), ("s6", "orphaned")]
    assert sel.consolidation_needed == [VM]
    unknown = select(inventory, None, NOW, timedelta(hours=6))
    assert unknown.orphans == [] and {v.decision for v in unknown.verdicts} == {
        "needs_unknown", "not_ours"}


def test_needed_snapshots_are_the_running_and_waiting_ones() -> None:
    d = disk()
    row, _ = on_snapshot(None, snap(d, f"{EPOCH_A}/1", snapshot="snapshot-1"), T0)
    row, _ = on_snapshot(row, snap(d, f"{EPOCH_A}/2", minutes=5, snapshot="snapshot-2"), T0)
    assert row is not None and row.running is not None and row.waiting is not None
    assert needed_snapshots([row]) == {(d.vm_instance_uuid, "snapshot-1"),
                                       (d.vm_instance_uuid, "snapshot-2")}


async def _tree(client: VSphereClient, moref: str) -> VmSnapshots:
    [found] = [v for v in await client.list_snapshots() if v.vm.moref == moref]
    return found


@pytest.mark.integration
async def test_prune_removes_orphans_only_and_publishes_snapshot_removed(
    sim: SimulatorControl, producer_settings: Settings, vm_name: str
) -> None:
    simvm = sim.create_vm(vm_name, [MiB, MiB], cbt=True)
    async with VSphereClient(producer_settings.vsphere) as client, Publisher(
        producer_settings.kafka
    ) as pub:
        vm = await client.find_vm(path=simvm.path)
        admin = await client.create_snapshot(vm, "cbtstream-by-hand", description="admin")
        orphan = (await snapshot_and_publish(client, pub, vm))[0].vm_snapshot
        needed = await client.create_snapshot(vm, snapshot_name(), description=SNAPSHOT_DESCRIPTION)
        sim.set_consolidation_needed(simvm.moref)
        tree = await _tree(client, vm.moref)
        assert tree.consolidation_needed
        sel = select([tree], {(vm.instance_uuid, needed.moref)}, datetime.now(UTC),
                     timedelta(0))
        assert {v.snapshot.moref: v.decision for v in sel.verdicts} == {
            admin.moref: "not_ours", orphan: "orphaned", needed.moref: "needed"}
        removed = await prune(client, pub, sel, consolidate=True)
        after = await _tree(client, vm.moref)
    assert {s.moref for s in after.snapshots} == {admin.moref, needed.moref}
    assert not after.consolidation_needed
    assert [(e.disk.device_key, e.vm_snapshot, e.reason) for e in removed] == [
        (d.key, orphan, RemovalReason.ORPHANED) for d in simvm.disks]
    got = await read_topic(producer_settings, SNAPSHOT_REMOVED, until=lambda ev: len(ev) >= 2)
    assert sorted(got, key=lambda e: e.disk.device_key) == removed


@pytest.mark.integration
async def test_cli_prune_refuses_without_the_worker_and_list_reports(
    sim: SimulatorControl, producer_settings: Settings, vm_name: str
) -> None:
    simvm = sim.create_vm(vm_name, [MiB], cbt=True)
    async with VSphereClient(producer_settings.vsphere) as client, Publisher(
        producer_settings.kafka
    ) as pub:
        orphan = (await snapshot_and_publish(client, pub, simvm.path))[0].vm_snapshot
    await asyncio.sleep(1.1)
    # No worker listens on this port: which snapshots syncs need is unknown.
    env = settings_env(producer_settings) | {"CBTSTREAM_STREAMS__WEB_PORT": str(free_port())}

    async def cli(*argv: str) -> tuple[int, list[dict[str, object]], str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cbtctl.cli", "snapshots", *argv, "--older-than", "1s",
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode is not None
        return proc.returncode, [json.loads(x) for x in out.decode().splitlines()], err.decode()

    rc, docs, _ = await cli("list")
    mine = [d for d in docs if d.get("vm_snapshot") == orphan]
    assert rc == 0 and [d["decision"] for d in mine] == ["needs_unknown"]
    rc, docs, err = await cli("prune")
    assert rc == 1 and "nothing removed" in err
    assert not any(d["type"] == "removed" for d in docs)
    async with VSphereClient(producer_settings.vsphere) as client:
        vm = await client.find_vm(path=simvm.path)
        assert [s.moref for s in (await _tree(client, vm.moref)).snapshots] == [orphan]


@pytest.mark.integration
async def test_the_worker_reconciles_orphans_and_serves_what_syncs_need(
    sim: SimulatorControl, producer_settings: Settings, vm_name: str, tmp_path: Path
) -> None:
    """A running worker with ``streams.orphan_interval_s``: it removes a snapshot of ours that
    no sync needs (``SnapshotRemoved(orphaned)``), keeps the one its running sync needs and the
    admin's, and answers ``GET /api/v1/snapshots/needed`` for ``cbtstream snapshots list``."""
    streams = producer_settings.streams.model_copy(update={
        "orphan_interval_s": 0.5, "orphan_older_than_s": 3, "remove_snapshots": False})
    settings = producer_settings.model_copy(update={"streams": streams})
    simvm = sim.create_vm(vm_name, [MiB], cbt=True)
    worker = Proc(["worker"], settings, tmp_path / "worker.log")
    try:
        async with VSphereClient(settings.vsphere) as client, Publisher(settings.kafka) as pub:
            vm = await client.find_vm(path=simvm.path)
            admin = await client.create_snapshot(vm, "cbtstream-by-hand", description="admin")
            orphan = await client.create_snapshot(vm, snapshot_name(),
                                                  description=SNAPSHOT_DESCRIPTION)
            # published: the worker plans it within the 3 s threshold (a snapshot younger than
            # the threshold is never judged), and with no copier its sync keeps running
            needed = (await snapshot_and_publish(client, pub, vm))[0].vm_snapshot
            def ours(ev: list[Any]) -> list[Any]:  # other tests' VMs share the simulator
                return [e for e in ev if e.disk.vm_instance_uuid == vm.instance_uuid]

            removed = ours(await read_topic(settings, SNAPSHOT_REMOVED, timeout=90,
                                            watch=(worker,), until=lambda ev: bool(ours(ev))))
            assert [(e.vm_snapshot, e.reason) for e in removed] == [
                (orphan.moref, RemovalReason.ORPHANED)]
            await asyncio.sleep(1.5)  # a few more reconcile rounds: nothing else goes
            left = {s.moref for s in (await _tree(client, vm.moref)).snapshots}
        assert left == {admin.moref, needed}
        env = settings_env(settings)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cbtctl.cli", "snapshots", "list", "--older-than", "1s",
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        docs = {d.get("vm_snapshot"): d for d in map(json.loads, out.decode().splitlines())}
        assert proc.returncode == 0, err
        assert docs[needed]["decision"] == "needed"
        assert docs[admin.moref]["decision"] == "not_ours"
    finally:
        worker.stop()


@pytest.mark.integration
async def test_a_worker_catching_up_never_removes_a_snapshot_whose_event_waits(
    sim: SimulatorControl, producer_settings: Settings, vm_name: str, tmp_path: Path
) -> None:
    """A worker started over a backlog (down for a while, or a new one): a snapshot older than
    the threshold whose ``SnapshotTaken`` it has not read yet looks unneeded in its rows. It
    judges nothing until it holds every partition and has processed every snapshot event, then
    removes the real orphan and keeps the snapshot its sync now needs."""
    streams = producer_settings.streams.model_copy(update={
        "orphan_interval_s": 0.3, "orphan_older_than_s": 1, "remove_snapshots": False})
    settings = producer_settings.model_copy(update={"streams": streams})
    simvm = sim.create_vm(vm_name, [MiB], cbt=True)
    fleet = Fleet(uuid.uuid4().hex, 500)
    async with VSphereClient(settings.vsphere) as client, Publisher(settings.kafka) as pub:
        vm = await client.find_vm(path=simvm.path)
        orphan = await client.create_snapshot(vm, snapshot_name(),
                                              description=SNAPSHOT_DESCRIPTION)
        for cycle in range(1, 5):  # 2000 snapshot events of other disks ahead of ours
            await publish_cycle(settings, fleet, cycle, range(fleet.disks))
        needed = (await snapshot_and_publish(client, pub, vm))[0].vm_snapshot
        await asyncio.sleep(1.5)  # both older than the threshold before the worker starts
        worker = Proc(["worker"], settings, tmp_path / "worker.log")
        try:
            def ours(ev: list[Any]) -> list[Any]:
                return [e for e in ev if e.disk.vm_instance_uuid == vm.instance_uuid]

            removed = ours(await read_topic(settings, SNAPSHOT_REMOVED, timeout=120,
                                            watch=(worker,), until=lambda ev: bool(ours(ev))))
            await asyncio.sleep(1.5)  # a few more rounds: nothing else goes
            left = {s.moref for s in (await _tree(client, vm.moref)).snapshots}
        finally:
            worker.stop()
    assert [e.vm_snapshot for e in removed] == [orphan.moref]
    assert left == {needed}
