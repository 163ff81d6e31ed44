"""Load driver: many disks through the real pipeline (worker + ``copier --noop``) for several
cycles, with the table's changelog as the progress signal, and the checks of item 4.

A disk ``i`` belongs to VM ``i // DISKS_PER_VM`` (uuid5 of the run id), device key
``2000 + i % DISKS_PER_VM``; cycle ``c`` snapshots it with change ID ``<disk epoch>/<c>``, so
every cycle after the first must be incremental from the previous one.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from cbtstream.config import Settings
from cbtstream.kafka import client_kwargs, topic_name
from schemas.codec import encode
from schemas.disk import DiskRef
from schemas.events import SnapshotTaken
from schemas.topics import SNAPSHOT_TAKEN

DISKS_PER_VM = 4
_T0 = datetime(2026, 3, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Fleet:
    """The disks of one load run."""

    run: str
    disks: int

    def vm(self, i: int) -> str:
        return str(uuid.uuid5(uuid.NAMESPACE_OID, f"{self.run}/vm{i // DISKS_PER_VM}"))

    def disk(self, i: int) -> DiskRef:
        key = 2000 + i % DISKS_PER_VM
        vm = i // DISKS_PER_VM
        return DiskRef(vm_instance_uuid=self.vm(i), vm_path=f"/load/vm/vm{vm}",
                       vm_name=f"vm{vm}", device_key=key, disk_id=f"disk-{key}",
                       backing_uuid=f"6000C29-{i}",
                       backing_file=f"[ds] vm{vm}/vm{vm}_{key}.vmdk", capacity_bytes=1 << 30)

    def key(self, i: int) -> str:
        return self.disk(i).key

    def change_id(self, i: int, cycle: int) -> str:
        h = uuid.uuid5(uuid.NAMESPACE_OID, f"{self.run}/epoch/{i}").hex
        epoch = " ".join(h[j:j + 2] for j in range(0, 16, 2)) + "-" + " ".join(
            h[j:j + 2] for j in range(16, 32, 2))
        return f"{epoch}/{cycle}"

    def snapshot(self, i: int, cycle: int) -> SnapshotTaken:
        return SnapshotTaken(disk=self.disk(i), vcenter="load", vm_snapshot=f"snapshot-{cycle}",
                             change_id=self.change_id(i, cycle),
                             taken_at=_T0 + timedelta(minutes=cycle))


async def publish_cycle(settings: Settings, fleet: Fleet, cycle: int,
                        indices: range | list[int]) -> None:
    """One snapshot per disk, as fast as the producer takes them."""
    producer = AIOKafkaProducer(**client_kwargs(settings.kafka), acks="all",
                                enable_idempotence=True, linger_ms=5)
    topic = topic_name(SNAPSHOT_TAKEN, settings.kafka)
    await producer.start()
    try:
        futs = []
        for i in indices:
            key, value, headers = encode(fleet.snapshot(i, cycle))
            futs.append(await producer.send(topic, key=key, value=value, headers=headers))
        await asyncio.gather(*futs)
    finally:
        await producer.stop()


@dataclass
class Changelog:
    """Follows the ``disks`` table's changelog: the latest row per disk key."""

    settings: Settings
    rows: dict[bytes, dict[str, object]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        s = self.settings
        self.topic = f"{s.kafka.topic_prefix}{s.streams.app_id}-disks-changelog"
        self.consumer = AIOKafkaConsumer(**client_kwargs(s.kafka), group_id=None,
                                         enable_auto_commit=False, max_poll_records=5000)
        self._assigned = False

    async def start(self) -> None:
        await self.consumer.start()

    async def stop(self) -> None:
        await self.consumer.stop()

    async def _assign(self) -> bool:
        await self.consumer._client.force_metadata_update()
        parts = self.consumer.partitions_for_topic(self.topic)
        if not parts:
            return False
        self.consumer.assign([TopicPartition(self.topic, p) for p in parts])
        await self.consumer.seek_to_beginning()
        self._assigned = True
        return True

    async def wait(self, keys: list[bytes], commits: int, timeout: float,
                   alive: object = None) -> float:
        """Until every key's row has ``commits`` commits and no running sync; returns when
        (monotonic) the last one arrived."""
        deadline = time.monotonic() + timeout
        todo = set(keys)
        last = time.monotonic()
        while todo:
            if time.monotonic() > deadline:
                sample = [(k, self.rows.get(k)) for k in list(todo)[:3]]
                raise TimeoutError(f"{len(todo)} of {len(keys)} disks not at {commits} "
                                   f"commits; e.g. {sample}")
            if callable(alive):
                alive()
            if not self._assigned and not await self._assign():
                await asyncio.sleep(0.5)
                continue
            batch = await self.consumer.getmany(timeout_ms=300)
            for records in batch.values():
                for r in records:
                    if r.value is None:
                        continue
                    row = json.loads(r.value)
                    self.rows[r.key] = row
                    if r.key in todo and row.get("commits") == commits \
                            and row.get("running") is None:
                        todo.discard(r.key)
                        last = time.monotonic()
        return last


def api_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, dict[str, Any] | None]:
    """(status, JSON body) of ``GET <path>`` on a worker's web server; (0, None) if it does not
    answer at all."""
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, None
    except (urllib.error.URLError, OSError, ValueError):
        return 0, None


async def wait_api(port: int, expect: dict[str, str], timeout: float,
                   alive: object = None) -> tuple[float, float]:
    """Poll ``GET /api/v1/disks/<key>`` (one row lookup, routed to the partition's owner) until
    every disk key in ``expect`` answers with its expected change ID. Returns the monotonic times
    of the first HTTP answer of any kind and of the last expected one."""
    deadline = time.monotonic() + timeout
    todo = dict(expect)
    first: float | None = None
    while todo:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(todo)} of {len(expect)} disks not answered by the API")
        if callable(alive):
            alive()
        for key, change_id in list(todo.items()):
            status, doc = await asyncio.to_thread(api_get, port, f"/api/v1/disks/{key}")
            if status and first is None:
                first = time.monotonic()
            if status != 200 or doc is None or doc.get("change_id") != change_id:
                break  # not up, or not recovered yet: wait a little
            del todo[key]
        else:
            continue
        await asyncio.sleep(0.05)
    end = time.monotonic()
    return (first if first is not None else end), end
