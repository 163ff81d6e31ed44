"""``cbtstream worker``: run the Faust planner (table + agents + HTTP views)."""

from __future__ import annotations

import argparse

from cbtstream.config import Settings


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "worker",
        help="run the Faust planner worker",
        description="Runs the Faust application: materialises each disk's latest committed "
        "change ID from cbt.changeid.committed (through the commit guard) and plans a sync for "
        "every cbt.snapshot.taken event. Stop with Ctrl-C or SIGTERM (a clean stop, bounded by "
        "streams.shutdown_timeout_s).",
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio
    import logging

    if settings.api.token is None:  # the settings allow it on a loopback bind only
        logging.getLogger("cbtstream.worker").warning(
            "api.token is not set: the HTTP API's read endpoints are open to local users and "
            "every store call (POST) is refused with 403; set CBTSTREAM_API__TOKEN to accept "
            "them", extra={"web_host": settings.streams.web_host,
                           "web_port": settings.streams.web_port})

    from cbtstream.kafka import ensure_topics
    from streams.app import build
    from streams.worker import DeadlineWorker

    settings.streams.data_dir.mkdir(parents=True, exist_ok=True)
    remover = None
    if settings.streams.remove_snapshots:
        from streams.vsphere_remover import VSphereSnapshotRemover

        remover = VSphereSnapshotRemover(settings.vsphere)
    orphans = None
    if settings.streams.orphan_interval_s > 0:
        from datetime import timedelta

        from producers.orphans import OrphanReaper

        orphans = OrphanReaper(settings.vsphere,
                               timedelta(seconds=settings.streams.orphan_older_than_s),
                               consolidate=settings.streams.orphan_consolidate)
    planner_app = build(settings, remover, orphans)
    # Every topic must be in the cluster metadata before Faust's first assignment, or its
    # assignor skips it until the next rebalance (a worker started right after topic creation
    # would consume nothing). Those that exist are checked first: a partition count that breaks
    # co-partitioning, another cleanup policy or a shorter retention stops the worker here
    # (cbtstream.topic_check), before it reads or writes anything.
    asyncio.run(ensure_topics(settings.kafka, planner_app.kafka_topics()))
    worker = DeadlineWorker(
        planner_app.app,
        loglevel=settings.log_level.lower(),
        override_logging=False,
        quiet=True,
        shutdown_timeout_s=settings.streams.shutdown_timeout_s,
    )
    worker.execute_from_commandline()
    return 0
