"""``cbtstream publish``: validate upstream SnapshotTaken JSON lines and publish them."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import TextIO

from cbtstream.config import Settings


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "publish",
        help="publish SnapshotTaken events (JSON lines) from a file or stdin",
        description="Reads one SnapshotTaken JSON object per line (schemas/json/"
        "snapshot_taken.schema.json), validates each, derives the record key "
        "'<vm instance uuid>/disk-<device key>' from the body and publishes it to "
        "cbt.snapshot.taken. Invalid lines are reported on stderr as 'line N: reason'; valid "
        "lines are published anyway. Exit status: 0 if every line was valid, 1 otherwise. "
        "Prints one JSON line per published event (key, partition, offset).",
    )
    p.add_argument("file", nargs="?", type=Path, help="input file (default: stdin, or '-')")
    p.add_argument(
        "--dry-run", action="store_true", help="validate only, publish nothing"
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.file is None or str(args.file) == "-":
        return asyncio.run(_publish(sys.stdin, args.dry_run, settings))
    with open(args.file, encoding="utf-8", errors="replace") as fh:
        return asyncio.run(_publish(fh, args.dry_run, settings))


async def _publish(stream: TextIO, dry_run: bool, settings: Settings) -> int:
    import json

    from cbtstream.kafka import Publisher
    from producers.upstream import LineError, parse_lines

    bad = 0
    good = 0
    publisher = None if dry_run else Publisher(settings.kafka)
    if publisher is not None:
        await publisher.start()
    try:
        for item in parse_lines(stream):
            if isinstance(item, LineError):
                bad += 1
                print(f"cbtstream publish: {item}", file=sys.stderr)
                continue
            good += 1
            out: dict[str, object] = {"key": item.key, "event_id": str(item.event_id)}
            if publisher is not None:
                partition, offset = await publisher.publish(item)
                out |= {"partition": partition, "offset": offset}
            print(json.dumps(out), flush=True)
    finally:
        if publisher is not None:
            await publisher.stop()
    print(f"cbtstream publish: {good} published, {bad} rejected"
          if not dry_run else f"cbtstream publish: {good} valid, {bad} invalid", file=sys.stderr)
    return 1 if bad else 0
