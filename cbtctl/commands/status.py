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
        "sync as its copier last reported it (queued with its place in the queue, running with "
        "its progress, silent: nothing heard for three report intervals, or waiting for its "
        "copier pool, which has no live copier), or the last failure; then the consumer lag "
        "of each pipeline stage (planner, copier pools, audit).",
    )
    who = p.add_mutually_exclusive_group()
    who.add_argument("--disk", metavar="KEY", help="only this disk")
    who.add_argument("--vm", metavar="UUID|NAME", help="only the disks of this VM")
    p.add_argument("--json", action="store_true", help="JSON lines instead of tables")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio
    import itertools
    from datetime import UTC, datetime, timedelta
    from typing import Any

    from rich.console import Console

    from cbtctl.replay import render
    from cbtctl.replay.reader import StageLag, StartAt, consumer_lag, pipeline_stages
    from cbtctl.replay.run import load
    from cbtctl.replay.status import DiskStatus, disk_status
    from cbtstream.kafka import copier_group_id, group_members
    from consumers.queued import report_interval
    from streams.fences import read_fences

    # A copier reports a plan it holds every report interval (queued) or progress interval
    # (running): three of them without a word is silence.
    silent_after = timedelta(seconds=3 * max(report_interval(settings),
                                             settings.copier.progress_interval_s))

    async def gather() -> tuple[list[DiskStatus], list[StageLag], list[Any]]:
        result = await load(settings, StartAt(), disk=args.disk, vm=args.vm)
        lags = await consumer_lag(settings.kafka, pipeline_stages(settings))
        fences = await read_fences(settings.kafka)
        now = datetime.now(UTC)
        pools = sorted({d.state.running.pool for d in result.disks.values()
                        if d.state is not None and d.state.running is not None})
        prefix = settings.kafka.topic_prefix
        members = await group_members(settings.kafka, [copier_group_id(prefix, p) for p in pools])
        unserved = frozenset(p for p in pools if members.get(copier_group_id(prefix, p)) == [])
        return ([disk_status(d, now, silent_after, unserved) for d in result.disks.values()],
                list(lags), fences)

    rows, lags, fences = asyncio.run(gather())
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)  # logs and pipes: one line per row
    # Change-ID fences (cbtstream fence): each line is one fence, as published.
    fence_lines = ({"fence": f.model_dump(mode="json")} for f in fences)
    if args.json:
        render.print_json(console, itertools.chain(render.status_json(rows, lags), fence_lines))
    else:
        render.print_status(console, rows, lags)
        for f in fences:
            state = "revoked" if f.revoked else "active"
            console.print(f"fence {f.fence_id} [{state}] {f.scope} {f.target or '*'}: change IDs "
                          f"before {f.before.isoformat()} untrusted ({f.reason})")
    return 0
