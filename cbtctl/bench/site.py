"""``cbtstream bench site``: a site in miniature, end to end, and its figures.

A private vSphere simulator (its own port and state, so the run's VMs are the only ones a
policy's name pattern matches) holds ``--vms`` VMs of ``--disks-per-vm`` disks, sizes mixed
(most small, every 20th disk 8x, every 100th 32x), each filled with random data. The run has
its own topics (a fresh prefix, deleted at the end) and starts, as real processes:

* ``--workers`` planner workers (one Faust group), the pool ``site`` as ``[pools]`` default;
* ``--copiers`` copiers in the pool ``site`` with ``storage = "shared"`` (one target root, a
  host name and a state dir each), every copy rate-limited to ``--rate`` bytes/s;
* one ``cbtstream schedule`` with a policy over the run's VMs (by name pattern), an RPO of
  ``--rpo`` seconds and a slot every ``--every`` seconds (compressed time).

Seeding: every disk's first commit. Then ``--cycles`` cycles: guest writes into a third of the
disks, then wait for every disk's first commit of a snapshot taken after the writes. With
``--restart``, one worker is restarted (SIGTERM, start) in the second cycle and one copier killed
(SIGKILL) and started again in the third. With ``--churn``, in every cycle instead: a few seconds
(0-8, random) after the writes, one copier of the pool, chosen at random, is killed and started
again, and in every other cycle a worker is restarted too (the run that found a copy cancelled by a
rebalance leaving its replica locked). At the end the scheduler stops, every VM snapshot must be
removed by the pipeline, and every replica is compared byte for byte with its model (the writes
applied to a sparse file).

Printed, last line JSON: seeding time against the ideal (allocated bytes over the copiers'
aggregate rate: copiers x ``copier.max_parallel_disks`` x ``--rate``), per-cycle p50/p99/max
snapshot-to-commit, the scheduler's RPO reports (snapshots taken, at risk, missed), snapshots
left on VMs, recopies after seeding, failures by reason, replicas that differ, and planner and
copier CPU seconds per disk-cycle.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import shutil
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from cbtctl import sitestatus
from cbtctl.bench.pipeline import _free_port, cpu_seconds, delete_topics
from cbtctl.bench.sitefigures import CycleFigures, Observed, cycle_figures
from cbtctl.demo.processes import Proc
from cbtctl.demo.scenario import files_equal
from cbtctl.demo.workload import KiB, MiB, Write, scattered
from cbtctl.stack.vcsim import VcsimService
from cbtstream.config import Settings, StackSettings
from cbtstream.kafka import client_kwargs, create_topics, topic_name
from cbtstream.vsphere.adapter import VSphereClient
from cbtstream.vsphere.simctl import SimulatorControl, SimVm
from schemas.codec import EventDecodeError, decode
from schemas.events import (
    ChangeIdCommitted,
    ScheduleEvent,
    SnapshotTaken,
    SyncFailed,
    SyncPlanned,
)
from schemas.topics import (
    CHANGEID_COMMITTED,
    SCHEDULE_EVENTS,
    SNAPSHOT_TAKEN,
    SYNC_FAILED,
    SYNC_PLANNED,
)

POOL = "site"


@dataclass
class SiteOptions:
    vms: int = 1000
    disks_per_vm: int = 3
    #: Size of a small disk; every 20th disk is 8x, every 100th 32x.
    disk_bytes: int = 1 * MiB
    cycles: int = 5
    workers: int = 2
    copiers: int = 3
    #: Per-copy read rate of the copiers (bytes/s).
    rate: int = 8 * MiB
    rpo_s: float = 120.0
    every_s: float = 20.0
    partitions: int = 8
    restart: bool = True
    #: A copier killed in every cycle and a worker restarted in every other (module docstring).
    churn: bool = False
    timeout_s: float = 1800.0
    seed: int = 20_261_207
    log_level: str = "WARNING"
    #: Keep the work directory (logs, replicas, models).
    keep: bool = False


@dataclass
class SiteResult:
    vms: int
    disks: int
    allocated_bytes: int
    seeding_s: float
    ideal_seeding_s: float
    cycles: list[CycleFigures]
    schedule: dict[str, int]
    failures: dict[str, int]
    #: VM snapshots the scheduler took per VM (seeding and cycles).
    snapshots_per_vm: float
    snapshots_left: int
    recopies_after_seeding: int
    replicas_differing: int
    bytes_copied: int
    planner_cpu_s_per_disk_cycle: float
    copier_cpu_s_per_disk_cycle: float
    runtime_s: float
    #: ``GET /api/v1/status`` after the last cycle, asked of the last worker: the time of the
    #: summary alone and of every disk, and the summary (its ``rpo`` and ``policies``).
    status_summary_s: float = 0.0
    status_every_disk_s: float = 0.0
    status: dict[str, Any] | None = None

    def line(self) -> str:
        """The figures as one JSON line (the bench's last line)."""
        doc = {
            "vms": self.vms, "disks": self.disks, "allocated_bytes": self.allocated_bytes,
            "seeding_s": self.seeding_s, "ideal_seeding_s": self.ideal_seeding_s,
            "seeding_vs_ideal": round(self.seeding_s / self.ideal_seeding_s, 2)
            if self.ideal_seeding_s else None,
            "cycles": [asdict(c) for c in self.cycles], "schedule": self.schedule,
            "failures": self.failures, "snapshots_per_vm": self.snapshots_per_vm,
            "snapshots_left": self.snapshots_left,
            "recopies_after_seeding": self.recopies_after_seeding,
            "replicas_differing": self.replicas_differing, "bytes_copied": self.bytes_copied,
            "planner_cpu_s_per_disk_cycle": self.planner_cpu_s_per_disk_cycle,
            "copier_cpu_s_per_disk_cycle": self.copier_cpu_s_per_disk_cycle,
            "runtime_s": self.runtime_s,
            "status_summary_s": self.status_summary_s,
            "status_every_disk_s": self.status_every_disk_s,
            "status_rpo": self.status["rpo"] if self.status else None,
            "status_policies": self.status["policies"] if self.status else None,
        }
        return json.dumps(doc, separators=(",", ":"))


@dataclass
class _Disk:
    vm: SimVm
    key: int
    capacity: int
    model: Path

    @property
    def disk_key(self) -> str:
        return f"{self.vm.instance_uuid}/disk-{self.key}"


def _sizes(opts: SiteOptions, vm_index: int) -> list[int]:
    out = []
    for d in range(opts.disks_per_vm):
        n = vm_index * opts.disks_per_vm + d
        factor = 32 if n % 100 == 99 else 8 if n % 20 == 19 else 1
        out.append(opts.disk_bytes * factor)
    return out


def _fill(rng: random.Random, key: int, capacity: int) -> list[Write]:
    """About 40% of the disk in 64 KiB-aligned runs, and its last 4 KiB."""
    writes = []
    for _ in range(max(1, capacity // (256 * KiB))):
        length = rng.choice([64 * KiB, 128 * KiB])
        offset = rng.randrange(0, (capacity - length) // (64 * KiB) + 1) * 64 * KiB
        writes.append(Write(key, offset, rng.randbytes(length)))
    writes.append(Write(key, capacity - 4 * KiB, rng.randbytes(4 * KiB)))
    return writes


class _Watch:
    """Reads the run's snapshots, commits, failures and schedule events as they come."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.seen = Observed()
        self.consumer = AIOKafkaConsumer(**client_kwargs(settings.kafka), group_id=None,
                                         enable_auto_commit=False, max_poll_records=5000)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.consumer.start()
        k = self.settings.kafka
        tps = [TopicPartition(topic_name(spec, k), p)
               for spec in (SNAPSHOT_TAKEN, SYNC_PLANNED, CHANGEID_COMMITTED, SYNC_FAILED,
                            SCHEDULE_EVENTS)
               for p in range(k.partitions)]
        self.consumer.assign(tps)
        await self.consumer.seek_to_beginning()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            batch = await self.consumer.getmany(timeout_ms=200)
            for records in batch.values():
                for r in records:
                    if r.value is None:
                        continue
                    if r.topic.endswith(SCHEDULE_EVENTS.name):  # keyed by VM, not by disk
                        with contextlib.suppress(ValueError):
                            kind = ScheduleEvent.model_validate_json(r.value).kind
                            self.seen.schedule[str(kind)] += 1
                        continue
                    try:
                        ev = decode(r.value, key=r.key, expect=(
                            SnapshotTaken, SyncPlanned, ChangeIdCommitted, SyncFailed))
                    except EventDecodeError:
                        continue
                    if isinstance(ev, SnapshotTaken):
                        self.seen.add_snapshot(ev)
                    elif isinstance(ev, ChangeIdCommitted):
                        self.seen.add_commit(ev)
                    elif isinstance(ev, SyncPlanned):
                        self.seen.add_plan(ev)
                    elif isinstance(ev, SyncFailed):
                        self.seen.failures[str(ev.reason)] += 1
                        self.seen.failed.setdefault(ev.disk.key, []).append(
                            f"{ev.reason} {ev.vm_snapshot}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        try:
            await self.consumer.stop()
        except asyncio.CancelledError:
            # aiokafka's fetcher re-raises the cancellation of its own fetch task when it is
            # closed during a broker error (a 57-minute soak lost its figures to it): only a
            # cancellation of this task is ours to pass on
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
        except KafkaError as exc:
            print(f"watch: stopping the consumer: {exc!r}")


class Site:
    """The processes of one run and the simulator they use."""

    def __init__(self, base: Settings, work: Path, opts: SiteOptions) -> None:
        self.opts = opts
        self.work = work
        self.logs = work / "logs"
        self.vcsim = VcsimService(Settings(stack=StackSettings(dir=work / "stack")),
                                  port=_free_port())
        self.base = base
        self.settings = base  # set by start_simulator
        self.run = ""
        self.workers: list[Proc] = []
        #: The settings of each worker now running (their API ports).
        self.worker_settings: list[Settings] = []
        self.copiers: dict[str, Proc] = {}
        self.scheduler: Proc | None = None
        self.cpu: dict[str, float] = {"planner": 0.0, "copier": 0.0}
        self.restarts = 0

    # -- settings -------------------------------------------------------------------------------
    def _settings(self) -> Settings:
        o, w = self.opts, self.work
        data = self.base.model_dump()
        data["log_level"] = o.log_level
        data["kafka"] |= {"topic_prefix": f"site{uuid.uuid4().hex[:8]}.",
                          "partitions": o.partitions}
        data["vsphere"] |= {"url": self.vcsim.sdk_url, "cafile": self.vcsim.cert_file,
                            "insecure": False}
        data["streams"] |= {"data_dir": w / "faust", "remove_snapshots": True}
        # the copiers find the simulator's side channel (exports) through the stack dir
        data["stack"] |= {"dir": w / "stack"}
        data["pools"] = {"default": POOL, "assign": ()}
        data["copier"] |= {"pool": POOL, "storage": "shared", "target_root": w / "replicas",
                           "exports": "simulator", "max_bytes_per_s": o.rate,
                           "metrics_port": 0, "progress_interval_s": 1.0}
        data["schedule"] = {"tick_s": 1.0, "metrics_port": 0, "policies": [{
            "name": "site", "names": [f"{self.run}-*"], "rpo_s": o.rpo_s,
            "every_s": o.every_s}]}
        return Settings.model_validate(data)

    def _worker_settings(self, i: int) -> Settings:
        data = self.settings.model_dump()
        data["streams"] |= {"web_port": _free_port(), "data_dir": self.work / f"faust{i}"}
        return Settings.model_validate(data)

    def _copier_settings(self, name: str) -> Settings:
        data = self.settings.model_dump()
        data["copier"] |= {"host": f"site-{name}", "state_dir": self.work / f"copier-{name}"}
        return Settings.model_validate(data)

    # -- the simulator and its VMs --------------------------------------------------------------
    def start_simulator(self) -> SimulatorControl:
        self.run = f"site{uuid.uuid4().hex[:6]}"
        self.vcsim.install()
        self.vcsim.start()
        self.vcsim.wait_ready(60)
        self.settings = self._settings()
        return SimulatorControl(self.vcsim.side_channel_url, cafile=self.vcsim.cert_file)

    def create_vms(self, sim: SimulatorControl, rng: random.Random) -> list[_Disk]:
        """Create the VMs and fill their disks (and the models) in parallel."""
        o = self.opts
        seeds = [rng.randrange(1 << 30) for _ in range(o.vms)]

        def one(i: int) -> list[_Disk]:
            r = random.Random(seeds[i])
            vm = sim.create_vm(f"{self.run}-{i:05d}", _sizes(o, i), cbt=True)
            out = []
            for d in vm.disks:
                model = self.work / "models" / vm.instance_uuid / f"disk-{d.key}.img"
                model.parent.mkdir(parents=True, exist_ok=True)
                with open(model, "wb") as f:
                    f.truncate(d.capacity)
                disk = _Disk(vm, d.key, d.capacity, model)
                self.write(sim, disk, _fill(r, d.key, d.capacity))
                out.append(disk)
            return out

        with ThreadPoolExecutor(8) as pool:
            return [d for ds in pool.map(one, range(o.vms)) for d in ds]

    @staticmethod
    def write(sim: SimulatorControl, disk: _Disk, writes: list[Write]) -> None:
        with open(disk.model, "r+b") as f:
            for w in writes:
                sim.write(disk.vm.moref, disk.key, w.offset, w.data)
                f.seek(w.offset)
                f.write(w.data)

    # -- processes ------------------------------------------------------------------------------
    def start_worker(self, i: int) -> None:
        self.worker_settings.append(self._worker_settings(i))
        self.workers.append(Proc(["worker"], self.worker_settings[-1],
                                 self.logs / f"worker-{i}-{len(self.workers)}.log"))

    def start_copier(self, name: str) -> None:
        n = sum(1 for p in self.logs.glob(f"copier-{name}-*.log"))
        self.copiers[name] = Proc(["copier"], self._copier_settings(name),
                                  self.logs / f"copier-{name}-{n}.log")

    def start_scheduler(self) -> None:
        self.scheduler = Proc(["schedule"], self.settings, self.logs / "schedule.log")

    def _charge(self, role: str, p: Proc) -> None:
        self.cpu[role] += cpu_seconds(p.proc.pid)

    def restart_worker(self, i: int) -> None:
        p = self.workers[i]
        self._charge("planner", p)
        p.stop()
        self.restarts += 1
        self.worker_settings[i] = self._worker_settings(100 * self.restarts + i)
        self.workers[i] = Proc(["worker"], self.worker_settings[i],
                               self.logs / f"worker-{i}-restart-{self.restarts}.log")

    def kill_copier(self, name: str) -> None:
        p = self.copiers[name]
        self._charge("copier", p)
        p.kill()
        self.start_copier(name)

    def check(self) -> None:
        for p in (*self.workers, *self.copiers.values(),
                  *([self.scheduler] if self.scheduler else [])):
            if not p.alive:
                raise RuntimeError(f"{p.log.name} exited:\n{p.output()[-3000:]}")

    def stop(self) -> None:
        if self.scheduler is not None:
            self.scheduler.stop()
        for p in self.copiers.values():
            if p.alive:
                self._charge("copier", p)
            p.stop()
        for p in self.workers:
            if p.alive:
                self._charge("planner", p)
            p.stop()
        self.vcsim.stop()


def _guest(site: Site, sim: SimulatorControl, disks: list[_Disk], rng: random.Random) -> None:
    """One cycle's guest writes (a few scattered writes per disk, one of them zeroes), eight
    disks at a time (each write is a request to the simulator)."""
    work = [(d, scattered(rng, d.key, d.capacity, count=4)) for d in disks]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda dw: site.write(sim, *dw), work))


def _diagnosis(site: Site, seen: Observed, missing: list[_Disk], after: datetime) -> str:
    """What the events and the processes' logs say of the first disks a cycle still waits for
    (a time-out in CI leaves nothing else to read)."""
    lines = [f"{len(missing)} disks without a commit of a snapshot taken after "
             f"{after.isoformat()}:"]
    logs: dict[str, list[str]] = {}
    for log in sorted(site.logs.glob("*.log")):  # read once, searched per disk
        with contextlib.suppress(OSError):
            logs[log.name] = log.read_text(errors="replace").splitlines()
    for d in missing[:5]:
        lines.append(seen.story(d.disk_key, after))
        for name, text in logs.items():
            hits = [ln for ln in text if d.disk_key in ln or d.vm.name in ln]
            lines += [f"  {name}: {ln[:400]}" for ln in hits[-6:]]
    return "\n".join(lines)


async def _wait(done: Any, site: Site, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        site.check()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not done after {timeout_s:.0f}s")
        await asyncio.sleep(0.5)


def _status(settings: Settings) -> tuple[float, float, dict[str, Any]]:
    """A worker's ``GET /api/v1/status``: the seconds of the summary alone and of every disk,
    and the summary (blocking; a worker restarted during the run may still be rebalancing:
    asked again for up to a minute)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            t = time.monotonic()
            doc = sitestatus.fetch(settings, disks=False)
            summary_s = time.monotonic() - t
            t = time.monotonic()
            sitestatus.fetch(settings)
            return summary_s, time.monotonic() - t, doc["summary"]
        except sitestatus.NoWorker:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


async def _snapshots_left(settings: Settings, run: str) -> list[str]:
    """The snapshots still on the site's VMs, as ``vm/moref name created``."""
    async with VSphereClient(settings.vsphere) as client:
        return [f"{v.vm.name}/{s.moref} {s.name} {s.created.isoformat()}"
                for v in await client.list_snapshots() if v.vm.name.startswith(f"{run}-")
                for s in v.snapshots]


async def run_site(base: Settings, opts: SiteOptions, work: Path | None = None,
                   report: Any = print) -> SiteResult:
    """Run the site and return its figures (``report`` gets progress lines)."""
    t0 = time.monotonic()
    own = work is None
    work = Path(tempfile.mkdtemp(prefix="cbtsite")) if work is None else work
    site = Site(base, work, opts)
    rng = random.Random(opts.seed)
    sim = await asyncio.to_thread(site.start_simulator)
    settings = site.settings
    watch: _Watch | None = None
    try:
        disks = await asyncio.to_thread(site.create_vms, sim, rng)
        keys = [d.disk_key for d in disks]
        report(f"{opts.vms} VMs, {len(disks)} disks created in {time.monotonic() - t0:.0f}s")
        await create_topics(settings.kafka)
        watch = _Watch(settings)
        await watch.start()
        for i in range(opts.workers):
            site.start_worker(i)
        for i in range(opts.copiers):
            site.start_copier(chr(ord("a") + i))
        await asyncio.sleep(5)  # the groups form before the first slot
        seed_start = datetime.now(UTC)
        site.start_scheduler()
        seen = watch.seen
        await _wait(lambda: seen.seeded(keys), site, opts.timeout_s, "seeding")
        firsts = [seen.commits[k][0] for k in keys]
        seeding_s = (max(c.occurred_at for c in firsts) - seed_start).total_seconds()
        report(f"seeded in {seeding_s:.1f}s")
        cycles: list[CycleFigures] = []
        for c in range(1, opts.cycles + 1):
            written = rng.sample(disks, max(1, len(disks) // 3))
            await asyncio.to_thread(_guest, site, sim, written, random.Random(rng.random()))
            after = datetime.now(UTC)
            if opts.churn:
                await asyncio.sleep(rng.uniform(0, 8))  # into the cycle's copies, or not
                if c % 2 == 0:
                    site.restart_worker(rng.randrange(opts.workers))
                site.kill_copier(chr(ord("a") + rng.randrange(opts.copiers)))
            elif opts.restart and c == 2:
                site.restart_worker(0)
            elif opts.restart and c == 3:
                site.kill_copier("a")
            try:
                await _wait(lambda a=after: all(seen.first_commit_after(k, a) for k in keys),
                            site, opts.timeout_s, f"cycle {c}")
            except TimeoutError:
                report(_diagnosis(site, seen, [d for d in disks
                                               if not seen.first_commit_after(d.disk_key, after)],
                                  after))
                raise
            got = [seen.first_commit_after(k, after) for k in keys]
            cycles.append(cycle_figures(c, [g for g in got if g is not None], seen))
            report(json.dumps(asdict(cycles[-1])))
        summary_s, every_s, status = await asyncio.to_thread(_status, site.worker_settings[-1])
        report(f"status: summary {summary_s:.2f}s, every disk {every_s:.2f}s: "
               f"{json.dumps(status['policies'])}")
        assert site.scheduler is not None
        site.scheduler.stop()
        still: list[str] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            still = await _snapshots_left(settings, site.run)
            if not still:
                break
            await asyncio.sleep(2)
        left = len(still)
        for line in still[:20]:
            report(f"snapshot left: {line}")
        differing = [d.disk_key for d in disks
                     if not files_equal(settings.copier.target_root / d.vm.instance_uuid
                                        / f"disk-{d.key}.img", d.model)]
        allocated = sum(seen.commits[k][0].bytes_copied for k in keys)
        aggregate = opts.copiers * settings.copier.max_parallel_disks * opts.rate
        site.stop()
        disk_cycles = len(disks) * (opts.cycles + 1)
        result = SiteResult(
            vms=opts.vms, disks=len(disks), allocated_bytes=allocated,
            seeding_s=round(seeding_s, 1), ideal_seeding_s=round(allocated / aggregate, 1),
            cycles=cycles, schedule=dict(seen.schedule), failures=dict(seen.failures),
            snapshots_per_vm=round(len({(k, s) for k, s in seen.taken}) / len(disks), 2),
            snapshots_left=left, recopies_after_seeding=seen.recopies_after_seeding(),
            replicas_differing=len(differing), bytes_copied=seen.bytes_copied(),
            planner_cpu_s_per_disk_cycle=round(site.cpu["planner"] / disk_cycles, 4),
            copier_cpu_s_per_disk_cycle=round(site.cpu["copier"] / disk_cycles, 4),
            runtime_s=round(time.monotonic() - t0, 1), status_summary_s=round(summary_s, 3),
            status_every_disk_s=round(every_s, 3), status=status)
        report(f"SITE {result.line()}")  # before the clean-up, which may fail
        return result
    finally:
        if watch is not None:
            await watch.stop()
        site.stop()
        await delete_topics(settings)
        if own and not opts.keep:
            shutil.rmtree(work, ignore_errors=True)
