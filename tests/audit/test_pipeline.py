"""The audit consumer next to the real pipeline (simulator, Faust worker, copier): after two
cycles of a two-disk VM the seed's queries, with the VM's name and path, return each disk's own
change ID, and the jobs read initial then incremental."""

from __future__ import annotations

from pathlib import Path

import pytest

from cbtctl.demo.processes import Proc
from cbtctl.demo.scenario import Scenario, random_name
from cbtctl.demo.workload import MiB, initial_fill, scattered
from cbtstream.config import Settings
from consumers.audit.repository import AuditRepository
from tests.audit.conftest import wait_for
from tests.e2e.conftest import Pipeline

pytestmark = pytest.mark.integration


async def test_seed_queries_on_the_real_pipeline(scenario: Scenario, pipeline: Pipeline,
                                                 audit_schema: str, tmp_path: Path) -> None:
    pg = pipeline.settings.postgres.model_copy(update={"db_schema": audit_schema})
    settings: Settings = pipeline.settings.model_copy(update={"postgres": pg})
    audit = Proc(["audit"], settings, tmp_path / "logs" / "audit.log")
    pipeline.start_copier()
    try:
        vm = await scenario.create_vm(random_name("pgtest1"), [8 * MiB, 4 * MiB])
        rng = scenario.rng
        c1 = await scenario.cycle(1, [w for d in vm.disks for w in initial_fill(rng, d.key,
                                                                                 d.capacity)])
        c2 = await scenario.cycle(2, [w for d in vm.disks for w in scattered(rng, d.key,
                                                                               d.capacity)])
        path = c2.events[0].disk.vm_path
        async with AuditRepository(pg) as repo:

            async def four_commits() -> bool:
                assert audit.alive, audit.output()
                try:
                    rows = await repo.fetch("SELECT count(*) AS n FROM cbt_history")
                except Exception:
                    return False
                return bool(rows[0]["n"] == 4)

            await wait_for(four_commits, timeout=60, what="four commits in the audit tables")
            q1 = await repo.fetch(
                "SELECT vm_disks.job_id, vm_disks.disk_id, vm_disks.disk_change_id "
                "FROM vm_disks JOIN replication_jobs ON vm_disks.job_id = replication_jobs.id "
                f"WHERE replication_jobs.source_vm_path = '{path}' "
                "AND vm_disks.disk_change_id IS NOT NULL ORDER BY vm_disks.updated_at DESC;")
            q2 = await repo.fetch(
                "SELECT id, source_vm_name, replication_type, status FROM replication_jobs "
                f"WHERE source_vm_name IN ('{vm.name}', 'QCDev-Jump05') "
                "ORDER BY created_at DESC LIMIT 4;")
        print(f"\nseed query 1 ({path}):", *q1, "seed query 2:", *q2, sep="\n  ")
        committed = {e.disk.disk_id: e.change_id for e in c2.events}
        assert {r["disk_id"]: r["disk_change_id"] for r in q1[:2]} == committed
        assert {r["disk_id"]: r["disk_change_id"] for r in q1[2:]} == {
            e.disk.disk_id: e.change_id for e in c1.events}
        assert [(r["replication_type"], r["status"]) for r in q2] == [
            ("incremental", "completed")] * 2 + [("initial", "completed")] * 2
    finally:
        audit.stop()
        if audit.proc.returncode not in (0, None):
            print(audit.output()[-4000:])
