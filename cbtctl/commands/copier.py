"""``cbtstream copier``: run the copier consumer (executes plans, publishes commits)."""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path

from cbtstream.config import Settings


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "copier",
        help="run the copier: execute planned syncs and commit change IDs",
        description="Consumes cbt.sync.planned in the consumer group of its pool "
        "('<prefix>cbtstream-copier' for the pool 'default', '<prefix>cbtstream-copier.<pool>' "
        "for copier.pool), runs the plans of disks in that pool: copies each disk's changed "
        "blocks to its replica under copier.target_root, flushes it, then publishes "
        "cbt.changeid.committed (or cbt.sync.failed) and commits the offset.",
    )
    p.add_argument(
        "--local-images",
        type=Path,
        metavar="DIR",
        help="read snapshot images from DIR/<vm uuid>/<snapshot>/disk-<key>.img instead of "
        "vSphere + NBD (whole-image copies; for tests and file-based sources)",
    )
    p.add_argument(
        "--noop", action="store_true", help="copy nothing (pipeline benchmarks and load tests)"
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    return asyncio.run(_run(args, settings))


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    from cbtstream.metrics import Metrics
    from cbtstream.metrics_http import serve_consumer_metrics
    from consumers.copier import OUTCOME_LINGER_MS, Copier
    from consumers.executor import NoopExecutor, SyncExecutor
    from consumers.local import LocalImageExecutor
    from consumers.metered import MeteredPublisher
    from consumers.replica.patrol import patrolling

    executor: SyncExecutor
    if args.noop:
        executor = NoopExecutor()
    elif args.local_images:
        executor = LocalImageExecutor(args.local_images, settings.copier.target_root)
    else:
        from consumers.vsphere_executor import build_vsphere_executor

        executor = await build_vsphere_executor(settings)
    metrics = Metrics()
    async with MeteredPublisher(settings.kafka, metrics, "copier",
                                linger_ms=OUTCOME_LINGER_MS) as publisher:
        copier = Copier(settings, executor, publisher)
        metrics.count_copies(lambda: len(copier.schedule.waiting()),
                             lambda: copier.schedule.running)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, copier.request_stop)
        async with (
            serve_consumer_metrics(metrics, settings.copier.metrics_host,
                                   settings.copier.metrics_port, copier.consumer,
                                   copier.group_id),
            patrolling(settings.copier, publisher.publish),
        ):
            await copier.run()
    return 0
