"""``cbtstream status``: each disk's latest change ID and sync state, a site summary, and the
pipeline's lag. From the planner's table when a worker answers (``cbtctl.sitestatus``: its cost
follows the number of disks), else, or with ``--from-log``, from a replay of the log (no
worker needed, but it reads every topic from its start)."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from typing import Any

from cbtstream.config import Settings


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "status",
        help="latest change ID, last sync and running syncs per disk; consumer lag per stage",
        description="Asks a planner worker (GET /api/v1/status, gathered from every "
        "worker's partitions): per disk the latest committed change ID, its recovery point and "
        "its age against its RPO (the protection policy's that snapshotted it, else "
        "streams.rpo_s), a running sync as its copier last reported it (queued with its place "
        "in the queue, running with its progress, silent: nothing heard for three report "
        "intervals, or waiting for its copier pool, which has no live copier), or the last "
        "failure; a site summary (disks by state, RPO met/at risk/missed in all and per policy, "
        "oldest recovery point, copies, pools); then the consumer lag of each pipeline stage "
        "(planner, copier pools, audit). Without an answer from a worker, or with --from-log, "
        "it replays the log instead (no consumer group, works while the workers are down, "
        "costs a read of every topic from its start).",
    )
    who = p.add_mutually_exclusive_group()
    who.add_argument("--disk", metavar="KEY", help="only this disk")
    who.add_argument("--vm", metavar="UUID|NAME", help="only the disks of this VM")
    p.add_argument("--json", action="store_true", help="JSON lines instead of tables")
    p.add_argument("--summary", action="store_true",
                   help="the site summary only, no line per disk (from the table)")
    p.add_argument("--rpo", type=float, metavar="SECONDS",
                   help="measure every disk's recovery point against this RPO (default: its "
                   "policy's, else streams.rpo_s)")
    p.add_argument("--from-log", action="store_true",
                   help="replay the log instead of asking a worker (slower; no site summary)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio
    from datetime import UTC, datetime, timedelta

    from rich.console import Console

    from cbtctl.replay.reader import StageLag, StartAt, consumer_lag, pipeline_stages
    from streams.fences import read_fences

    async def gather() -> tuple[list[Any], list[StageLag], list[Any]]:
        # the replay's modules, imported only when it runs
        from cbtctl.replay.run import load
        from cbtctl.replay.status import disk_status
        from cbtstream.kafka import copier_group_id, group_members
        from consumers.queued import report_interval

        # A copier reports a plan it holds every report interval (queued) or progress
        # interval (running): three of them without a word is silence.
        silent_after = timedelta(seconds=3 * max(report_interval(settings),
                                                 settings.copier.progress_interval_s))
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

    console = Console()
    if not console.is_terminal:
        console = Console(width=200)  # logs and pipes: one line per row
    if not args.from_log:
        import sys

        from cbtctl import sitestatus

        async def table() -> tuple[dict[str, Any], list[StageLag], list[Any]]:
            # the worker's answer (a blocking HTTP call, in a thread), the lag and the fences
            # at once: in turn they took twice as long
            doc = asyncio.ensure_future(asyncio.to_thread(
                sitestatus.fetch, settings, vm=args.vm, disk=args.disk,
                disks=not args.summary, rpo_s=args.rpo))
            try:
                lags, fences = await asyncio.gather(
                    consumer_lag(settings.kafka, pipeline_stages(settings)),
                    read_fences(settings.kafka))
            finally:
                answer = await doc
            return answer, list(lags), fences

        try:
            doc, lags, fences = asyncio.run(table())
        except sitestatus.NoWorker as exc:
            print(f"no status from a planner worker ({exc}); replaying the log instead",
                  file=sys.stderr)
        else:
            return _show(args, console, sitestatus.site_json(doc), lags, fences,
                         lambda: sitestatus.print_site(console, doc,
                                                       show_disks=not args.summary))

    from cbtctl.replay import render

    rows, lags, fences = asyncio.run(gather())
    return _show(args, console, render.status_json(rows, []), lags, fences,
                 lambda: render.print_status(console, rows, []))


def _show(args: argparse.Namespace, console: Any, lines: Iterable[dict[str, Any]],
          lags: list[Any], fences: list[Any], tables: Callable[[], None]) -> int:
    """Print the disks (``lines`` as JSON, or ``tables()``), the lag and the fences."""
    import itertools

    from cbtctl.textfmt import lag_json, print_json, print_lags

    # Change-ID fences (cbtstream fence): each line is one fence, as published.
    fence_lines = ({"fence": f.model_dump(mode="json")} for f in fences)
    if args.json:
        print_json(console, itertools.chain(lines, lag_json(lags), fence_lines))
    else:
        tables()
        print_lags(console, lags)
        for f in fences:
            state = "revoked" if f.revoked else "active"
            console.print(f"fence {f.fence_id} [{state}] {f.scope} {f.target or '*'}: change IDs "
                          f"before {f.before.isoformat()} untrusted ({f.reason})")
    return 0
