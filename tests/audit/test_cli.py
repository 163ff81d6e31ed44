"""``cbtstream db migrate|status`` and ``cbtstream audit`` as real child processes."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cbtctl.demo.processes import Proc, child_env
from cbtstream.config import Settings
from consumers.audit.repository import AuditRepository
from tests.audit.conftest import publish, wait_for
from tests.audit.history import Fleet, vm

pytestmark = pytest.mark.integration


def _cli(settings: Settings, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "cbtctl.cli", *args],
                            env=child_env(settings), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


async def test_migrate_concurrently_then_status(audit_settings: Settings,
                                                stack_settings: Settings) -> None:
    status = _cli(audit_settings, "db", "status")
    out, _ = status.communicate(timeout=60)
    assert status.returncode == 1 and "0 applied, 5 pending" in out, out  # nothing applied yet

    procs = [_cli(audit_settings, "db", "migrate") for _ in range(3)]
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    # Each migration applied by exactly one of the racing processes (advisory lock).
    assert sum("applied 0001_audit_tables" in o for o in outs) == 1, outs
    assert sum("applied 0002_snapshot_removed_index" in o for o in outs) == 1, outs
    assert sum("applied 0003_commit_origin" in o for o in outs) == 1, outs
    assert sum("applied 0004_control_events" in o for o in outs) == 1, outs
    assert sum("applied 0005_vm_descriptions" in o for o in outs) == 1, outs

    status = _cli(audit_settings, "db", "status")
    out, _ = status.communicate(timeout=60)
    assert status.returncode == 0 and "0001_audit_tables: applied" in out, out
    assert "5 applied, 0 pending" in out, out
    async with AuditRepository(stack_settings.postgres,
                               schema=audit_settings.postgres.db_schema) as repo:
        rows = await repo.fetch("SELECT version, name FROM schema_migrations ORDER BY version")
    assert rows == [{"version": 1, "name": "audit_tables"},
                    {"version": 2, "name": "snapshot_removed_index"},
                    {"version": 3, "name": "commit_origin"},
                    {"version": 4, "name": "control_events"},
                    {"version": 5, "name": "vm_descriptions"}]


async def test_audit_command_stores_events_and_stops_on_sigterm(
        audit_settings: Settings, stack_settings: Settings, tmp_path: Path) -> None:
    fleet = Fleet()
    fleet.cycle(vm("pgtest1", (2000, 2001)))
    await publish(audit_settings, fleet.events)
    proc = Proc(["audit"], audit_settings, tmp_path / "audit.log")  # migrates at start
    try:
        async with AuditRepository(stack_settings.postgres,
                                   schema=audit_settings.postgres.db_schema) as repo:

            async def two_commits() -> bool:
                assert proc.alive, proc.output()
                try:
                    rows = await repo.fetch("SELECT count(*) AS n FROM cbt_history")
                except Exception:
                    return False  # not migrated yet
                return bool(rows[0]["n"] == 2)

            await wait_for(two_commits, timeout=60, what="commits stored by `cbtstream audit`")
        t0 = time.monotonic()
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.proc.wait(20) == 0, proc.output()
        assert time.monotonic() - t0 < 10
        assert "audit consumer stopped" in proc.output()
    finally:
        proc.stop()
