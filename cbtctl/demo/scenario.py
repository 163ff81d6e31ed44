"""Drives one VM of the simulator through replication cycles on the real pipeline.

A cycle: guest writes (mirrored into a local model of each disk) -> optionally a per-disk CBT
reset -> one VM snapshot published as one ``SnapshotTaken`` per disk -> wait until every disk's
sync finished -> compare every replica with the model, byte for byte. The model holds exactly
what the guest wrote before the snapshot, i.e. the snapshot's content.
"""

from __future__ import annotations

import asyncio
import functools
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

from cbtctl.demo.report import CycleRow
from cbtctl.demo.workload import Write
from cbtctl.watcher import Watcher
from cbtstream.config import Settings
from cbtstream.kafka import Publisher
from cbtstream.vsphere.adapter import VmRef, VSphereClient
from cbtstream.vsphere.simctl import SimulatorControl, SimVm
from consumers.replica.location import TargetResolver
from producers.snapshot import snapshot_and_publish
from schemas.events import ChangeIdCommitted, SnapshotTaken, SyncFailed

_CMP_CHUNK = 8 * 1024 * 1024


def files_equal(a: Path, b: Path) -> bool:
    """Byte-for-byte comparison of two files (sizes included); a missing file is not equal."""
    if not (a.is_file() and b.is_file()) or a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            ca, cb = fa.read(_CMP_CHUNK), fb.read(_CMP_CHUNK)
            if ca != cb:
                return False
            if not ca:
                return True


def _write_model(path: Path, offset: int, data: bytes, size: int | None = None) -> None:
    """Write into a disk model (a sparse file); ``size`` creates it with that size."""
    with open(path, "wb" if size is not None else "r+b") as fh:
        if size is not None:
            fh.truncate(size)
        fh.seek(offset)
        fh.write(data)


@dataclass
class CycleResult:
    vm_snapshot: str
    events: list[SnapshotTaken]
    rows: list[CycleRow]


