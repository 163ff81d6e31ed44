"""``cbtstream demo``: replicate a three-disk VM over three cycles on the local stack."""

from __future__ import annotations

import argparse
import asyncio

from cbtstream.config import Settings


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo",
        help="run the demo replication on the local stack (make demo)",
        description="Creates a VM with three disks in the local vSphere simulator, starts the "
        "planner and the copier, and runs three snapshot cycles with guest writes in between "
        "and a CBT reset of one disk before the third. Prints a per-disk table and compares "
        "every replica with its snapshot byte for byte; exits 1 on any mismatch. Needs "
        "`cbtstream stack up`.",
    )
    p.add_argument("--name", help="VM name (default: demo-<random>)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    import logging

    from rich.console import Console

    from cbtctl.demo.run import run_demo

    console = Console()
    if not console.is_terminal:
        console = Console(width=150)  # logs and CI: keep the table on one line per disk
    if not args.verbose:
        logging.getLogger().setLevel(logging.WARNING)  # the progress bars tell the story
    return asyncio.run(run_demo(settings, console, name=args.name))
