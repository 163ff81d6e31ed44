"""``cbtstream schedule``: the site scheduler (policies of ``[schedule]``, see
``producers/site.py``)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import signal
import sys

from cbtstream.config import Settings, VSphereSettings

#: How far back a scheduler reads its partitions of cbt.schedule.events when it gets them:
#: two of the longest RPO (the last snapshot taken and the last report of every VM), at least
#: an hour.
_MIN_LOOKBACK_S = 3600.0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "schedule",
        help="run the site scheduler: snapshot the VMs of the [schedule] policies",
        description="Every schedule.tick_s, read the vCenter inventory, apply the protection "
        "policies ([[schedule.policies]]: folders, clusters, tags, name patterns, VMs; an RPO, "
        "an interval, a window), and snapshot the VMs that are due, concurrently within "
        "schedule.max_snapshots_per_vcenter and max_snapshots_per_esxi_host. A VM whose "
        "previous snapshot is still being copied is not snapshotted again (rpo_at_risk); a "
        "missed RPO is reported (rpo_missed). Both are ScheduleEvents on cbt.schedule.events "
        "and metrics (schedule.metrics_port). Several schedulers of one vCenter share its VMs "
        "through a consumer group. A policy problem (matches nothing, a folder, cluster, tag "
        "or VM that does not exist, a VM claimed with two RPOs) stops the start (exit 2) and "
        "is a warning in later cycles.",
    )
    p.add_argument("--vcenter", metavar="URL", help="SDK URL (default: vsphere.url)")
    p.add_argument("--insecure", action="store_true",
                   help="do not verify the server's TLS certificate (labs and the simulator)")
    p.add_argument("--check", action="store_true",
                   help="resolve the policies against the inventory, print each VM's policy "
                   "and exit (2 if there is a problem)")
    p.add_argument("--cycles", type=int, metavar="N", help="stop after N cycles (tests)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from cbtctl.commands.vsphere_args import vsphere_settings

    return asyncio.run(_run(args, settings, vsphere_settings(args, settings.vsphere)))


def group_id(prefix: str, vcenter: str) -> str:
    """One scheduler group per vCenter: schedulers of two vCenters never split each other's
    VMs."""
    return f"{prefix}cbtstream-scheduler.{re.sub(r'[^A-Za-z0-9._-]', '_', vcenter)}"


async def _run(args: argparse.Namespace, settings: Settings, vsettings: VSphereSettings) -> int:
    from cbtstream.errors import ConfigError
    from cbtstream.kafka import Publisher, topic_name
    from cbtstream.membership import KeyOwnership
    from cbtstream.metrics import ScheduleMetrics
    from cbtstream.metrics_http import MetricsServer
    from cbtstream.vsphere.adapter import VSphereClient
    from cbtstream.vsphere.tags import TagClient
    from producers.site import SiteScheduler
    from schemas.topics import SCHEDULE_EVENTS
    from streams.holds import HoldBook

    sched = settings.schedule
    metrics = ScheduleMetrics()
    async with VSphereClient(vsettings) as client, Publisher(settings.kafka) as publisher:
        ownership: KeyOwnership | None = None
        holds = HoldBook(settings.kafka)  # failed-over VMs are not snapshotted
        scheduler = SiteScheduler(client, publisher, sched, tags=TagClient(vsettings),
                                  metrics=metrics,
                                  owns=lambda uuid: ownership is not None and ownership.owns(
                                      uuid),
                                  held=lambda uuid: holds.hold_of(uuid) is not None)
        try:
            res = await scheduler.check()
        except ConfigError as exc:
            print(f"cbtstream: error: {exc}", file=sys.stderr)
            return 2
        if args.check:
            for uuid, a in sorted(res.assignments.items(), key=lambda x: x[1].vm.vm.path):
                print(f"{a.policy.name}\t{uuid}\t{a.vm.vm.path}")
            return 0
        lookback = max(_MIN_LOOKBACK_S, 2 * max(p.rpo_s for p in sched.policies))
        ownership = KeyOwnership(
            settings.kafka, topic_name(SCHEDULE_EVENTS, settings.kafka),
            group_id(settings.kafka.topic_prefix, client.vcenter), lookback_s=lookback,
            on_record=scheduler.remember_record, on_revoke=scheduler.release)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        server = MetricsServer(metrics, sched.metrics_host, sched.metrics_port) \
            if sched.metrics_port else None
        if server is not None:
            try:
                await server.start()
            except OSError as exc:
                raise ConfigError(
                    f"the scheduler's metrics endpoint cannot listen on {sched.metrics_host}:"
                    f"{sched.metrics_port} ({exc.strerror}); give each scheduler on a host its "
                    "own schedule.metrics_port, or 0 for none") from exc
        reading = asyncio.create_task(holds.run())
        try:
            await asyncio.wait_for(holds.wait_ready(), 60)
            async with ownership:
                await ownership.wait_ready(60)
                failures = await scheduler.run(stop, cycles=args.cycles)
        finally:
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reading
            if server is not None:
                await server.stop()
        return 1 if failures and args.cycles else 0
