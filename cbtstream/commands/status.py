"""``cbtstream status``: each disk's latest change ID and sync state, and the pipeline's lag."""

from __future__ import annotations

import argparse

from cbtstream.config import Settings


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "status",
        help="latest change ID, last sync and running syncs per disk; consumer lag per stage",
        description="Replays the log (no consumer group, works while the worker is down): per "
        "disk the latest committed change ID, the time and type of the last sync, a running "
        "sync with its latest progress, or the last failure; then the consumer lag of each "
        "pipeline stage (planner, copier, audit).",
    )
    who = p.add_mutually_exclusive_group()
    who.add_argument("--disk", metavar="KEY", help="only this disk")
    who.add_argument("--vm", metavar="UUID|NAME", help="only the disks of this VM")
    p.add_argument("--json", action="store_true", help="JSON lines instead of tables")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio

    from rich.console import Console

    from cbtstream.replay import render
    from cbtstream.replay.reader import StageLag, StartAt, consumer_lag, pipeline_stages
    from cbtstream.replay.run import load
    from cbtstream.replay.status import DiskStatus, disk_status

    async def gather() -> tuple[list[DiskStatus], list[StageLag]]:
        result = await load(settings, StartAt(), disk=args.disk, vm=args.vm)
        lags = await consumer_lag(settings.kafka, pipeline_stages(settings))
        return [disk_status(d) for d in result.disks.values()], list(lags)

    rows, lags = asyncio.run(gather())
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)  # logs and pipes: one line per row
    if args.json:
        render.print_json(console, render.status_json(rows, lags))
    else:
        render.print_status(console, rows, lags)
    return 0
