"""``cbtstream db migrate|status``: the audit database's schema migrations."""

from __future__ import annotations

import argparse
import asyncio

from cbtstream.config import Settings


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "db",
        help="audit database: apply or list schema migrations",
        description="Schema migrations of the audit database (PostgreSQL, settings [postgres]; "
        "tables live in postgres.db_schema). 'migrate' is idempotent and safe to run from "
        "several processes at once (advisory lock).",
    )
    p.add_argument("action", choices=("migrate", "status"))
    p.add_argument("--schema", help="schema to use instead of postgres.db_schema")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    return asyncio.run(_run(args, settings))


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    from consumers.audit.repository import AuditRepository

    async with AuditRepository(settings.postgres, schema=args.schema) as repo:
        if args.action == "migrate":
            applied = await repo.migrate()
            for m in applied:
                print(f"applied {m.version:04d}_{m.name}")
            print(f"schema {repo.schema!r} is up to date ({len(applied)} applied now)")
            return 0
        states = await repo.migration_status()
        pending = 0
        for s in states:
            if s.applied_at is None:
                pending += 1
                state = "pending"
            else:
                state = f"applied {s.applied_at.isoformat(timespec='seconds')}"
                if s.checksum_matches is False:
                    state += " (FILE CHANGED since)"
                elif s.checksum_matches is None:
                    state += " (unknown to this version)"
            print(f"{s.version:04d}_{s.name}: {state}")
        print(f"schema {repo.schema!r}: {len(states) - pending} applied, {pending} pending")
        return 1 if pending else 0
