"""``cbtstream stack up|down|status``: the local development stack, without Docker."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import TYPE_CHECKING

from cbtstream.config import Settings

if TYPE_CHECKING:
    from cbtctl.stack.manager import StartReport

_DESCRIPTION = """\
Install and run the services cbtstream needs on this machine, without Docker:
Apache Kafka 3.9.1 (KRaft, jars from Maven Central), PostgreSQL 15 (Debian) and the CBT-capable
vSphere simulator (govmomi, built with Go). Missing system packages are installed with
apt-get when run as root.

  up      install what is missing, start every service, wait until each really answers,
          create cbtstream's Kafka topics and print how to connect (idempotent)
  down    stop the services this stack started, in reverse order (idempotent)
  status  show each service; exit 1 when one is not running or not ready

Everything (data, logs/<service>.log, run/<service>.pid, jars, bin/kafka-* console tools) lives
under the state folder (CBTSTREAM_STACK__DIR, default .stack). Ports: CBTSTREAM_STACK__KAFKA_PORT
(19092), CBTSTREAM_STACK__KAFKA_CONTROLLER_PORT (19093), CBTSTREAM_STACK__POSTGRES_PORT (15432),
CBTSTREAM_STACK__VCSIM_PORT (18989). Clients read CBTSTREAM_KAFKA__BOOTSTRAP_SERVERS and
CBTSTREAM_POSTGRES__PORT: change them together with the stack's ports.
"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "stack",
        help="start, stop or inspect the local dev stack (Kafka, PostgreSQL, vcsim)",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("action", choices=("up", "down", "status"))
    p.add_argument("--json", action="store_true", help="status: print JSON instead of a table")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from cbtctl.stack import manager

    if args.action == "up":
        reports = manager.up(settings)
        print(_connection_info(settings, reports))
        return 0
    if args.action == "down":
        manager.down(settings)
        return 0
    statuses = manager.status(settings)
    if args.json:
        print(json.dumps([dataclasses.asdict(s) for s in statuses], indent=2))
    else:
        for s in statuses:
            state = "ready" if s.ready else ("running, not ready" if s.running else "stopped")
            print(f"{s.name:<10} {state:<20} pid={s.pid or '-':<8} {s.detail}")
    return 0 if all(s.ready for s in statuses) else 1


def _connection_info(settings: Settings, reports: list[StartReport]) -> str:
    """How to reach each service; passwords are never printed."""
    state = settings.stack.dir.resolve()
    lines = ["", "Connect:"]
    lines += [f"  {r.name:<10} {r.endpoint}" for r in reports]
    lines += [
        f"  clients    CBTSTREAM_KAFKA__BOOTSTRAP_SERVERS={settings.kafka.bootstrap_servers} "
        f"CBTSTREAM_POSTGRES__PORT={settings.postgres.port} (password: settings.postgres)",
        f"  tools      {state}/bin/kafka-{{topics,console-consumer,console-producer,"
        "consumer-groups}",
        f"  logs       {state}/logs/",
    ]
    return "\n".join(lines)
