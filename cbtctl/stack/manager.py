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

from cbtctl.stack import system
from cbtctl.stack.kafka import Kafka
from cbtctl.stack.postgres import Postgres
from cbtctl.stack.service import Service, ServiceStatus
from cbtctl.stack.vcsim import VcsimService
from cbtstream.config import Settings

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
    install_s: float  # packages, jars, config, storage format / initdb
    start_s: float  # process start until the probe answered
    endpoint: str

    @property
    def seconds(self) -> float:
        return self.install_s + self.start_s


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
        if svc.pid() is not None:
            svc.wait_ready(READY_TIMEOUT_S)
            report = StartReport(svc.name, False, 0.0, 0.0, svc.endpoint())
            echo(f"{svc.name}: already running; {report.endpoint}")
            note = svc.restart_needed()
            if note:
                echo(f"{svc.name}: restart needed: {note}")
        else:
            echo(f"{svc.name}: installing and starting")
            t0 = time.monotonic()
            svc.install()
            t1 = time.monotonic()
            svc.start(install=False)
            svc.wait_ready(READY_TIMEOUT_S)
            t2 = time.monotonic()
            report = StartReport(svc.name, True, t1 - t0, t2 - t1, svc.endpoint())
            echo(
                f"{svc.name}: ready in {t2 - t0:.1f}s (install {t1 - t0:.1f}s, "
                f"start-to-ready {t2 - t1:.1f}s); {report.endpoint}"
            )
        reports.append(report)
    from cbtctl.stack import vddk_standin

    echo(f"vddk stand-in: nbdkit loads {vddk_standin.install()}")
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
