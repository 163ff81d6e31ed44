"""Replay, as-of, status and the audit rebuild over a real history: two VMs (three disks) through
several cycles on the real pipeline (Faust worker, copier, audit writer, Kafka, PostgreSQL, the
vSphere simulator), then forged commits: one the running pipeline refuses, one it never sees."""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from cbtctl.demo.processes import Proc, child_env
from cbtctl.demo.scenario import CycleResult, Scenario, random_name
from cbtctl.demo.workload import MiB, initial_fill, scattered
from cbtctl.replay.reader import StartAt, consumer_lag, pipeline_stages
from cbtctl.replay.run import load
from cbtstream.config import Settings
from cbtstream.kafka import Publisher
from cbtstream.vsphere.simctl import SimulatorControl
from consumers.audit.repository import AuditRepository
from schemas.events import ChangeIdCommitted, FullReason, ReplicationType, SyncFailed
from schemas.topics import SYNC_FAILED
from tests.e2e.conftest import Pipeline
from tests.support import read_topic

pytestmark = pytest.mark.integration


def cli(settings: Settings, *args: str) -> tuple[int, list[dict[str, Any]], str]:
    """Run ``cbtstream <args> --json`` as a child process; (exit status, JSON lines, stderr)."""
    done = subprocess.run([sys.executable, "-m", "cbtctl.cli", *args, "--json"],
                          env=child_env(settings), capture_output=True, text=True, timeout=120,
                          check=False)
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return done.returncode, lines, done.stderr


async def run_cli(settings: Settings, *args: str) -> tuple[int, list[dict[str, Any]], str]:
    return await asyncio.to_thread(cli, settings, *args)


async def wait_no_lag(settings: Settings, stages: tuple[str, ...], timeout: float = 60) -> None:
    wanted = tuple(s for s in pipeline_stages(settings) if s.name in stages)
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        lags = await consumer_lag(settings.kafka, wanted)
        if all(lag.started and lag.lag == 0 for lag in lags):
            return
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"consumer lag did not reach 0: {lags}")
        await asyncio.sleep(0.3)


@pytest.fixture
async def audited(e2e_settings: Settings, tmp_path: Path) -> Any:
    """The e2e settings on a fresh PostgreSQL schema, with the audit writer running."""
    schema = f"replay_t{uuid.uuid4().hex[:10]}"
    settings = e2e_settings.model_copy(update={"postgres": e2e_settings.postgres.model_copy(
        update={"db_schema": schema})})
    proc = Proc(["audit"], settings, tmp_path / "logs" / "audit.log")
    try:
        yield settings, proc
    finally:
        proc.stop()
        async with AuditRepository(settings.postgres, schema=schema) as repo:
            await repo.reset_schema(replace=True)


