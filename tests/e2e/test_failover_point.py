"""Failover to a restore point after a ransomware attack, then failback (``failover --at``).

1. Three good cycles of a 2-disk VM with restore points kept (count 5).
2. The guest encrypts 80% of one disk; the next sync replicates it (the live replica is the
   attacked disk).
3. ``cbtstream failover VM --at <the third cycle's snapshot>``, after a rollback of the victim
   that was killed halfway (its record says so, part of the replica is neither point): both
   replicas are rolled back to the pre-attack point, byte for byte equal to the pre-attack
   models; the attack's point is dropped from the catalogue, the pre-attack point is live.
4. Rolling back again (the same point) changes nothing; a point that a disk lacks is refused
   before anything is done; rolling back further, to the second cycle, works on a replica
   rolled back once.
5. ``failover --undo``: both replicas are untouched since the rollback and return as they are.
   The next sync copies, incrementally from the second cycle's change ID
   (``replica_rebased``), everything that changed since it, and both replicas equal the source
   disks again, byte for byte; the sync after that is a plain incremental.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cbtctl.commands.failover import find_vm_records
from cbtctl.demo.scenario import Scenario, random_name
from cbtctl.demo.workload import MiB, Write, initial_fill, scattered
from cbtstream.config import PointsPolicy, Settings
from consumers.points import catalogue as cat_mod
from consumers.replica.rollback import ROLLING_BACK
from consumers.replica.state import ReplicaState
from schemas.events import ChangeIdCommitted, FullReason, ReplicationType
from tests.e2e.conftest import Pipeline
from tests.e2e.test_failover import failover

pytestmark = pytest.mark.integration


def catalogue(scenario: Scenario, key: int) -> cat_mod.Catalogue:
    path: Path = scenario.replica(key)
    cat = cat_mod.load(path.parent, path.name)
    assert cat is not None
    return cat


async def test_failover_to_the_pre_attack_point_and_back(
        scenario: Scenario, pipeline: Pipeline, e2e_settings: Settings) -> None:
    settings = e2e_settings.model_copy(update={"points": PointsPolicy(count=5)})
    pipeline.settings = settings
    pipeline.start_copier()
    big = 16 * MiB
    vm = await scenario.create_vm(random_name("e2e-rollback"), [big, 4 * MiB])
    assert scenario.watcher is not None
    keys = [d.key for d in vm.disks]
    victim, other = keys
    rng = scenario.rng
    cycles = [await scenario.cycle(1, [w for d in vm.disks
                                       for w in initial_fill(rng, d.key, d.capacity)])]
    older: dict[int, bytes] = {}
    for n in (2, 3):
        cycles.append(await scenario.cycle(n, [w for d in vm.disks
                                               for w in scattered(rng, d.key, d.capacity)]))
        if n == 2:
            older = {k: scenario.model(k).read_bytes() for k in keys}
    assert all(r.verified for c in cycles for r in c.rows), [c.rows for c in cycles]
    good = cycles[-1].vm_snapshot
    before = {k: scenario.model(k).read_bytes() for k in keys}

    # 2. the attack, replicated
    mibs = sorted(rng.sample(range(big // MiB), int(big // MiB * 0.8)))
    attack = await scenario.cycle(4, [Write(victim, i * MiB, rng.randbytes(MiB)) for i in mibs]
                                  + scattered(rng, other, 4 * MiB))
    assert all(r.verified for r in attack.rows), attack.rows
    assert scenario.replica(victim).read_bytes() != before[victim]

    # 3. fail over to the pre-attack point. The victim's first rollback was "killed" halfway:
    # its record says so (mismatch, rolling back) and half a MiB the rollback rewrites holds
    # neither the point's bytes nor the attack's. The rerun finishes it.
    [found] = [f for f in find_vm_records(settings, vm.instance_uuid)
               if f.disk_key.endswith(f"/disk-{victim}")]
    record = found.location.store.load()
    assert isinstance(record, ReplicaState)
    found.location.store.save(record.failed_over("crash test").mismatched(
        f"{ROLLING_BACK} 3 ({good}): not finished"))
    with open(scenario.replica(victim), "r+b") as fh:
        fh.seek(mibs[0] * MiB)
        fh.write(b"\xee" * (MiB // 2))
    rc, rows, text = failover(settings, vm.instance_uuid, "--at", good, "--reason", "ransomware")
    assert rc == 0, text
    assert {r["disk_key"]: r["result"] for r in rows} == {
        f"{vm.instance_uuid}/disk-{k}": "rolled_back" for k in keys}, text
    for k in keys:
        assert scenario.replica(k).read_bytes() == before[k], k
        cat = catalogue(scenario, k)
        assert cat.live is not None and cat.live.vm_snapshot == good
        assert cat.live.store is None and attack.vm_snapshot not in {
            p.vm_snapshot for p in cat.points}
        assert len(cat.complete) == 3  # cycles 1-3 remain; the older ones still export

    # 4. the same point again: nothing to do; an unknown point: refused, nothing changed
    rc, rows, text = failover(settings, vm.instance_uuid, "--at", good)
    assert rc == 0 and {r["result"] for r in rows} == {"failed_over"}, text
    rc, rows, text = failover(settings, vm.instance_uuid, "--at", "snapshot-0")
    assert rc == 1 and rows == [] and "no complete point 'snapshot-0'" in text, text
    for k in keys:
        assert scenario.replica(k).read_bytes() == before[k], k
    # further back, to the second cycle: a replica rolled back once rolls back again
    rc, rows, text = failover(settings, vm.instance_uuid, "--at", cycles[1].vm_snapshot)
    assert rc == 0 and {r["result"] for r in rows} == {"rolled_back"}, text
    for k in keys:
        assert scenario.replica(k).read_bytes() == older[k], k
        assert [p.vm_snapshot for p in catalogue(scenario, k).complete] == [
            c.vm_snapshot for c in cycles[:2]]

    # 5. fail back: the next sync is incremental from the point's change ID
    rc, rows, text = failover(settings, vm.instance_uuid, "--undo")
    assert rc == 0 and {r["result"] for r in rows} == {"failed_back"}, text
    back = await scenario.cycle(5, [w for d in vm.disks
                                    for w in scattered(rng, d.key, d.capacity)])
    assert all(r.verified for r in back.rows), back.rows  # replicas equal the source again
    w = scenario.watcher
    for k in keys:
        commit = w.outcomes(back.vm_snapshot)[k]
        assert isinstance(commit, ChangeIdCommitted)
        assert (commit.replication_type, commit.reason) == (
            ReplicationType.INCREMENTAL, FullReason.REPLICA_REBASED), commit
    # the victim's rebased sync copied at least what the attack changed
    rebased = w.outcomes(back.vm_snapshot)[victim]
    assert isinstance(rebased, ChangeIdCommitted) and rebased.bytes_changed is not None
    assert rebased.bytes_changed >= len(mibs) * MiB
    plain = await scenario.cycle(6, [w for d in vm.disks
                                     for w in scattered(rng, d.key, d.capacity)])
    assert all(r.verified for r in plain.rows), plain.rows
    assert all(r.reason == FullReason.PREVIOUS_COMMIT and r.replication_type == "incremental"
               for r in plain.rows), plain.rows
