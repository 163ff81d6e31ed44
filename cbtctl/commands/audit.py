"""``cbtstream audit``: run the audit consumer (every event into PostgreSQL); ``audit schedule``,
``audit fences`` and ``audit vms`` list what it stored of the control topics, for auditors and
operators."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from cbtstream.config import Settings
from cbtstream.errors import ConfigError

#: ``ScheduleEvent.kind`` values (``schemas.events.ScheduleKind``; not imported here so that
#: ``cbtstream --help`` stays fast; a unit test checks they are the same).
SCHEDULE_KINDS = ("snapshot_taken", "snapshot_failed", "rpo_at_risk", "rpo_missed")

#: Columns of the text tables (JSON lines carry every column).
SCHEDULE_COLUMNS = ("occurred_at", "vm_name", "vm_instance_uuid", "policy", "kind", "cycle_at",
                    "rpo_s", "vm_snapshot", "point_at", "reason")
FENCE_COLUMNS = ("occurred_at", "fence_id", "scope", "target", "before", "revoked", "reason")
VM_COLUMNS = ("taken_at", "vm_name", "vm_instance_uuid", "vm_snapshot", "firmware", "num_cpus",
              "memory_mib", "guest_id", "disks", "nics")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "audit",
        help="run the audit consumer (every event into PostgreSQL); list schedule events, "
        "fences and VM descriptions",
        description="Without a subcommand: consumes every cbt.* topic (the disk topics, the "
        "dead letters, the fences cbt.changeid.fences, the scheduler's cbt.schedule.events and "
        "the VM descriptions cbt.vm.described) in the consumer group '<prefix>cbtstream-audit' "
        "and writes each event once (keyed by event id) into the audit database: the raw "
        "'events' log and the replication_jobs, vm_disks, cbt_history, schedule_events, "
        "fence_events and vm_descriptions tables. Offsets are committed after the database "
        "transaction. Applies pending schema migrations first. 'audit schedule', 'audit "
        "fences' and 'audit vms' list what it stored (text, or JSON lines with --json, one "
        "object per line with a 'type', for jq).",
    )
    p.add_argument("--no-migrate", action="store_true",
                   help="do not apply pending migrations at start (run `cbtstream db migrate`)")
    p.add_argument("--batch", type=int, default=1000, help="records per poll (default 1000)")
    p.set_defaults(handler=run)
    views = p.add_subparsers(dest="view", metavar="{schedule,fences,vms}",
                             title="listings (from the audit database)")

    sch = views.add_parser(
        "schedule", help="the site scheduler's events per VM: snapshots taken or failed, "
        "rpo_at_risk, rpo_missed",
        description="Lists the ScheduleEvents the audit stored (table schedule_events), oldest "
        "first: per VM and cycle of its policy, snapshot_taken (the VM snapshot), "
        "snapshot_failed (reason), rpo_at_risk (due while its previous snapshot is still being "
        "copied) and rpo_missed (its replica is older than the RPO: point_at is the newest "
        "point it can hold). Every missed RPO: `cbtstream audit schedule --kind rpo_missed`. "
        "JSON lines have type 'schedule', e.g. `... --json | jq -r "
        "'select(.kind==\"rpo_missed\") | .vm_name'`.")
    sch.add_argument("--vm", metavar="UUID|NAME",
                     help="one VM: instance uuid, name (any case) or inventory path")
    sch.add_argument("--kind", action="append", choices=SCHEDULE_KINDS, default=[],
                     help="only this kind (repeatable)")
    sch.add_argument("--policy", metavar="NAME", help="only this schedule policy")
    _listing_args(sch)
    sch.set_defaults(handler=run_schedule)

    fen = views.add_parser(
        "fences", help="every change-ID fence record: who was fenced, from when, revokes",
        description="Lists the ChangeIdFence records the audit stored (table fence_events), "
        "oldest first: each fence as `cbtstream fence` issued it (scope, target, before, "
        "reason), issued again, and revoked (revoked true). With --current, the newest record "
        "of each fence, i.e. the fence as the planner holds it (in force unless revoked). "
        "Tombstones on the compacted topic are not events and are not listed. JSON lines have "
        "type 'fence'.")
    fen.add_argument("--fence", metavar="FENCE_ID", help="only the records of this fence")
    fen.add_argument("--current", action="store_true",
                     help="only the newest record of each fence")
    _listing_args(fen)
    fen.set_defaults(handler=run_fences)

    vms = views.add_parser(
        "vms", help="each VM snapshot's VM description: firmware, CPUs, memory, guest OS, "
        "disks, NICs (for failover)",
        description="Lists the VmDescribed events the audit stored (table vm_descriptions), "
        "oldest first: per VM snapshot, the VM's description read right after the snapshot "
        "(firmware, CPUs, memory in MiB, guest OS id, how many disks and NICs). With --latest, "
        "each VM's newest, the one a failover would use. JSON lines have type 'vm' and carry "
        "the whole description (disks in controller order, NICs with MAC and network), e.g. "
        "`... vms --vm web-1 --latest --json | jq '.description.nics'`. A snapshot whose "
        "description could not be read has no row (`cbtstream snapshot` warned).")
    vms.add_argument("--vm", metavar="UUID|NAME",
                     help="one VM: instance uuid, name (any case) or inventory path")
    vms.add_argument("--snapshot", metavar="MOREF", help="only this VM snapshot (snapshot-42)")
    vms.add_argument("--latest", action="store_true",
                     help="only the newest description of each VM")
    _listing_args(vms)
    vms.set_defaults(handler=run_vms)


def _listing_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--since", metavar="TIME",
                   help="only events at or after TIME (ISO 8601, UTC if no zone)")
    p.add_argument("--limit", type=_count, metavar="N",
                   help="only the newest N (still oldest first)")
    p.add_argument("--schema", help="schema to read instead of postgres.db_schema")
    p.add_argument("--json", action="store_true", help="JSON lines instead of a table")


def _count(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return n


def run(args: argparse.Namespace, settings: Settings) -> int:
    return asyncio.run(_run(args, settings))


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    from cbtstream.kafka import Publisher
    from consumers.audit.consumer import AuditConsumer
    from consumers.audit.repository import AuditRepository

    # The repository connects lazily: the consumer waits for PostgreSQL if it is down.
    repo = AuditRepository(settings.postgres)
    async with Publisher(settings.kafka) as publisher:
        consumer = AuditConsumer(settings, repo, publisher, max_records=args.batch,
                                 migrate=not args.no_migrate)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, consumer.request_stop)
        try:
            await consumer.run()
        finally:
            await repo.stop()
    return 0


# -- listings ---------------------------------------------------------------------------------
def parse_since(text: str | None) -> datetime | None:
    """``--since``: ISO 8601; a time without zone is UTC (as ``cbtstream replay --since``)."""
    if text is None:
        return None
    try:
        t = datetime.fromisoformat(text)
    except ValueError as exc:
        raise ConfigError(f"--since {text!r} is not an ISO 8601 time") from exc
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def shown(row: dict[str, Any]) -> dict[str, Any]:
    """A row with the event's field names (a fence's ``fenced_before`` is ``before``)."""
    return {("before" if k == "fenced_before" else k): v for k, v in row.items()}


def row_json(kind: str, row: dict[str, Any]) -> dict[str, Any]:
    """One listed row as a JSON object: ``type`` first, times in ISO 8601, uuids as text, a VM
    description (jsonb, read as text) as the object it is."""
    out: dict[str, Any] = {"type": kind}
    for name, value in shown(row).items():
        if isinstance(value, datetime):
            value = value.isoformat()
        elif isinstance(value, uuid.UUID):
            value = str(value)
        elif name == "description" and isinstance(value, str):
            value = json.loads(value)
        out[name] = value
    return out


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def table_rows(objects: Sequence[dict[str, Any]], columns: Sequence[str]) -> list[list[str]]:
    """The text table's cells (times in UTC to the second, None as '-')."""
    return [[_cell(shown(o).get(c)) for c in columns] for o in objects]


