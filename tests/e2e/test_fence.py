"""Change-ID fencing end to end: ``cbtstream fence`` (a real CLI process) publishes a fence;
the worker, restarted in between (the fence must survive it), plans the fenced disks' next sync
full with reason ``fenced``, and the one after incremental again. Disks of another VM are not
touched. Every replica stays byte-identical to its snapshot."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from datetime import UTC, datetime

import pytest

from cbtctl.demo.scenario import Scenario, random_name
from cbtctl.demo.workload import MiB, initial_fill, scattered
from cbtstream.config import to_env
from tests.e2e.conftest import Pipeline

pytestmark = pytest.mark.integration


def fence_cli(pipeline: Pipeline, *args: str) -> dict[str, object]:
    env = {**os.environ, **to_env(pipeline.settings)}
    out = subprocess.run([sys.executable, "-m", "cbtctl.cli", "fence", *args], env=env,
                         capture_output=True, text=True, check=True, timeout=60).stdout
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


async def test_fence_makes_the_next_sync_full_once(scenario: Scenario,
                                                   pipeline: Pipeline) -> None:
    pipeline.start_copier()
    vm = await scenario.create_vm(random_name("e2e-fence"), [8 * MiB, 4 * MiB])
    rng = scenario.rng
    rows = (await scenario.cycle(1, [w for d in vm.disks
                                     for w in initial_fill(rng, d.key, d.capacity)])).rows
    assert {r.replication_type for r in rows} == {"full"}
    rows = (await scenario.cycle(2, [w for d in vm.disks
                                     for w in scattered(rng, d.key, d.capacity)])).rows
    assert {r.replication_type for r in rows} == {"incremental"}

    before = datetime.now(UTC).isoformat()
    fence = fence_cli(pipeline, "--vm", vm.instance_uuid, "--before", before,
                      "--reason", "KB 317933: hosts before the patch")
    assert fence["scope"] == "vm" and fence["target"] == vm.instance_uuid
    listed = subprocess.run([sys.executable, "-m", "cbtctl.cli", "fence", "--list"],
                            env={**os.environ, **to_env(pipeline.settings)},
                            capture_output=True, text=True, check=True, timeout=60).stdout
    assert fence["fence_id"] in listed
    pipeline.restart_worker()  # the fence lives in the compacted topic, not in the worker

    result = await scenario.cycle(3, [w for d in vm.disks
                                      for w in scattered(rng, d.key, d.capacity)])
    assert {(r.replication_type, r.reason) for r in result.rows} == {("full", "fenced")}
    assert all(r.verified for r in result.rows)
    assert all(e.esxi_host for e in result.events)  # the host is recorded for host fences
    result = await scenario.cycle(4, [w for d in vm.disks
                                      for w in scattered(rng, d.key, d.capacity)])
    assert {r.replication_type for r in result.rows} == {"incremental"}
    assert all(r.verified for r in result.rows)
    await asyncio.sleep(0)
