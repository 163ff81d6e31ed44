"""Bring the whole local stack up, down, or report on it.

:data:`SERVICES` is the start order; ``down`` goes in reverse. Every operation is idempotent:
``up`` leaves running services alone (and still checks they are ready), ``down`` only signals the
pids this stack wrote.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from cbtstream.config import Settings
from cbtstream.stack import system
from cbtstream.stack.kafka import Kafka
from cbtstream.stack.postgres import Postgres
from cbtstream.stack.service import Service, ServiceStatus
from cbtstream.stack.vcsim import VcsimService

#: Service classes in start order. Add a service with one line here.
SERVICES: list[type[Service]] = [
    Kafka,
    Postgres,
    VcsimService,
]

#: How long one service may take to answer after its process started.
READY_TIMEOUT_S = 180.0

Echo = Callable[[str], None]


@dataclass(frozen=True)
class StartReport:
    """What ``up`` did for one service."""

    name: str
    started: bool  # False: it was already running
    seconds: float
    endpoint: str


def services(settings: Settings) -> list[Service]:
    return [cls(settings) for cls in SERVICES]


def up(settings: Settings, echo: Echo = print) -> list[StartReport]:
    """Install, start and wait for every service, then create cbtstream's Kafka topics."""
    system.ensure_tools()
    warning = system.ensure_go_on_path()
    if warning:
        echo(f"warning: {warning}")
    reports = []
    for svc in services(settings):
        t0 = time.monotonic()
        was_running = svc.pid() is not None
        if not was_running:
            echo(f"{svc.name}: starting")
        svc.start()
        svc.wait_ready(READY_TIMEOUT_S)
        seconds = time.monotonic() - t0
        report = StartReport(svc.name, not was_running, seconds, svc.endpoint())
        verb = f"started in {seconds:.1f}s" if report.started else "already running"
        echo(f"{svc.name}: {verb}; {report.endpoint}")
        reports.append(report)
    from cbtstream.kafka import create_topics

    created = asyncio.run(create_topics(settings.kafka))
    echo(f"topics: created {', '.join(created)}" if created else "topics: all exist")
    return reports


def down(settings: Settings, echo: Echo = print) -> None:
    """Stop every service this stack started, in reverse start order."""
    for svc in reversed(services(settings)):
        if svc.pid() is None:
            echo(f"{svc.name}: not running")
            svc.stop()  # clears a stale pid file
            continue
        t0 = time.monotonic()
        svc.stop()
        echo(f"{svc.name}: stopped in {time.monotonic() - t0:.1f}s")


def status(settings: Settings) -> list[ServiceStatus]:
    return [svc.status() for svc in services(settings)]