class Scenario:
    """One simulated VM, its disk models, and the pipeline's view of it."""

    def __init__(self, settings: Settings, sim: SimulatorControl, workdir: Path,
                 *, console: Console | None = None, seed: int | None = None,
                 timeout_s: float = 300.0) -> None:
        self.settings = settings
        self.sim = sim
        self.workdir = workdir
        self.console = console
        self.rng = random.Random(seed)
        self.timeout_s = timeout_s
        self.targets = TargetResolver(settings.copier)
        self.vm: SimVm | None = None
        self.vmref: VmRef | None = None
        self.watcher: Watcher | None = None
        self.client = VSphereClient(settings.vsphere)
        self.publisher = Publisher(settings.kafka)
        self.check_alive: list[object] = []

    # -- setup ----------------------------------------------------------------------------------
    async def create_vm(self, name: str, sizes: list[int], **options: Any) -> SimVm:
        """A VM with CBT on and one disk per size; ``options`` go to the simulator's
        ``create_vm`` (power state, tools, controllers, NICs...)."""
        self.vm = await asyncio.to_thread(
            functools.partial(self.sim.create_vm, name, sizes, cbt=True, **options))
        await self.client.start()
        await self.publisher.start()
        self.vmref = await self.client.find_vm(instance_uuid=self.vm.instance_uuid)
        self.watcher = Watcher(self.settings, self.vm.instance_uuid)
        await self.watcher.start()
        for d in self.vm.disks:
            await asyncio.to_thread(_write_model, self.model(d.key), 0, b"", d.capacity)
        return self.vm

    async def close(self) -> None:
        if self.watcher is not None:
            await self.watcher.stop()
        await self.publisher.stop()
        await self.client.stop()

    def model(self, key: int) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        return self.workdir / f"model-disk-{key}.img"

    def replica(self, key: int) -> Path:
        assert self.vm is not None
        return self.targets.path_for(f"{self.vm.instance_uuid}/disk-{key}")

    def capacity(self, key: int) -> int:
        assert self.vm is not None
        return self.vm.disk(key).capacity

    # -- guest ----------------------------------------------------------------------------------
    async def write(self, writes: list[Write]) -> None:
        """Guest writes into the simulator's live disks, mirrored into the models."""
        assert self.vm is not None
        for w in writes:
            await asyncio.to_thread(self.sim.write, self.vm.moref, w.device_key, w.offset, w.data)
            await asyncio.to_thread(_write_model, self.model(w.device_key), w.offset, w.data)

    async def reset_cbt(self, key: int) -> None:
        """Per-disk CBT reset (as after an ESXi power loss): the disk gets a new epoch."""
        assert self.vm is not None
        await asyncio.to_thread(self.sim.reset_disk_cbt, self.vm.moref, key)

    # -- cycles ---------------------------------------------------------------------------------
    async def snapshot(self) -> list[SnapshotTaken]:
        assert self.vmref is not None
        return await snapshot_and_publish(self.client, self.publisher, self.vmref)

    async def wait(self, vm_snapshot: str, keys: list[int]) -> None:
        """Wait until every disk in ``keys`` finished with ``vm_snapshot``, with progress bars."""
        assert self.watcher is not None
        watcher = self.watcher

        def alive() -> None:
            for check in self.check_alive:
                check()  # type: ignore[operator]

        def done() -> bool:
            return set(keys) <= set(watcher.outcomes(vm_snapshot))

        if self.console is None:
            await watcher.wait_for(done, self.timeout_s, alive=alive)
            return
        # The speed column shows the copier's own figure (SyncProgress.rate_bytes_per_s while
        # it runs, bytes / duration of the commit when done): progress events come every few
        # seconds, too rarely for rich to derive a speed from the bar's samples.
        with Progress(TextColumn("  {task.description}"), BarColumn(), DownloadColumn(True),
                      TextColumn("{task.fields[speed]}"), console=self.console,
                      transient=False) as bars:
            tasks = {k: bars.add_task(f"disk-{k}", total=self.capacity(k), speed="")
                     for k in keys}

            def update() -> None:
                plans = watcher.plans(vm_snapshot)
                progress = watcher.latest_progress({k: str(p.sync_id) for k, p in plans.items()})
                outcomes = watcher.outcomes(vm_snapshot)
                for k, t in tasks.items():
                    if k in outcomes:
                        o = outcomes[k]
                        n = o.bytes_copied + o.bytes_zeroed if isinstance(
                            o, ChangeIdCommitted) else 0
                        rate = n / o.duration_s if isinstance(
                            o, ChangeIdCommitted) and o.duration_s > 0 else 0.0
                        bars.update(t, total=max(n, 1), completed=max(n, 1),
                                    description=f"disk-{k} {type(o).__name__}",
                                    speed=_speed(rate))
                    elif k in progress:
                        bars.update(t, total=progress[k].bytes_total,
                                    completed=progress[k].bytes_done,
                                    speed=_speed(progress[k].rate_bytes_per_s))

            await watcher.wait_for(done, self.timeout_s, on_change=update, alive=alive)
            update()

    async def cycle(self, number: int, writes: list[Write], reset: tuple[int, ...] = ()
                    ) -> CycleResult:
        assert self.vm is not None and self.watcher is not None
        await self.write(writes)
        for key in reset:
            await self.reset_cbt(key)
        events = await self.snapshot()
        vm_snapshot = events[0].vm_snapshot
        keys = [e.disk.device_key for e in events]
        await self.wait(vm_snapshot, keys)
        plans, outcomes = self.watcher.plans(vm_snapshot), self.watcher.outcomes(vm_snapshot)
        rows = []
        for ev in events:
            key = ev.disk.device_key
            plan, out = plans.get(key), outcomes[key]
            base = plan.base_change_id if plan else None
            if isinstance(out, ChangeIdCommitted):
                equal = await asyncio.to_thread(files_equal, self.replica(key), self.model(key))
                row = CycleRow(number, ev.disk.disk_id, str(out.replication_type),
                               str(out.reason), base, out.change_id, out.bytes_copied,
                               ev.disk.capacity_bytes, equal)
            else:
                reason = out.reason if isinstance(out, SyncFailed) else "superseded"
                row = CycleRow(number, ev.disk.disk_id, "-", reason, base, None, 0,
                               ev.disk.capacity_bytes, False, type(out).__name__)
            rows.append(row)
        return CycleResult(vm_snapshot, events, rows)


def _speed(bytes_per_s: float) -> str:
    if bytes_per_s <= 0:
        return ""
    return f"{bytes_per_s / 1e6:,.0f} MB/s" if bytes_per_s >= 1e6 else \
        f"{bytes_per_s / 1e3:,.0f} kB/s"


def random_name(prefix: str = "demo") -> str:
    return f"{prefix}-{os.urandom(3).hex()}"
