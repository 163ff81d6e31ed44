"""Walking skeleton through the real broker: SnapshotTaken -> Faust planner -> copier ->
ChangeIdCommitted -> table, for a VM with two disks, over two cycles.

This is the seed's bug as a regression test: in cycle 2 each disk must be planned incrementally
from **its own** previous change ID (disk-2000 never gets disk-2001's)."""

from __future__ import annotations

import asyncio
import json
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from cbtstream.config import Settings
from cbtstream.kafka import Publisher
from consumers.copier import Copier
from consumers.local import LocalImageExecutor
from schemas import ChangeIdCommitted, DiskRef, SnapshotTaken, SyncPlanned
from schemas.topics import CHANGEID_COMMITTED, SYNC_PLANNED
from tests.support import Proc, read_topic

pytestmark = pytest.mark.integration

VM = "50123456-aaaa-bbbb-cccc-0123456789ab"
EPOCHS = {
    2000: "52 8a b4 5c 7b ab 8e 51-7a 73 16 d1 76 9a 0d a6",
    2001: "52 01 02 03 04 05 06 07-08 09 0a 0b 0c 0d 0e 0f",
}
SIZES = {2000: 3 * 1024 * 1024 + 4096, 2001: 1024 * 1024}


def disk(key: int) -> DiskRef:
    return DiskRef(
        vm_instance_uuid=VM, vm_path="/DatabanxDC/vm/pgtest1", vm_name="pgtest1",
        device_key=key, backing_uuid=f"6000C29-{key}", capacity_bytes=SIZES[key],
        backing_file=f"[datastore1] pgtest1/pgtest1_{key - 2000}.vmdk",
    )


def write_snapshot(root: Path, snapshot: str) -> dict[int, bytes]:
    images = {}
    for key, size in SIZES.items():
        data = os.urandom(size)
        path = root / VM / snapshot / f"disk-{key}.img"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        images[key] = data
    return images


def snapshot_events(snapshot: str, seq: int, minute: int) -> list[SnapshotTaken]:
    return [
        SnapshotTaken(
            disk=disk(key), vcenter="vcsim", vm_snapshot=snapshot,
            change_id=f"{EPOCHS[key]}/{seq}",
            taken_at=datetime(2026, 11, 26, 12, minute, tzinfo=UTC),
        )
        for key in SIZES
    ]


async def test_two_disks_two_cycles_each_disk_uses_its_own_change_id(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    settings = kafka_settings
    source = tmp_path / "snapshots"
    worker = Proc(["worker"], settings, tmp_path / "worker.log")
    try:
        async with Publisher(settings.kafka) as pub:
            copier = Copier(settings, LocalImageExecutor(source, settings.copier.target_root), pub)
            copier_task = asyncio.create_task(copier.run())
            try:
                for cycle, (snap, seq) in enumerate((("snapshot-1", 1), ("snapshot-2", 4)), 1):
                    images = write_snapshot(source, snap)
                    for ev in snapshot_events(snap, seq, cycle):
                        await pub.publish(ev)
                    commits = await read_topic(
                        settings, CHANGEID_COMMITTED, timeout=90,
                        until=lambda evs, n=2 * cycle: len(evs) >= n, watch=(worker,),
                    )
                    for key, data in images.items():
                        replica = settings.copier.target_root / VM / f"disk-{key}.img"
                        assert replica.read_bytes() == data, f"replica of disk-{key} differs"
            finally:
                copier.request_stop()
                await asyncio.wait_for(copier_task, 30)
        plans: list[SyncPlanned] = await read_topic(
            settings, SYNC_PLANNED, until=lambda evs: len(evs) >= 4)
    except BaseException:
        print(worker.output()[-5000:])
        raise
    finally:
        worker.stop()

    by_cycle = {p.vm_snapshot: {} for p in plans}
    for p in plans:
        by_cycle[p.vm_snapshot][p.disk.device_key] = p
    for key in SIZES:
        first, second = by_cycle["snapshot-1"][key], by_cycle["snapshot-2"][key]
        assert first.replication_type == "full" and first.reason == "no_previous_commit"
        assert second.replication_type == "incremental", second
        # the regression: each disk's base is its own previous change ID
        assert second.base_change_id == f"{EPOCHS[key]}/1"
        assert second.previous_change_id == f"{EPOCHS[key]}/1"
    committed: list[ChangeIdCommitted] = commits
    latest = {c.disk.device_key: c for c in committed}
    for key in SIZES:
        assert latest[key].change_id == f"{EPOCHS[key]}/4"
        assert latest[key].previous_change_id == f"{EPOCHS[key]}/1"

    # the table (its changelog) holds each disk's latest committed change ID
    changelog = f"{settings.kafka.topic_prefix}{settings.streams.app_id}-disks-changelog"

    def table_done(recs: list) -> bool:
        rows = {r.key: json.loads(r.value) for r in recs if r.value}
        return all(
            rows.get(f"{VM}/disk-{k}".encode(), {}).get("change_id") == f"{EPOCHS[k]}/4"
            and rows[f"{VM}/disk-{k}".encode()].get("running") is None
            for k in SIZES
        )

    await read_topic(settings, changelog, raw=True, until=table_done, timeout=30)