def _print(args: argparse.Namespace, kind: str, title: str, columns: Sequence[str],
           rows: list[dict[str, Any]]) -> None:
    if args.json:
        for r in rows:
            print(json.dumps(row_json(kind, r), separators=(",", ":")))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=200)  # logs and pipes: one line per row
    table = Table(title=f"{title} ({len(rows)})", title_justify="left")
    for col in columns:
        table.add_column(col)
    for cells in table_rows(rows, columns):
        table.add_row(*cells)
    console.print(table)


def run_schedule(args: argparse.Namespace, settings: Settings) -> int:
    async def fetch() -> list[dict[str, Any]]:
        from consumers.audit.repository import AuditRepository

        async with AuditRepository(settings.postgres, schema=args.schema) as repo:
            return await repo.schedule_events(vm=args.vm, kinds=args.kind, policy=args.policy,
                                              since=parse_since(args.since), limit=args.limit)

    _print(args, "schedule", "Schedule events", SCHEDULE_COLUMNS, asyncio.run(fetch()))
    return 0


def run_fences(args: argparse.Namespace, settings: Settings) -> int:
    try:
        fence_id = uuid.UUID(args.fence) if args.fence else None
    except ValueError as exc:
        raise ConfigError(f"--fence {args.fence!r} is not a fence id (a uuid)") from exc

    async def fetch() -> list[dict[str, Any]]:
        from consumers.audit.repository import AuditRepository

        async with AuditRepository(settings.postgres, schema=args.schema) as repo:
            return await repo.fence_events(fence_id=fence_id, current=args.current,
                                           since=parse_since(args.since), limit=args.limit)

    _print(args, "fence", "Fences (current)" if args.current else "Fence records",
           FENCE_COLUMNS, asyncio.run(fetch()))
    return 0


def run_vms(args: argparse.Namespace, settings: Settings) -> int:
    async def fetch() -> list[dict[str, Any]]:
        from consumers.audit.repository import AuditRepository

        async with AuditRepository(settings.postgres, schema=args.schema) as repo:
            return await repo.vm_descriptions(
                vm=args.vm, vm_snapshot=args.snapshot, latest=args.latest,
                since=parse_since(args.since), limit=args.limit)

    _print(args, "vm", "VM descriptions (latest per VM)" if args.latest else "VM descriptions",
           VM_COLUMNS, asyncio.run(fetch()))
    return 0
