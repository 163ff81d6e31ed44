"""Copier pools end to end on the real stack: a plan for a pool with no live copier waits for it
(no time-out, no VM snapshot removed, reported by the worker's metrics), and ``cbtstream pools
move`` moves a disk's replica to another pool at the cost of one full copy (``pool_moved``),
leaving the old pool's replica as it was. Replicas are compared byte for byte."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import re
import urllib.request
from pathlib import Path

import pytest

from cbtctl.commands.pools import _move
from cbtctl.demo.processes import Proc
from cbtctl.demo.run import stack_settings
from cbtctl.demo.scenario import Scenario, files_equal, random_name
from cbtctl.demo.workload import MiB, initial_fill
from cbtstream.config import Settings
from schemas.events import (
    ChangeIdCommitted,
    FailureReason,
    FullReason,
    ReplicationType,
    SnapshotRemoved,
    SyncFailed,
)
from tests.e2e.conftest import Pipeline

pytestmark = pytest.mark.integration

TIMEOUT_S = 3.0


@pytest.fixture
def e2e_settings(kafka_settings: Settings, tmp_path: Path) -> Settings:
    s = stack_settings(kafka_settings)
    copier = s.copier.model_copy(update={"state_dir": tmp_path / "copier-a", "pool": "a",
                                         "target_root": tmp_path / "pool-a"})
    streams = s.streams.model_copy(update={"sync_timeout_s": TIMEOUT_S,
                                           "sync_check_interval_s": 0.5})
    pools = s.pools.model_copy(update={"default": "a"})
    return s.model_copy(update={"copier": copier, "streams": streams, "pools": pools})


def _copier_b(settings: Settings, tmp_path: Path) -> Settings:
    copier = settings.copier.model_copy(update={
        "state_dir": tmp_path / "copier-b", "pool": "b", "target_root": tmp_path / "pool-b",
        "metrics_port": 0})
    return settings.model_copy(update={"copier": copier})


def _metric(settings: Settings, name: str, pool: str) -> float | None:
    url = f"http://{settings.streams.web_host}:{settings.streams.web_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    m = re.search(rf'^{name}{{pool="{pool}"}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else None


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_a_move_costs_one_full_copy_and_waits_for_the_new_pools_copier(
        scenario: Scenario, pipeline: Pipeline, tmp_path: Path) -> None:
    settings = pipeline.settings
    vm = await scenario.create_vm(random_name("e2e-pool-move"), [4 * MiB])
    key = vm.disks[0].key
    disk_key = f"{vm.instance_uuid}/disk-{key}"
    await scenario.write([w for d in vm.disks
                          for w in initial_fill(scenario.rng, d.key, d.capacity, 0.5)])
    pipeline.start_copier()
    first = await scenario.snapshot()
    await scenario.wait(first[0].vm_snapshot, [key])
    replica_a = tmp_path / "pool-a" / vm.instance_uuid / f"disk-{key}.img"
    assert files_equal(replica_a, scenario.model(key))
    before_move = _digest(replica_a)

    assert await _move(argparse.Namespace(disk=disk_key, to="b", yes=False), settings) == 1
    assert await _move(argparse.Namespace(disk=disk_key, to="b", yes=True), settings) == 0

    await scenario.write(initial_fill(scenario.rng, key, vm.disks[0].capacity, 0.1))
    second = await scenario.snapshot()
    snap2 = second[0].vm_snapshot
    w = scenario.watcher
    assert w is not None
    await w.wait_for(lambda: key in w.plans(snap2), 60, alive=pipeline.check)
    plan = w.plans(snap2)[key]
    assert (plan.pool, plan.replication_type, plan.reason) == (
        "b", ReplicationType.FULL, FullReason.POOL_MOVED)

    # Pool b has no copier: the plan waits, reported, with no time-out and its snapshot kept.
    await w.wait_for(lambda: _metric(settings, "cbtstream_syncs_waiting_for_pool", "b") == 1,
                     30, alive=pipeline.check)
    await asyncio.sleep(4 * TIMEOUT_S)
    assert _metric(settings, "cbtstream_pool_copiers", "b") == 0
    assert not [e for e in w.events if isinstance(e, SyncFailed)
                and e.reason == FailureReason.SYNC_TIMED_OUT]
    assert not [e for e in w.events if isinstance(e, SnapshotRemoved)
                and e.vm_snapshot == snap2]
    assert key not in w.outcomes(snap2)  # pool a's copier did not take it

    b = _copier_b(settings, tmp_path)
    copier_b = Proc(["copier"], b, pipeline.logs / "copier-b.log")
    try:
        await scenario.wait(snap2, [key])
        out = w.outcomes(snap2)[key]
        assert isinstance(out, ChangeIdCommitted)
        assert (out.replication_type, out.reason) == (ReplicationType.FULL,
                                                      FullReason.POOL_MOVED)
        replica_b = tmp_path / "pool-b" / vm.instance_uuid / f"disk-{key}.img"
        assert files_equal(replica_b, scenario.model(key))
        assert _digest(replica_a) == before_move  # the old pool's replica left as it was
        await w.wait_for(
            lambda: _metric(settings, "cbtstream_syncs_waiting_for_pool", "b") == 0, 30,
            alive=pipeline.check)

        # From then on pool b syncs it incrementally.
        await scenario.write(initial_fill(scenario.rng, key, vm.disks[0].capacity, 0.05))
        third = await scenario.snapshot()
        await scenario.wait(third[0].vm_snapshot, [key])
        out3 = w.outcomes(third[0].vm_snapshot)[key]
        assert isinstance(out3, ChangeIdCommitted)
        assert out3.replication_type == ReplicationType.INCREMENTAL
        assert files_equal(replica_b, scenario.model(key))
        assert _digest(replica_a) == before_move
    finally:
        copier_b.stop()
