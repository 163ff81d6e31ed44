"""``cbtstream replay``: rebuild and verify every disk's change-ID lineage from the Kafka log."""

from __future__ import annotations

import argparse

from cbtstream.config import Settings

#: Exit status when the log holds a break of a chain (1 is any other error).
EXIT_BREAK = 3
#: Exit status when the rebuilt audit tables differ from the live ones (and no chain broke).
EXIT_AUDIT_DIFF = 4


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "replay",
        help="rebuild and verify each disk's change-ID lineage from the log",
        description="Reads cbtstream's topics (from the beginning, --since a time, or from "
        "--offset) without joining any consumer group, feeds them through the planner's own "
        "rules and the commit guard, and prints each disk's chain of applied commits (type, "
        "reason, change IDs, bytes, digest, time, record). Breaks of a chain are reported with "
        f"their records (topic/partition@offset) and exit status {EXIT_BREAK}; commits the "
        "pipeline refused (SyncFailed lineage_mismatch) are reported but are not breaks. "
        f"--rebuild-audit exits {EXIT_AUDIT_DIFF} if the rebuilt tables differ.",
    )
    p.add_argument("--since", metavar="TIME",
                   help="start at the first record at or after TIME (ISO 8601, UTC if no zone)")
    p.add_argument("--offset", action="append", default=[], metavar="TOPIC:PARTITION:OFFSET",
                   help="start this partition at OFFSET (repeatable; TOPIC without prefix)")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--disk", metavar="KEY", help="only this disk (<vm instance uuid>/disk-N)")
    who.add_argument("--vm", metavar="UUID|NAME", help="only the disks of this VM")
    p.add_argument("--as-of", metavar="TIME", help="print the change ID every disk had at TIME")
    p.add_argument("--rebuild-audit", action="store_true",
                   help="rebuild the PostgreSQL audit tables from the log into a fresh schema "
                   "and report every difference from the live tables")
    p.add_argument("--audit-schema", metavar="NAME",
                   help="rebuild into this schema and keep it (default: a temporary schema, "
                   "dropped after the comparison)")
    p.add_argument("--json", action="store_true", help="JSON lines instead of tables")
    p.add_argument("--info", action="store_true", help="also list info findings (duplicates...)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio

    from rich.console import Console

    from cbtctl.replay import render
    from cbtctl.replay.reader import StartAt, parse_offsets
    from cbtctl.replay.run import load, parse_time
    from cbtctl.textfmt import print_json

    start = StartAt(
        since_ms=int(parse_time(args.since).timestamp() * 1000) if args.since else None,
        offsets=parse_offsets(args.offset))
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)  # logs and pipes: one line per row
    result = asyncio.run(load(settings, start, disk=args.disk, vm=args.vm))
    if args.as_of:
        t = parse_time(args.as_of)
        if args.json:
            print_json(console, render.as_of_json(result, t))
        else:
            render.print_as_of(console, result, t)
            render.print_findings(console, result.breaks, show_info=False)
    elif args.json:
        print_json(console, render.replay_json(result))
    else:
        render.print_replay(console, result, show_info=args.info)
    status = EXIT_BREAK if result.breaks else 0
    if args.rebuild_audit:
        from cbtctl.replay.audit import comparison_json, print_comparison, rebuild_audit

        cmp = asyncio.run(rebuild_audit(settings, schema=args.audit_schema))
        if args.json:
            print_json(console, iter([comparison_json(cmp)]))
        else:
            print_comparison(console, cmp)
        status = status or (EXIT_AUDIT_DIFF if cmp.differences else 0)
    return status
