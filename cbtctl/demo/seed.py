"""The seed's two "Database Queries", run unchanged (VM names replaced) on the audit trail, so a
demo shows the per-disk change IDs and replication types the seed's operators look for."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from cbtstream.config import Settings

SEED_QUERY_1 = """
SELECT vm_disks.job_id, vm_disks.disk_id, vm_disks.disk_change_id
FROM vm_disks
JOIN replication_jobs ON vm_disks.job_id = replication_jobs.id
WHERE replication_jobs.source_vm_path = '{vm_path}'
AND vm_disks.disk_change_id IS NOT NULL
ORDER BY vm_disks.updated_at DESC;
"""

SEED_QUERY_2 = """
SELECT id, source_vm_name, replication_type, status
FROM replication_jobs
WHERE source_vm_name IN ('{vm_name}', 'QCDev-Jump05')
ORDER BY created_at DESC LIMIT 4;
"""


def _quote(text: str) -> str:
    """A VM name or path as the inside of an SQL string literal (the seed's queries are text)."""
    return text.replace("'", "''")


async def seed_queries(settings: Settings, vm_path: str, vm_name: str, commits: int,
                       timeout_s: float = 60.0) -> tuple[list[dict[str, Any]],
                                                          list[dict[str, Any]]]:
    """Wait until the audit trail holds ``commits`` committed change IDs of the VM, then run
    both seed queries; returns their rows."""
    from consumers.audit.repository import AuditRepository

    q1 = SEED_QUERY_1.format(vm_path=_quote(vm_path))
    q2 = SEED_QUERY_2.format(vm_name=_quote(vm_name))
    async with AuditRepository(settings.postgres) as repo:
        deadline = time.monotonic() + timeout_s
        while True:
            rows1 = await repo.fetch(q1)
            if len(rows1) >= commits or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        return rows1, await repo.fetch(q2)


def render_rows(title: str, sql: str, rows: list[dict[str, Any]], console: Console) -> None:
    console.print(f"[bold]{title}[/]\n[dim]{sql.strip()}[/]")
    table = Table()
    columns = list(rows[0]) if rows else ["(no rows)"]
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*(str(r[c]) for c in columns))
    console.print(table)
