"""``make demo``: a three-disk VM replicated over three cycles through the whole local pipeline
(worker, copier and audit consumer).

Cycle 1 is a full copy of every disk; cycle 2 is incremental for every disk, each from its own
change ID; before cycle 3 one disk's CBT is reset, so that disk alone goes full again with the
reason ``epoch_changed``. Every replica is compared with its snapshot byte for byte after every
cycle, and the run fails on any mismatch. It ends with the seed's two database queries on the
audit trail. The events stay in Kafka for ``cbtstream replay``.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Literal

from rich.console import Console

from cbtctl.demo.processes import Proc
from cbtctl.demo.report import CycleRow, render
from cbtctl.demo.scenario import Scenario, random_name
from cbtctl.demo.seed import SEED_QUERY_1, SEED_QUERY_2, render_rows, seed_queries
from cbtctl.demo.workload import MiB, Write, initial_fill, scattered
from cbtstream.config import Settings
from cbtstream.errors import StackError
from cbtstream.kafka import create_topics

#: Three disks of different sizes (bytes).
DISK_SIZES = [192 * MiB, 96 * MiB, 48 * MiB]
CYCLES = 3


def stack_settings(settings: Settings, *,
                   exports: Literal["simulator", "vddk"] = "vddk") -> Settings:
    """``settings`` pointed at the local stack's simulator (TLS verified with its certificate),
    with absolute paths so child processes agree with us.

    Snapshot disks are read the production way (``exports="vddk"``): one ``nbdkit`` per disk
    and snapshot running the project's stand-in for the vddk plugin, its sockets below
    ``<stack>/run/vddk`` (short, for unix socket paths), allowed in ``copier.nbd_allow``.
    ``exports="simulator"`` reads the simulator's own NBD server instead.
    """
    from cbtctl.stack.vcsim import VcsimService
    from cbtctl.stack.vddk_standin import STAND_IN

    svc = VcsimService(settings)
    try:
        info = svc.info()
    except OSError as exc:
        raise StackError("the vSphere simulator is not running: run `cbtstream stack up` "
                         "(or `make demo`)") from exc
    vsphere = settings.vsphere.model_copy(
        update={"url": str(info["sdk"]), "cafile": Path(str(info["cert"])), "insecure": False})
    run_dir = settings.stack.dir.resolve() / "run" / "vddk"
    vddk = settings.copier.vddk.model_copy(update={"plugin": str(STAND_IN), "run_dir": run_dir})
    copier = settings.copier.model_copy(update={
        "target_root": settings.copier.target_root.resolve(),
        "state_dir": settings.copier.state_dir.resolve(),
        "progress_interval_s": 0.5,
        "exports": exports,
        "vddk": vddk,
        "nbd_allow": (*settings.copier.nbd_allow, f"unix:{run_dir}/"),
    })
    streams = settings.streams.model_copy(update={"data_dir": settings.streams.data_dir.resolve()})
    return settings.model_copy(update={"vsphere": vsphere, "copier": copier, "streams": streams})


def workload(scenario: Scenario, cycle: int) -> list[Write]:
    assert scenario.vm is not None
    writes: list[Write] = []
    for d in scenario.vm.disks:
        if cycle == 1:
            writes += initial_fill(scenario.rng, d.key, d.capacity)
        else:
            writes += scattered(scenario.rng, d.key, d.capacity)
    return writes


async def verify_replicas(settings: Settings, vm_uuid: str, console: Console) -> bool:
    """Run ``cbtstream verify --vm`` as an operator would: every replica re-hashed and compared
    with the replica digest its last commit names (and the snapshot's export, if it still
    exists)."""
    import subprocess
    import sys

    from cbtctl.demo.processes import child_env

    console.print(f"[bold]cbtstream verify --vm {vm_uuid}[/]: re-hash every replica")
    proc = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "cbtctl.cli", "verify", "--vm", vm_uuid],
        env=child_env(settings), capture_output=True, text=True, timeout=600)
    console.print(proc.stdout.rstrip(), markup=False, highlight=False)
    return proc.returncode == 0


async def run_demo(settings: Settings, console: Console, *, name: str | None = None) -> int:
    from cbtstream.vsphere.simctl import SimulatorControl

    settings = stack_settings(settings)
    state = settings.stack.dir.resolve()
    sim = SimulatorControl.from_state(state / "vcsim")
    await create_topics(settings.kafka)
    name = name or random_name()
    logs = state / "logs"
    console.print(f"[bold]cbtstream demo[/]: VM [cyan]{name}[/] with disks of "
                  f"{', '.join(f'{s // MiB} MiB' for s in DISK_SIZES)}; logs in {logs}")
    procs = [Proc(["worker"], settings, logs / "demo-worker.log"),
             Proc(["copier"], settings, logs / "demo-copier.log"),
             Proc(["audit"], settings, logs / "demo-audit.log")]
    scenario = Scenario(settings, sim, state / "demo" / name, console=console)

    def alive() -> None:
        for p in procs:
            if not p.alive:
                raise StackError(f"{p.args[0]} exited; see {p.log}")

    scenario.check_alive.append(alive)
    rows: list[CycleRow] = []
    try:
        vm = await scenario.create_vm(name, DISK_SIZES)
        reset_key = vm.disks[1].key
        snapshots = []
        for cycle in range(1, CYCLES + 1):
            reset = (reset_key,) if cycle == CYCLES else ()
            note = f" (CBT reset of disk-{reset_key} first)" if reset else ""
            console.print(f"[bold]cycle {cycle}[/]: guest writes, one VM snapshot{note}")
            t0 = time.monotonic()
            result = await scenario.cycle(cycle, workload(scenario, cycle), reset)
            snapshots.append(result.vm_snapshot)
            rows += result.rows
            console.print(f"  {result.vm_snapshot} replicated in {time.monotonic() - t0:.1f}s")
        render(rows, console)
        removed = scenario.watcher.removed if scenario.watcher else None
        if removed is not None:
            await scenario.watcher.wait_for(  # type: ignore[union-attr]
                lambda: all(len(removed(s)) == len(DISK_SIZES) for s in snapshots), 30,
                alive=alive)
            console.print(f"snapshots removed in vSphere: {', '.join(snapshots)}")
        verified = await verify_replicas(settings, vm.instance_uuid, console)
        q1, q2 = await seed_queries(settings, vm.path, vm.name, len(rows))
        render_rows("The seed's query 1 (per-disk change IDs), on the audit trail",
                    SEED_QUERY_1.format(vm_path=vm.path), q1, console)
        render_rows("The seed's query 2 (latest jobs)", SEED_QUERY_2.format(vm_name=vm.name),
                    q2, console)
    finally:
        await scenario.close()
        for p in procs:
            p.stop()
    bad = [r for r in rows if not r.verified]
    if not verified:
        console.print("[red bold]FAILED[/]: cbtstream verify found a replica that differs from "
                      "its last commit")
        return 1
    if bad or len(rows) != CYCLES * len(DISK_SIZES):
        console.print(f"[red bold]FAILED[/]: {len(bad)} replica(s) differ from their snapshot")
        return 1
    console.print("[green bold]OK[/]: every replica equals its snapshot, byte for byte")
    return 0
