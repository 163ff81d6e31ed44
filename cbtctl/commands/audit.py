"""``cbtstream audit``: run the audit consumer (every event into PostgreSQL)."""

from __future__ import annotations

import argparse
import asyncio
import signal

from cbtstream.config import Settings


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "audit",
        help="run the audit consumer: every pipeline event into PostgreSQL",
        description="Consumes every cbt.* topic in the consumer group '<prefix>cbtstream-audit' "
        "and writes each event once (keyed by event id) into the audit database: the raw "
        "'events' log and the replication_jobs, vm_disks and cbt_history tables. Offsets are "
        "committed after the database transaction. Applies pending schema migrations first.",
    )
    p.add_argument("--no-migrate", action="store_true",
                   help="do not apply pending migrations at start (run `cbtstream db migrate`)")
    p.add_argument("--batch", type=int, default=1000, help="records per poll (default 1000)")
    p.set_defaults(handler=run)


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