async def test_replay_over_a_real_history(
    scenario: Scenario, pipeline: Pipeline, audited: tuple[Settings, Proc],
    e2e_settings: Settings, sim: SimulatorControl, tmp_path: Path,
) -> None:
    settings, audit = audited
    pipeline.start_copier()
    second = Scenario(e2e_settings, sim, tmp_path / "models2", seed=99, timeout_s=120)
    second.check_alive.append(pipeline.check)
    try:
        vm1 = await scenario.create_vm(random_name("replay-a"), [8 * MiB, 4 * MiB])
        vm2 = await second.create_vm(random_name("replay-b"), [6 * MiB])
        rng = scenario.rng
        cycles: list[tuple[datetime, CycleResult]] = []

        async def cycle(sc: Scenario, n: int, reset: tuple[int, ...] = ()) -> None:
            assert sc.vm is not None
            writes = [w for d in sc.vm.disks for w in (
                initial_fill(rng, d.key, d.capacity) if n == 1
                else scattered(rng, d.key, d.capacity, count=4))]
            res = await sc.cycle(n, writes, reset=reset)
            assert all(r.verified for r in res.rows), res.rows
            cycles.append((datetime.now(UTC), res))

        await cycle(scenario, 1)
        await cycle(second, 1)
        await cycle(scenario, 2)
        await cycle(second, 2)
        await cycle(scenario, 3, reset=(vm1.disks[1].key,))
    finally:
        await second.close()

    # what the pipeline committed, per disk key, in order
    expected: dict[str, list[str]] = {}
    for _, res in cycles:
        for ev in res.events:
            row = next(r for r in res.rows if r.disk_id == ev.disk.disk_id)
            assert row.new_change_id is not None
            expected.setdefault(ev.disk.key, []).append(row.new_change_id)
    assert len(expected) == 3

    # 1. the replay rebuilds every chain, verified, through the CLI
    status, lines, err = await run_cli(settings, "replay")
    assert status == 0, err
    links: dict[str, list[dict[str, Any]]] = {}
    for obj in lines:
        if obj["type"] == "link":
            links.setdefault(obj["disk"], []).append(obj)
    assert {k: [lk["change_id"] for lk in v] for k, v in links.items()} == expected
    reset_key = f"{vm1.instance_uuid}/disk-{vm1.disks[1].key}"
    assert [(lk["replication_type"], lk["reason"]) for lk in links[reset_key]] == [
        ("full", "no_previous_commit"), ("incremental", "previous_commit"),
        ("full", "epoch_changed")]
    for chain in links.values():
        for prev, nxt in itertools.pairwise(chain):
            assert nxt["previous_change_id"] == prev["change_id"]
        assert all(lk["plan_coord"] is not None and lk["digest"].startswith("blake3:")
                   for lk in chain)
    [summary] = [o for o in lines if o["type"] == "summary"]
    assert summary["intact"] and summary["links"] == 8 and summary["breaks"] == 0

    # 2. --as-of: the change ID of every disk at the end of each cycle
    result = await load(settings, StartAt())
    for i, (mark, _) in enumerate(cycles):
        for key, chain in expected.items():
            done = [c for (m, r) in cycles[: i + 1] for c in
                    [x.new_change_id for x in r.rows
                     if f"{r.events[0].disk.vm_instance_uuid}/{x.disk_id}" == key]]
            link = result.disks[key].change_id_at(mark)
            assert (link.commit.change_id if link else None) == (done[-1] if done else None)
            assert done == chain[: len(done)]
    status, lines, _ = await run_cli(settings, "replay", "--as-of", cycles[2][0].isoformat())
    as_of = {o["disk"]: o["change_id"] for o in lines if o["type"] == "as_of"}
    assert as_of == {k: v[1] if k.startswith(vm1.instance_uuid) else v[0]
                     for k, v in expected.items()}
    # --since the third cycle: two disks of vm1 and one of vm2 start from a baseline, no breaks
    status, lines, _ = await run_cli(settings, "replay", "--since", cycles[2][0].isoformat(),
                                     "--vm", vm1.name)
    assert status == 0
    assert {o["disk"] for o in lines if o["type"] == "link" and o["index"] == 1} == {
        k for k in expected if k.startswith(vm1.instance_uuid)}

    # 3. status: every disk synced at its last change ID; no lag once the pipeline is idle
    await wait_no_lag(settings, ("planner", "copier", "audit"))
    status, lines, _ = await run_cli(settings, "status")
    rows = {o["disk"]: o for o in lines if o["type"] == "status"}
    assert {k: (r["state"], r["change_id"]) for k, r in rows.items()} == {
        k: ("synced", v[-1]) for k, v in expected.items()}
    lags = {o["stage"]: o for o in lines if o["type"] == "lag"}
    assert lags["planner"]["group"] == f"{settings.kafka.topic_prefix}cbtstream"
    assert all(lags[s]["lag"] == 0 and lags[s]["started"] for s in ("planner", "copier",
                                                                       "audit"))

    # 4. the audit tables rebuilt from the log equal the live ones, row by row
    assert audit.alive, audit.output()[-3000:]
    status, lines, err = await run_cli(settings, "replay", "--rebuild-audit")
    [report] = [o for o in lines if o["type"] == "audit"]
    assert status == 0, (err, report)
    assert report["differences"] == 0
    assert {t["table"]: t["live"] > 0 for t in report["tables"]} == {
        "events": True, "replication_jobs": True, "vm_disks": True, "cbt_history": True,
        "schedule_events": False, "fence_events": False,  # no scheduler, no fence here
        "vm_descriptions": True}  # every snapshot_and_publish describes its VM

    # 5. a commit carrying vm2's change ID as vm1's disk's previous one, with the pipeline
    #    running: the guard refuses it, the log records it, the replay reports it (no break)
    victim = f"{vm1.instance_uuid}/disk-{vm1.disks[0].key}"
    foreign = expected[f"{vm2.instance_uuid}/disk-{vm2.disks[0].key}"][-1]
    last = links[victim][-1]
    disk = result.disks[victim].disk
    forged = ChangeIdCommitted(
        disk=disk, sync_id=uuid.UUID(last["sync_id"]), vm_snapshot=last["vm_snapshot"],
        previous_change_id=foreign, change_id=foreign.rsplit("/", 1)[0] + "/99",
        replication_type=ReplicationType.INCREMENTAL, reason=FullReason.PREVIOUS_COMMIT,
        bytes_copied=0, extents=0, digest="sha256:00", duration_s=0)
    async with Publisher(settings.kafka) as pub:
        part, off = await pub.publish(forged)
    await read_topic(settings, SYNC_FAILED, timeout=30, watch=(pipeline.worker,), until=lambda
                     evs: any(isinstance(e, SyncFailed) and str(forged.event_id) in e.detail
                              for e in evs))
    status, lines, _ = await run_cli(settings, "replay", "--disk", victim)
    [refused] = [o for o in lines if o["type"] == "finding"]
    assert status == 0 and refused["severity"] == "refused"
    assert refused["coords"][0] == {"topic": f"{settings.kafka.topic_prefix}"
                                    "cbt.changeid.committed", "partition": part, "offset": off}

    # 6. the same kind of record while the worker is down: nobody refused it -> a break
    pipeline.worker.stop()
    forged2 = forged.model_copy(update={"event_id": uuid.uuid4()})
    async with Publisher(settings.kafka) as pub:
        part2, off2 = await pub.publish(forged2)
    status, lines, _ = await run_cli(settings, "replay")
    breaks = [o for o in lines if o["type"] == "finding" and o["severity"] == "break"]
    assert status == 3
    assert [(b["code"], b["disk"], b["coords"][0]["partition"], b["coords"][0]["offset"])
            for b in breaks] == [("commit_refused_unrecorded", victim, part2, off2)]
    # status still works with the worker down, from the log alone
    status, lines, _ = await run_cli(settings, "status", "--vm", vm1.name)
    assert status == 0 and len([o for o in lines if o["type"] == "status"]) == 2
