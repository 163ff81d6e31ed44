"""Producer and CLI: one snapshot per VM, one SnapshotTaken per disk, on the real broker."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

from cbtstream.config import Settings
from cbtstream.kafka import Publisher
from cbtstream.vsphere.adapter import VSphereClient
from cbtstream.vsphere.simctl import SimulatorControl
from producers.scheduler import parse_interval, run_schedule
from producers.snapshot import snapshot_and_publish
from schemas.events import SnapshotTaken, stable_event_id
from schemas.topics import SNAPSHOT_TAKEN
from tests.support import read_topic, settings_env


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
