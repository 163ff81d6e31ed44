"""The planner's table rebuilt from the log after its changelog is lost (``cbtstream table
rebuild``), on the real broker with a real worker and copier.

Cycle 1 seeds two disks; the worker stops and its changelog topic is deleted (a lost changelog).
The rebuild is refused while a worker runs and onto a changelog that still holds rows; once
written, a new worker plans cycle 2 **incremental** from each disk's own committed change ID (a
worker on an empty table would plan two full copies, ``no_previous_commit``), and the replicas
equal the snapshot's bytes after it."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from cbtctl.replay.table import changelog_topic
from cbtstream.config import Settings
from cbtstream.kafka import Publisher, client_kwargs
from consumers.copier import Copier
from consumers.local import LocalImageExecutor
from schemas import SyncPlanned
from schemas.topics import CHANGEID_COMMITTED, SYNC_PLANNED
from tests.pipeline.test_skeleton import EPOCHS, SIZES, VM, snapshot_events, write_snapshot
from tests.support import Proc, child_env, read_topic

pytestmark = pytest.mark.integration


def rebuild(settings: Settings, *args: str) -> tuple[int, list[dict[str, object]]]:
    done = subprocess.run([sys.executable, "-m", "cbtctl.cli", "table", "rebuild", "--json",
                           *args], env=child_env(settings), capture_output=True, text=True,
                          timeout=120)
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return done.returncode, lines


async def cycle(settings: Settings, pub: Publisher, source: Path, snap: str, seq: int,
                minute: int, commits: int, worker: Proc) -> None:
    """Publish one snapshot of both disks; a copier copies them; wait for ``commits`` in all;
    the replicas equal the snapshot."""
    images = write_snapshot(source, snap)
    copier = Copier(settings, LocalImageExecutor(source, settings.copier.target_root), pub)
    task = asyncio.create_task(copier.run())
    try:
        for ev in snapshot_events(snap, seq, minute):
            await pub.publish(ev)
        await read_topic(settings, CHANGEID_COMMITTED, timeout=90,
                         until=lambda evs: len(evs) >= commits, watch=(worker,))
    finally:
        copier.request_stop()
        await asyncio.wait_for(task, 30)
    for key, data in images.items():
        replica = settings.copier.target_root / VM / f"disk-{key}.img"
        assert replica.read_bytes() == data, f"replica of disk-{key} differs from {snap}"


async def test_lost_changelog_is_rebuilt_and_the_next_sync_stays_incremental(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    settings = kafka_settings
    source = tmp_path / "snapshots"
    topic = changelog_topic(settings)
    worker = Proc(["worker"], settings, tmp_path / "worker-1.log")
    try:
        async with Publisher(settings.kafka) as pub:
            await cycle(settings, pub, source, "snapshot-1", 1, 1, 2, worker)
        code, out = rebuild(settings, "--write")
        assert code == 3 and "running" in str(out[-1]["reason"]), out  # a worker runs
    finally:
        worker.stop()

    code, out = rebuild(settings, "--write")  # the changelog still holds the table
    assert code == 3 and "holds" in str(out[-1]["reason"]), out

    admin = AIOKafkaAdminClient(**client_kwargs(settings.kafka))
    await admin.start()
    try:
        await admin.delete_topics([topic])  # the changelog is lost
    finally:
        await admin.close()

    code, out = rebuild(settings)  # a dry run shows the rows and writes nothing
    rows = {r["disk_key"]: r for r in out if r["type"] == "row"}
    assert code == 0 and out[-1]["written"] is False
    assert {k: r["change_id"] for k, r in rows.items()} == {
        f"{VM}/disk-{k}": f"{EPOCHS[k]}/1" for k in SIZES}
    code, out = rebuild(settings, "--write")
    assert code == 0 and out[-1]["written"] is True and out[-1]["rows"] == 2, out

    worker = Proc(["worker"], settings, tmp_path / "worker-2.log")
    try:
        async with Publisher(settings.kafka) as pub:
            await cycle(settings, pub, source, "snapshot-2", 4, 2, 4, worker)
        plans: list[SyncPlanned] = await read_topic(settings, SYNC_PLANNED,
                                                    until=lambda evs: len(evs) >= 4)
    except BaseException:
        print(worker.output()[-5000:])
        raise
    finally:
        worker.stop()
    second = {p.disk.device_key: p for p in plans if p.vm_snapshot == "snapshot-2"}
    assert len(plans) == 4  # cycle 1 was not planned again by the new worker
    for key in SIZES:
        assert second[key].replication_type == "incremental", second[key]
        assert second[key].base_change_id == f"{EPOCHS[key]}/1"
