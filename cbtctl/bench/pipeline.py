"""``cbtstream bench pipeline``: disks per second through the whole orchestration, and the
latency of one disk, on the real broker with the real worker and a no-op copier.

Each of ``--disks`` disks (``--disks-per-vm`` per VM) gets one ``SnapshotTaken`` (CBT on, first
sync: full). It flows snapshot.taken -> worker (plan, table row with the running sync) ->
sync.planned -> ``cbtstream copier --noop`` -> changeid.committed -> worker (commit guard, table
row with the change ID) -> the table's changelog topic.

Definitions:

- **latency** of a disk: from just before its ``SnapshotTaken`` is handed to the producer to
  the moment this process *receives* the changelog record of the disk's row carrying the
  snapshot's change ID (commit applied). It includes our consumer's fetch delay. With the default
  open-loop burst (``--rate 0``) it is dominated by queueing behind earlier disks; use ``--rate``
  to measure latency below saturation.
- **disks/s**: disks / (last commit observed - first publish).
- **raw rate** (the ceiling): in the same run, the same number of records of the same size
  produced to a one-off topic with the same partitions and consumed by one aiokafka consumer:
  records / (last consumed - first produced). The pipeline makes four hops per disk plus table
  writes, so the ratio is well below 1 even with no overhead of ours.

A warm-up disk is pushed through first (worker and copier started, partitions assigned) and is
not counted; with ``--workers`` > 1 the run first waits for the worker group to be stable and
warms up eight disks per partition. The run uses its own topic prefix and deletes every topic
with it at the end.
The last line is machine-readable::

    disks_per_s=<n> p50_ms=<n> p99_ms=<n> ceiling_ratio=<disks_per_s / raw rate>
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from cbtctl.demo.processes import Proc
from cbtstream.config import Settings
from cbtstream.kafka import client_kwargs, create_topics, topic_name
from schemas.codec import encode
from schemas.disk import DiskRef
from schemas.events import SnapshotTaken
from schemas.topics import SNAPSHOT_TAKEN

_EPOCH = "52 8a b4 5c 7b ab 8e 51-7a 73 16 d1 76 9a 0d a6"


@dataclass
class Options:
    disks: int = 20_000
    disks_per_vm: int = 2
    partitions: int = 4
    rate: float = 0.0
    timeout_s: float = 600.0
    log_level: str = "WARNING"
    keep: bool = False
    #: Publish ``snapshot_device_keys`` (as ``cbtstream snapshot`` does): each VM snapshot is then
    #: tracked through the lifecycle topic and ``snapshots`` table (never removed: no vSphere).
    device_keys: bool = True
    #: Worker processes in the Faust group (each takes a share of the partitions): one Python
    #: process is one core at most, and the worker is the busiest process of the pipeline.
    workers: int = 1


@dataclass
class Result:
    disks: int
    seconds: float
    latencies_ms: list[float]
    raw_per_s: float
    cpu_s: dict[str, float]

    @property
    def disks_per_s(self) -> float:
        return self.disks / self.seconds

    def pct(self, q: float) -> float:
        xs = sorted(self.latencies_ms)
        return xs[min(len(xs) - 1, int(q * len(xs)))]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def snapshot_event(i: int, per_vm: int, run: str, device_keys: bool = True) -> SnapshotTaken:
    vm = str(uuid.uuid5(uuid.NAMESPACE_OID, f"{run}/{i // per_vm}"))
    key = 2000 + i % per_vm
    disk = DiskRef(vm_instance_uuid=vm, vm_path=f"/bench/vm/vm{i // per_vm}",
                   vm_name=f"vm{i // per_vm}", device_key=key, disk_id=f"disk-{key}",
                   backing_uuid=f"6000C29-{i}",
                   backing_file=f"[ds] vm{i // per_vm}/disk_{key}.vmdk", capacity_bytes=1 << 30)
    keys = tuple(2000 + k for k in range(per_vm)) if device_keys else None
    return SnapshotTaken(disk=disk, vcenter="bench", vm_snapshot="snapshot-1",
                         change_id=f"{_EPOCH}/{i + 1}", taken_at=datetime.now(UTC),
                         snapshot_device_keys=keys)


def bench_settings(base: Settings, work: Path, opts: Options) -> Settings:
    data = base.model_dump()
    data["log_level"] = opts.log_level
    data["kafka"] |= {"topic_prefix": f"bench{uuid.uuid4().hex[:8]}.",
                      "partitions": opts.partitions}
    data["streams"] |= {"web_port": _free_port(), "data_dir": work / "faust",
                        "remove_snapshots": False}
    data["copier"] |= {"target_root": work / "replicas", "state_dir": work / "copier"}
    return Settings.model_validate(data)


def worker_settings(settings: Settings, work: Path, i: int) -> Settings:
    """Settings of the ``i``-th worker: its own web port and data directory."""
    data = settings.model_dump()
    data["streams"] |= {"web_port": _free_port(), "data_dir": work / f"faust{i}"}
    return Settings.model_validate(data)


async def wait_group_stable(settings: Settings, members: int, deadline: float) -> None:
    """Wait until the worker group is Stable with ``members`` members (no rebalance left to
    happen while measuring)."""
    group = f"{settings.kafka.topic_prefix}{settings.streams.app_id}"
    admin = AIOKafkaAdminClient(**client_kwargs(settings.kafka))
    await admin.start()
    try:
        while True:
            (resp,) = await admin.describe_consumer_groups([group])
            _, _, state, *_, group_members = resp.groups[0][:6]
            if state == "Stable" and len(group_members) == members:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker group {group}: {state}, {len(group_members)} members")
            await asyncio.sleep(0.5)
    finally:
        await admin.close()


class _ChangelogWatch:
    """Times the first changelog record of each disk whose row has the expected change ID."""

    def __init__(self, settings: Settings) -> None:
        self.topic = f"{settings.kafka.topic_prefix}{settings.streams.app_id}-disks-changelog"
        # Up to 50 ms of fetch wait for 64 KiB of records: when the pipeline is busy this makes
        # far fewer fetch requests than returning every record at once (bench CPU and broker
        # CPU are taken from the machine under test); latencies are at most 50 ms late.
        self.consumer = AIOKafkaConsumer(**client_kwargs(settings.kafka), group_id=None,
                                         enable_auto_commit=False, max_poll_records=5000,
                                         fetch_max_wait_ms=50, fetch_min_bytes=64 * 1024)
        self.expected: dict[bytes, str] = {}
        self.seen: dict[bytes, float] = {}

    async def start(self) -> None:
        await self.consumer.start()
        parts: set[int] | None = None
        while not parts:
            await self.consumer._client.force_metadata_update()
            parts = self.consumer.partitions_for_topic(self.topic)
            if not parts:
                await asyncio.sleep(0.2)
        self.consumer.assign([TopicPartition(self.topic, p) for p in parts])
        await self.consumer.seek_to_beginning()

    async def run(self, want: int, deadline: float) -> None:
        while len(self.seen) < want:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(self.seen)} of {want} disks committed in time")
            batch = await self.consumer.getmany(timeout_ms=200)
            now = time.perf_counter()
            for records in batch.values():
                for r in records:
                    if r.key in self.seen or r.value is None or r.key not in self.expected:
                        continue
                    if json.loads(r.value).get("change_id") == self.expected[r.key]:
                        self.seen[r.key] = now

    async def stop(self) -> None:
        await self.consumer.stop()


async def raw_rate(settings: Settings, n: int, value: bytes, partitions: int) -> float:
    """Records/s of one aiokafka producer -> consumer hop on the same broker."""
    name = f"{settings.kafka.topic_prefix}raw"
    admin = AIOKafkaAdminClient(**client_kwargs(settings.kafka))
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, settings.kafka.replication_factor)])
    finally:
        await admin.close()
    consumer = AIOKafkaConsumer(name, **client_kwargs(settings.kafka), group_id=None,
                                auto_offset_reset="earliest", max_poll_records=5000)
    producer = AIOKafkaProducer(**client_kwargs(settings.kafka), acks="all",
                                enable_idempotence=True, linger_ms=5)
    await consumer.start()
    await producer.start()
    try:
        while not consumer.assignment():
            await consumer.getmany(timeout_ms=100)
        got = 0

        async def consume() -> None:
            nonlocal got
            while got < n:
                batch = await consumer.getmany(timeout_ms=200)
                got += sum(len(v) for v in batch.values())

        reader = asyncio.create_task(consume())
        t0 = time.perf_counter()
        futs = [await producer.send(name, key=str(i).encode(), value=value) for i in range(n)]
        await asyncio.gather(*futs)
        await asyncio.wait_for(reader, 120)
        return n / (time.perf_counter() - t0)
    finally:
        await producer.stop()
        await consumer.stop()


async def delete_topics(settings: Settings) -> int:
    admin = AIOKafkaAdminClient(**client_kwargs(settings.kafka))
    await admin.start()
    try:
        names = [t for t in await admin.list_topics()
                 if t.startswith(settings.kafka.topic_prefix)]
        if names:
            await admin.delete_topics(names)
        return len(names)
    finally:
        await admin.close()


async def _push(settings: Settings, watch: _ChangelogWatch, events: list[SnapshotTaken],
                rate: float) -> dict[bytes, float]:
    """Publish the events (paced at ``rate``/s if > 0); returns the send time per key."""
    producer = AIOKafkaProducer(**client_kwargs(settings.kafka), acks="all",
                                enable_idempotence=True, linger_ms=20)
    topic = topic_name(SNAPSHOT_TAKEN, settings.kafka)
    sent: dict[bytes, float] = {}
    await producer.start()
    try:
        futs = []
        t0 = time.perf_counter()
        for i, ev in enumerate(events):
            key, value, headers = encode(ev)
            assert key is not None and ev.change_id is not None
            watch.expected[key] = ev.change_id
            if rate > 0:
                await asyncio.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
            sent[key] = time.perf_counter()
            futs.append(await producer.send(topic, key=key, value=value, headers=headers))
        await asyncio.gather(*futs)
    finally:
        await producer.stop()
    return sent


async def bench(base: Settings, opts: Options, work: Path) -> Result:
    settings = bench_settings(base, work, opts)
    print(f"topic prefix {settings.kafka.topic_prefix} partitions {opts.partitions} "
          f"disks {opts.disks} device keys {'on' if opts.device_keys else 'off'} "
          f"workers {opts.workers} logs {work}", flush=True)
    await create_topics(settings.kafka)
    workers = [Proc(["worker"], worker_settings(settings, work, i), work / f"worker{i}.log")
               for i in range(opts.workers)]
    copier = Proc(["copier", "--noop"], settings, work / "copier.log")
    procs = [*workers, copier]
    try:
        run = uuid.uuid4().hex
        warm = _ChangelogWatch(settings)
        # With several workers, warm up every partition (several disks each), so each worker
        # has recovered its tables and processed events before the clock starts.
        n_warm = 1 if opts.workers == 1 else 8 * opts.partitions
        events = [snapshot_event(i, opts.disks_per_vm, run, opts.device_keys)
                  for i in range(opts.disks + n_warm)]
        watch = None
        try:
            if opts.workers > 1:
                await wait_group_stable(settings, opts.workers, time.monotonic() + 120)
            await _push(settings, warm, events[:n_warm], 0)
            while True:  # the changelog topic appears once the worker wrote its first row
                try:
                    await asyncio.wait_for(warm.start(), 60)
                    break
                except TimeoutError:
                    if not all(w.alive for w in workers):
                        raise
            await warm.run(n_warm, time.monotonic() + 120)
            print(f"warm-up ({n_warm} disks) committed; measuring", flush=True)
            watch = _ChangelogWatch(settings)
            await watch.start()
            cpu0 = {p: cpu_seconds(p.proc.pid) for p in procs}
            bench0 = time.process_time()
            reader = asyncio.create_task(watch.run(opts.disks, time.monotonic() + opts.timeout_s))
            sent = await _push(settings, watch, events[n_warm:], opts.rate)
            while not reader.done():
                await asyncio.wait([reader], timeout=5)
                for p in procs:
                    if not p.alive:
                        reader.cancel()
                        raise RuntimeError(f"{p.log.name} exited:\n{p.output()[-3000:]}")
                print(f"  {len(watch.seen)}/{opts.disks} committed", flush=True)
            await reader
            cpu: dict[str, float] = {}
            for p in procs:
                cpu[p.args[0]] = cpu.get(p.args[0], 0.0) + cpu_seconds(p.proc.pid) - cpu0[p]
            cpu["bench"] = time.process_time() - bench0
        finally:
            await warm.stop()
            if watch is not None:
                await watch.stop()
        lat = [(watch.seen[k] - t) * 1000 for k, t in sent.items()]
        seconds = max(watch.seen.values()) - min(sent.values())
        value = encode(events[n_warm])[1]
        print("measuring the raw produce->consume rate ...", flush=True)
        raw = await raw_rate(settings, opts.disks, value, opts.partitions)
        return Result(opts.disks, seconds, lat, raw, cpu)
    finally:
        for p in procs:
            p.stop()
        if not opts.keep:
            n = await delete_topics(settings)
            print(f"deleted {n} topics with prefix {settings.kafka.topic_prefix}", flush=True)


def run_pipeline(base: Settings, opts: Options) -> int:
    work = Path(tempfile.mkdtemp(prefix="cbtbench-pipeline-"))
    try:
        res = asyncio.run(bench(base, opts, work))
    except BaseException:
        print(f"logs kept in {work}")
        raise
    shutil.rmtree(work, ignore_errors=True)
    print(f"disks {res.disks} in {res.seconds:.2f} s; latency ms: p50 {res.pct(0.5):.0f} "
          f"p90 {res.pct(0.9):.0f} p99 {res.pct(0.99):.0f} max {max(res.latencies_ms):.0f} "
          f"mean {statistics.fmean(res.latencies_ms):.0f}; raw produce->consume "
          f"{res.raw_per_s:.0f} records/s")
    print("CPU ms per disk: " + " ".join(
        f"{k} {v * 1000 / res.disks:.2f}" for k, v in res.cpu_s.items()) + f"; load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"disks_per_s={res.disks_per_s:.0f} p50_ms={res.pct(0.5):.0f} "
          f"p99_ms={res.pct(0.99):.0f} ceiling_ratio={res.disks_per_s / res.raw_per_s:.3f}")
    return 0
