"""The ``cbtstream`` command line: a thin dispatcher over one module per subcommand.

Each module in :data:`COMMANDS` exposes ``register(subparsers)``, which adds its parser and sets
``handler`` to a function ``(args, settings) -> int``. Modules import their heavy dependencies
inside the handler so ``cbtstream --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from cbtstream import __version__
from cbtstream.config import Settings, load_settings
from cbtstream.errors import CbtStreamError
from cbtstream.log import configure_logging

#: Subcommand modules, in the order ``--help`` lists them.
COMMANDS: tuple[str, ...] = (
    "cbtctl.commands.topics",
    "cbtctl.commands.worker",
    "cbtctl.commands.copier",
    "cbtctl.commands.replay",
    "cbtctl.commands.status",
    "cbtctl.commands.fence",
    "cbtctl.commands.pools",
    "cbtctl.commands.table",
    "cbtctl.commands.audit",
    "cbtctl.commands.db",
    "cbtctl.commands.publish",
    "cbtctl.commands.demo",
    "cbtctl.commands.snapshot",
    "cbtctl.commands.schedule",
    "cbtctl.commands.cbt",
    "cbtctl.commands.vm",
    "cbtctl.commands.snapshots",
    "cbtctl.commands.schemas",
    "cbtctl.commands.copy",
    "cbtctl.commands.verify",
    "cbtctl.commands.targets",
    "cbtctl.commands.points",
    "cbtctl.commands.failover",
    "cbtctl.commands.cutover",
    "cbtctl.commands.bench",
    "cbtctl.commands.config",
    "cbtctl.commands.stack",
)

Handler = Callable[[argparse.Namespace, Settings], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cbtstream",
        description=(
            "Incremental, per-disk replication of VMware VMs with Changed Block Tracking, as an "
            "event pipeline over Kafka. Configuration comes from CBTSTREAM_* environment "
            "variables and an optional TOML file (--config)."
        ),
    )
    parser.add_argument("--version", action="version", version=f"cbtstream {__version__}")
    parser.add_argument(
        "--config", type=Path, help="TOML configuration file (also CBTSTREAM_CONFIG)"
    )
    parser.add_argument(
        "--log-format", choices=("json", "console"), help="log line format (default: json)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(name)
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        settings = load_settings(args.config)
        level = "DEBUG" if args.verbose else settings.log_level
        configure_logging(level, args.log_format or settings.log_format,
                          settings.library_log_level)
        return handler(args, settings)
    except CbtStreamError as exc:
        print(f"cbtstream: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
