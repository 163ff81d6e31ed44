"""A replica's record names the host that wrote it, on the real pipeline (Kafka, Faust, the
simulator, nbdkit): a copier on another host of a ``host-local`` pool refuses the disk's plans
(``SyncFailed(replica_on_other_host)``, naming both hosts) and leaves the replica untouched; the
same copier in a ``shared`` pool takes the replica over with an incremental (no copy for the host
change), and ``cbtstream targets`` shows the new host, the pool and the same replica id."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from cbtctl.demo.processes import child_env
from cbtctl.demo.scenario import Scenario, random_name
from cbtctl.demo.workload import MiB, initial_fill, scattered
from cbtstream.config import Settings
from schemas.events import SyncFailed
from tests.e2e.conftest import Pipeline

pytestmark = pytest.mark.integration

SIZES = [8 * MiB, 4 * MiB + 64 * 1024]


def _on(pipeline: Pipeline, settings: Settings, **copier: object) -> None:
    """Restart the copier with these ``copier`` settings (same target root and state dir)."""
    if pipeline.copier is not None:
        pipeline.copier.stop()
    pipeline.settings = settings.model_copy(update={
        "copier": settings.copier.model_copy(update=copier)})
    pipeline.start_copier()


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _targets(settings: Settings) -> dict[str, dict[str, object]]:
    out = subprocess.run([sys.executable, "-m", "cbtctl.cli", "targets", "--json"],
                         env=child_env(settings), capture_output=True, text=True, timeout=60,
                         check=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return {str(r["disk_key"]): r for r in rows}


async def test_host_local_refuses_another_hosts_replica_and_shared_takes_it_over(
        scenario: Scenario, pipeline: Pipeline, e2e_settings: Settings) -> None:
    _on(pipeline, e2e_settings, host="host-a", pool="default", storage="host-local")
    vm = await scenario.create_vm(random_name("e2e-hosts"), SIZES)
    keys = [f"{vm.instance_uuid}/disk-{d.key}" for d in vm.disks]
    rng = scenario.rng
    c1 = await scenario.cycle(1, [w for d in vm.disks
                                  for w in initial_fill(rng, d.key, d.capacity)])
    assert {r.replication_type for r in c1.rows} == {"full"} and all(r.verified for r in c1.rows)
    c2 = await scenario.cycle(2, [w for d in vm.disks
                                  for w in scattered(rng, d.key, d.capacity)])
    assert {r.replication_type for r in c2.rows} == {"incremental"}
    assert all(r.verified for r in c2.rows)
    before = _targets(pipeline.settings)
    assert {k: before[k]["host"] for k in keys} == {k: "host-a" for k in keys}
    ids = {k: before[k]["replica_id"] for k in keys}
    assert all(ids.values())
    digests = {d.key: _digest(scenario.replica(d.key)) for d in vm.disks}

    # another host of a host-local pool finds host-a's records: refused, nothing written
    _on(pipeline, e2e_settings, host="host-b", pool="default", storage="host-local")
    c3 = await scenario.cycle(3, [w for d in vm.disks
                                  for w in scattered(rng, d.key, d.capacity)])
    assert {(r.outcome, r.reason) for r in c3.rows} == {("SyncFailed", "replica_on_other_host")}
    assert scenario.watcher is not None
    for f in scenario.watcher.outcomes(c3.vm_snapshot).values():
        assert isinstance(f, SyncFailed) and not f.retriable
        assert "host 'host-a'" in f.detail and "host 'host-b'" in f.detail, f.detail
    assert {d.key: _digest(scenario.replica(d.key)) for d in vm.disks} == digests

    # the same host in a shared pool: host-a's replica is this pool's, taken over incrementally
    _on(pipeline, e2e_settings, host="host-b", pool="default", storage="shared")
    c4 = await scenario.cycle(4, [w for d in vm.disks
                                  for w in scattered(rng, d.key, d.capacity)])
    assert {(r.replication_type, r.reason) for r in c4.rows} == {
        ("incremental", "previous_commit")}, c4.rows
    assert all(r.verified for r in c4.rows)  # equal to the snapshot, cycle 3's writes included
    after = _targets(pipeline.settings)
    assert {k: (after[k]["host"], after[k]["pool"], after[k]["replica_id"]) for k in keys} == {
        k: ("host-b", "default", ids[k]) for k in keys}
