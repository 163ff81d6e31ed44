"""Failover and failback of a 2-disk VM on the real stack (``cbtstream failover``).

1. A first sync; both replicas equal their models.
2. ``cbtstream failover VM``: both replicas handed over. The next snapshot of the VM is refused
   by the planner (``SyncFailed(vm_failed_over)``, no plan) and its VM snapshot is removed.
3. A newer plan for one disk produced by hand with kcat (as a rogue or stale planner would): the
   copier refuses it (``replica_failed_over``) and the replica is unchanged, byte for byte.
4. The operator writes into the other replica while failed over (a VM booted from it).
5. ``failover --undo``: the untouched replica returns as it is, the written one is marked for a
   full copy. The next sync is incremental for the first and full (``replica_mismatch``) for the
   second, and both replicas equal their models.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid

import pytest

from cbtctl.demo.processes import child_env
from cbtctl.demo.scenario import Scenario, files_equal, random_name
from cbtctl.demo.workload import MiB, initial_fill, scattered
from cbtstream.config import Settings
from cbtstream.kafka import topic_name
from schemas.events import (
    ChangeIdCommitted,
    FailureReason,
    FullReason,
    ReplicationType,
    SyncFailed,
    SyncPlanned,
)
from schemas.topics import SYNC_PLANNED
from tests.e2e.conftest import Pipeline

pytestmark = pytest.mark.integration


def failover(settings: Settings, *args: str) -> tuple[int, list[dict[str, object]], str]:
    out = subprocess.run([sys.executable, "-m", "cbtctl.cli", "failover", "--json", *args],
                         env=child_env(settings), capture_output=True, text=True, timeout=300)
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return out.returncode, rows, out.stdout + out.stderr


def produce_plan(settings: Settings, plan: SyncPlanned) -> None:
    """Produce a plan by hand, as an operator would with kcat (murmur2, like the pipeline)."""
    subprocess.run(
        ["kcat", "-P", "-b", settings.kafka.bootstrap_servers, "-X", "partitioner=murmur2_random",
         "-t", topic_name(SYNC_PLANNED, settings.kafka), "-k", plan.disk.key],
        input=plan.model_dump_json().encode() + b"\n", check=True, timeout=30)


async def test_failover_refuses_every_write_and_failback_resumes(
        scenario: Scenario, pipeline: Pipeline) -> None:
    settings = pipeline.settings
    await scenario.create_vm(random_name("e2e-failover"), [4 * MiB, 2 * MiB])
    assert scenario.vm is not None and scenario.watcher is not None
    w = scenario.watcher
    vm = scenario.vm.instance_uuid
    kept, used = (d.key for d in scenario.vm.disks)
    keys = [kept, used]
    await scenario.write([x for d in scenario.vm.disks
                          for x in initial_fill(scenario.rng, d.key, d.capacity, 0.5)])
    pipeline.start_copier()
    first = await scenario.snapshot()
    snap1 = first[0].vm_snapshot
    await scenario.wait(snap1, keys)
    for k in keys:
        assert files_equal(scenario.replica(k), scenario.model(k))
    plan1 = w.plans(snap1)[kept]

    # 2. fail over: the planner plans nothing for the VM
    rc, rows, text = failover(settings, vm, "--reason", "DR test")
    assert rc == 0, text
    assert sorted((r["disk_key"], r["result"]) for r in rows) == sorted(
        (f"{vm}/disk-{k}", "failed_over") for k in keys), text
    await asyncio.sleep(3)  # the workers' hold books read the hold (a long poll: milliseconds)
    kept_bytes = scenario.replica(kept).read_bytes()
    await scenario.write([x for d in scenario.vm.disks
                          for x in scattered(scenario.rng, d.key, d.capacity)])
    second = await scenario.snapshot()
    snap2 = second[0].vm_snapshot
    await scenario.wait(snap2, keys)
    refused = w.outcomes(snap2)
    assert all(isinstance(o, SyncFailed) and o.reason == FailureReason.VM_FAILED_OVER
               for o in refused.values()), refused
    assert w.plans(snap2) == {}
    await w.wait_for(lambda: w.removed(snap2) == set(keys), 60, alive=pipeline.check)

    # 3. a newer plan produced by hand: refused by the copier, the replica untouched
    rogue = plan1.model_copy(update={"sync_id": uuid.uuid4(),
                                     "generation": plan1.generation + 10**9})
    produce_plan(settings, rogue)
    await w.wait_for(lambda: any(isinstance(e, SyncFailed) and e.sync_id == rogue.sync_id
                                 for e in w.events), 60, alive=pipeline.check)
    [refusal] = [e for e in w.events if isinstance(e, SyncFailed) and e.sync_id == rogue.sync_id]
    assert refusal.reason == FailureReason.REPLICA_FAILED_OVER, refusal
    assert scenario.replica(kept).read_bytes() == kept_bytes

    # 4. the operator's VM writes into the other replica
    with open(scenario.replica(used), "r+b") as fh:
        fh.seek(4096)
        fh.write(b"booted in the DR site" * 100)

    # 5. fail back, then the next sync
    rc, rows, text = failover(settings, vm, "--undo")
    assert rc == 0, text
    results = {r["disk_key"]: r["result"] for r in rows}
    assert results == {f"{vm}/disk-{kept}": "failed_back", f"{vm}/disk-{used}": "resync"}, text
    await asyncio.sleep(3)
    await scenario.write([x for d in scenario.vm.disks
                          for x in scattered(scenario.rng, d.key, d.capacity)])
    third = await scenario.snapshot()
    snap3 = third[0].vm_snapshot
    await scenario.wait(snap3, keys)
    done = w.outcomes(snap3)
    assert all(isinstance(o, ChangeIdCommitted) for o in done.values()), done
    a, b = done[kept], done[used]
    assert isinstance(a, ChangeIdCommitted) and isinstance(b, ChangeIdCommitted)
    assert a.replication_type == ReplicationType.INCREMENTAL
    assert (b.replication_type, b.reason) == (ReplicationType.FULL,
                                              FullReason.REPLICA_MISMATCH), b
    for k in keys:
        assert files_equal(scenario.replica(k), scenario.model(k))
    rc, rows, text = failover(settings, "--list")
    assert rc == 0 and [r["state"] for r in rows if r["vm_instance_uuid"] == vm] == [
        "released"], text
    # The auditors' replay: the refused snapshots made no plan and break nothing; the plan
    # produced by hand is the one break it reports (it is not the planner's decision).
    out = subprocess.run([sys.executable, "-m", "cbtctl.cli", "replay", "--json"],
                         env=child_env(settings), capture_output=True, text=True, timeout=300)
    found = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    bad = [f for f in found if f["type"] == "finding" and f["severity"] in ("break", "warning")
           and str(f["disk"]).startswith(vm)]
    assert bad and all(str(rogue.sync_id) in f["message"] for f in bad), out.stdout[-3000:]
