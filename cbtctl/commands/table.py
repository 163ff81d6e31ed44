"""``cbtstream table rebuild``: write the planner's ``disks`` table back from the log when its
changelog is lost (see :mod:`cbtctl.replay.table` for the rules and what is not rebuilt)."""

from __future__ import annotations

import argparse

from cbtstream.config import Settings

#: Exit status when a rule refuses the rebuild (nothing written).
EXIT_REFUSED = 3


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "table",
        help="rebuild the planner's disks table from the log (a lost changelog)",
        description="Replays the whole log through the planner's own rules and writes each "
        "disk's row (latest committed change ID, disk identity, running and waiting syncs, "
        "plan generation, offsets read) to the table's changelog, so the next worker plans "
        "incrementals instead of reseeding every disk. Refused while a planner worker runs, "
        "onto a changelog that still holds records, or when the replay finds a lineage break "
        f"(--force lifts the last two). Exit {EXIT_REFUSED} when refused; nothing is written "
        "then. Without --write it only shows the rows it would write.",
    )
    p.add_argument("action", choices=["rebuild"])
    p.add_argument("--write", action="store_true",
                   help="write the rows (default: show them only)")
    p.add_argument("--force", action="store_true",
                   help="write over a non-empty changelog or a replay with breaks")
    p.add_argument("--json", action="store_true", help="JSON lines instead of text")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio
    import json

    from cbtctl.replay.table import RebuildRefused, rebuild_table

    try:
        report = asyncio.run(rebuild_table(settings, write=args.write, force=args.force))
    except RebuildRefused as exc:
        if args.json:
            print(json.dumps({"type": "refused", "reason": str(exc)}))
        else:
            print(f"refused: {exc}")
        return EXIT_REFUSED
    for key, row in sorted(report.rows.items()):
        running = row.running.sync_id if row.running is not None else None
        if args.json:
            print(json.dumps({"type": "row", "disk_key": key, "change_id": row.change_id,
                              "running_sync": str(running) if running else None,
                              "waiting": row.waiting is not None,
                              "plan_generation": row.plan_generation, "read": row.read}))
        else:
            print(f"{key}  change ID {row.change_id or '-'}"
                  + (f"  running {running}" if running else "")
                  + ("  snapshot waiting" if row.waiting is not None else ""))
    summary = {"type": "summary", "changelog": report.changelog, "rows": len(report.rows),
               "breaks": report.breaks, "written": report.written, "warnings": report.refused}
    if args.json:
        print(json.dumps(summary))
    else:
        done = "written to" if report.written else "would be written to (use --write)"
        print(f"{len(report.rows)} rows {done} {report.changelog}")
        for why in report.refused:
            print(f"note: {why}")
    return 0
