"""Crash-test harness: one isolated pipeline ("lane") driven through replication cycles while its
processes are killed with SIGKILL at random points, and an auditor that checks every commit the
moment it is observed.

A lane has its own topic prefix, Faust worker, copier, simulator VM and per-disk models (the
content of each disk as of the latest snapshot). The copier is throttled so a copy lasts about a
second or two and checkpoints every MiB, so kills drawn between 0 and the expected copy time land
before, between and after checkpoints.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cbtctl.demo.processes import Proc
from cbtctl.demo.run import stack_settings
from cbtctl.demo.scenario import Scenario, files_equal
from cbtctl.demo.workload import KiB, MiB, Write, initial_fill, scattered
from cbtstream.config import Settings
from cbtstream.kafka import create_topics
from cbtstream.vsphere.simctl import SimulatorControl
from consumers.replica.location import TargetResolver
from schemas.events import ChangeIdCommitted, SyncFailed, SyncPlanned
from tests.e2e.conftest import Pipeline
from tests.support import isolated_settings

#: Read rate limit per disk copy: the largest full copy lasts about 1.5 s, so kills land mid-copy.
RATE = 8 * MiB
#: Disks of the crash VM: different sizes, one not a multiple of 1 MiB.
SIZES = [24 * MiB, 16 * MiB, 8 * MiB + 64 * KiB]


async def lane_settings(base: Settings, tmp: Path, *, rate: int = RATE) -> Settings:
    """Isolated settings (own topics, dirs, ports) with a throttled, often-checkpointing copier."""
    s = stack_settings(isolated_settings(base, tmp))
    copier = s.copier.model_copy(update={
        "state_dir": tmp / "copier", "checkpoint_bytes": MiB, "max_bytes_per_s": rate,
        "progress_interval_s": 0.5})
    s = s.model_copy(update={"copier": copier})
    await create_topics(s.kafka)
    return s


def chunky(rng: random.Random, key: int, capacity: int, chunks: int) -> list[Write]:
    """``chunks`` random 1 MiB writes plus the awkward small ones of ``scattered``."""
    picked = rng.sample(range(capacity // MiB), min(chunks, capacity // MiB))
    return [Write(key, i * MiB, rng.randbytes(MiB)) for i in picked] + scattered(
        rng, key, capacity, count=4)


def log_lines(proc: Proc, msg: str) -> list[dict[str, Any]]:
    """The JSON log lines of ``proc`` whose ``msg`` is ``msg``."""
    out = []
    needle = f'"msg":"{msg}"'
    for line in proc.output().splitlines():
        if needle in line:
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


def _substance(ev: ChangeIdCommitted) -> dict[str, Any]:
    """A commit without the fields that legitimately differ between two publishes of it."""
    return ev.model_dump(mode="json", exclude={"occurred_at", "duration_s"})


class CommitAuditor:
    """Checks each ``ChangeIdCommitted`` of a lane as soon as the watcher sees it: the replica
    must equal the model of the snapshot being synced *at that moment*; a republished commit
    must be the same fact; a sync has one outcome."""

    def __init__(self, scenario: Scenario) -> None:
        self.sc = scenario
        self.current: str | None = None
        self.commits: dict[uuid.UUID, ChangeIdCommitted] = {}
        self.failures: list[SyncFailed] = []
        self.problems: list[str] = []
        self.checked = 0
        self.duplicates = 0
        self._next = 0
        self._task: asyncio.Task[None] | None = None
        # The background task and the test both drain: one at a time, so a drain that returns
        # has really checked every event seen so far (not left one to the other mid-compare).
        self._draining = asyncio.Lock()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            await self.drain()
            await asyncio.sleep(0.02)

    async def drain(self) -> None:
        """Check every event the watcher has collected so far."""
        async with self._draining:
            await self._drain()

    async def _drain(self) -> None:
        assert self.sc.watcher is not None
        events = self.sc.watcher.events
        while self._next < len(events):
            ev = events[self._next]
            self._next += 1
            if isinstance(ev, ChangeIdCommitted):
                await self._commit(ev)
            elif isinstance(ev, SyncFailed):
                self.failures.append(ev)
        by_sync = {c.sync_id for c in self.commits.values()}
        for f in self.failures:
            if f.sync_id in by_sync:
                msg = f"sync {f.sync_id} committed and failed ({f.reason})"
                if msg not in self.problems:
                    self.problems.append(msg)

    async def _commit(self, ev: ChangeIdCommitted) -> None:
        seen = self.commits.get(ev.event_id)
        if seen is not None:
            self.duplicates += 1
            if _substance(seen) != _substance(ev):
                self.problems.append(f"commit {ev.event_id} republished with other content: "
                                     f"{_substance(seen)} != {_substance(ev)}")
            return
        if any(c.sync_id == ev.sync_id for c in self.commits.values()):
            self.problems.append(f"second distinct commit for sync {ev.sync_id}")
        self.commits[ev.event_id] = ev
        key = ev.disk.device_key
        if ev.vm_snapshot != self.current:
            self.problems.append(f"commit of disk {key} for {ev.vm_snapshot}, "
                                 f"while {self.current} is being synced")
            return
        equal = await asyncio.to_thread(files_equal, self.sc.replica(key), self.sc.model(key))
        self.checked += 1
        if not equal:
            self.problems.append(f"disk {key}: change ID {ev.change_id} committed but the "
                                 f"replica differs from snapshot {ev.vm_snapshot}")


@dataclass
class Kill:
    """Where one SIGKILL landed and what the restarted process did."""

    cycle: int
    delay_s: float
    #: disk key -> durable_until of the checkpoint left behind (only disks without an outcome)
    checkpoints: dict[str, int] = field(default_factory=dict)
    outcomes_before: int = 0
    #: disk key -> resumed_from logged by the restarted copier
    resumed: dict[str, int] = field(default_factory=dict)


@dataclass
class CycleRecord:
    number: int
    vm_snapshot: str
    plans: dict[int, SyncPlanned]
    commits: dict[int, ChangeIdCommitted]
    seconds: float
    kill: Kill | None = None


class Lane:
    """One pipeline and one VM, with SIGKILLs of the copier or the worker during cycles."""

    def __init__(self, name: str, settings: Settings, sim: SimulatorControl, workdir: Path,
                 seed: int) -> None:
        self.name = name
        self.settings = settings
        self.rng = random.Random(seed)
        self.pipeline = Pipeline(settings, workdir / "logs")
        self.scenario = Scenario(settings, sim, workdir / "models", seed=seed, timeout_s=120)
        self.scenario.check_alive.append(self.pipeline.check)
        self.auditor = CommitAuditor(self.scenario)
        self.cycles: list[CycleRecord] = []
        self.kills: list[Kill] = []

    async def start(self, vm_name: str, sizes: list[int] = SIZES, *, copier: bool = True
                    ) -> None:
        if copier:
            self.pipeline.start_copier()
        await self.scenario.create_vm(vm_name, sizes)
        self.auditor.start()

    async def stop(self) -> None:
        await self.auditor.stop()
        await self.scenario.close()
        self.pipeline.stop()

    @property
    def keys(self) -> list[int]:
        assert self.scenario.vm is not None
        return [d.key for d in self.scenario.vm.disks]

    def workload(self, cycle: int) -> list[Write]:
        assert self.scenario.vm is not None
        out: list[Write] = []
        for d in self.scenario.vm.disks:
            if cycle == 1:
                out += initial_fill(self.rng, d.key, d.capacity, fraction=0.6)
            else:
                out += chunky(self.rng, d.key, d.capacity, chunks=max(2, d.capacity // MiB // 2))
        return out

    def expected_copy_s(self, writes: list[Write]) -> float:
        """How long the largest disk's copy of these writes lasts at the lane's rate limit (the
        copier copies a VM's disks at once)."""
        per_disk: dict[int, int] = {}
        for w in writes:
            per_disk[w.device_key] = per_disk.get(w.device_key, 0) + max(len(w.data), MiB)
        return max(per_disk.values()) / (self.settings.copier.max_bytes_per_s or RATE)

    def checkpoints(self, plans: dict[int, SyncPlanned]) -> dict[str, int]:
        """durable_until of every checkpoint file of these plans (after a kill: stable), beside
        each replica's record."""
        out = {}
        targets = TargetResolver(self.settings.copier)
        for plan in plans.values():
            path = targets.locate(plan.disk.key).store.checkpoint(
                plan.disk.key, str(plan.sync_id)).path
            with contextlib.suppress(FileNotFoundError):
                out[plan.disk.key] = int(json.loads(path.read_text())["durable_until"])
        return out

    async def _wait_started(self, proc: Proc, before: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while len(log_lines(proc, "sync started")) <= before:
            self.pipeline.check()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: the copier did not start a sync")
            await asyncio.sleep(0.02)

    async def cycle(self, number: int, *, kill: str | None = None) -> CycleRecord:
        """One cycle; ``kill`` is None, "copier" (SIGKILL mid-copy, restart at once) or
        "worker" (SIGKILL after the snapshot is published, restart at once)."""
        sc, watcher = self.scenario, self.scenario.watcher
        assert watcher is not None
        await self.auditor.drain()
        writes = self.workload(number)
        await sc.write(writes)
        t0 = time.monotonic()
        copier = self.pipeline.copier
        started = len(log_lines(copier, "sync started")) if copier is not None else 0
        events = await sc.snapshot()
        snap = events[0].vm_snapshot
        self.auditor.current = snap
        record: Kill | None = None
        if kill == "copier":
            assert copier is not None
            await self._wait_started(copier, started)
            record = Kill(number, self.rng.uniform(0, self.expected_copy_s(writes)))
            await asyncio.sleep(record.delay_s)
            outcomes = watcher.outcomes(snap)
            copier.kill()
            record.outcomes_before = len(outcomes)
            record.checkpoints = {k: v for k, v in self.checkpoints(watcher.plans(snap)).items()
                                  if int(k.rsplit("-", 1)[1]) not in outcomes}
            self.pipeline.start_copier()
        elif kill == "worker":
            record = Kill(number, self.rng.uniform(0, self.expected_copy_s(writes)))
            await asyncio.sleep(record.delay_s)
            record.outcomes_before = len(watcher.outcomes(snap))
            self.pipeline.worker.kill()
            n = len(list(self.pipeline.logs.glob("worker*.log")))
            self.pipeline.worker = Proc(["worker"], self.settings,
                                        self.pipeline.logs / f"worker-{n + 1}.log")
        await sc.wait(snap, self.keys)
        await self.auditor.drain()
        if kill == "copier" and record is not None:
            assert self.pipeline.copier is not None
            for line in log_lines(self.pipeline.copier, "copied"):
                record.resumed[line["disk_key"]] = int(line["resumed_from"])
        if record is not None:
            self.kills.append(record)
        outcomes = watcher.outcomes(snap)
        commits = {k: o for k, o in outcomes.items() if isinstance(o, ChangeIdCommitted)}
        rec = CycleRecord(number, snap, watcher.plans(snap), commits, time.monotonic() - t0,
                          record)
        self.cycles.append(rec)
        return rec

    def lineage_problems(self) -> list[str]:
        """Every cycle committed every disk; cycle 1 full, later ones incremental from the
        previous cycle's commit of the same disk (no silent full copy, nothing skipped)."""
        problems = []
        prev: dict[int, str] = {}
        for c in self.cycles:
            for key in self.keys:
                commit, plan = c.commits.get(key), c.plans.get(key)
                if commit is None or plan is None:
                    problems.append(f"cycle {c.number} disk {key}: no plan/commit")
                    continue
                want = ("full", "no_previous_commit") if c.number == 1 else (
                    "incremental", "previous_commit")
                got = (str(commit.replication_type), str(commit.reason))
                if got != want:
                    problems.append(f"cycle {c.number} disk {key}: {got}, expected {want}")
                if plan.base_change_id != prev.get(key) or commit.previous_change_id != prev.get(
                        key):
                    problems.append(f"cycle {c.number} disk {key}: base {plan.base_change_id}, "
                                    f"expected {prev.get(key)}")
                prev[key] = commit.change_id
        return problems

    def resume_problems(self) -> list[str]:
        """A sync killed after a saved checkpoint resumed from it (did not start over), unless
        its outcome was already published by the killed copier."""
        problems = []
        for k in self.kills:
            for disk_key, durable in k.checkpoints.items():
                if durable <= 0:
                    continue
                resumed = k.resumed.get(disk_key)
                if resumed is None:
                    continue  # published before the kill, not redone (checked by the auditor)
                if resumed < durable:
                    problems.append(f"cycle {k.cycle} {disk_key}: resumed from {resumed} "
                                    f"after a checkpoint at {durable}")
        return problems
