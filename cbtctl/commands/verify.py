"""``cbtstream verify``: prove that replicas equal the snapshots their last commits name.

For each replica record on this copier host: take the replica's lock (a running sync is waited
for only briefly, then reported busy), re-hash the replica, compare with its record and with the
disk's latest commit in the log (``consumers/replica/verify.py``), optionally re-hash the
snapshot's NBD export too (``--source``), publish ``ReplicaVerified`` or ``ReplicaMismatch`` and,
on a mismatch, mark the record so the next sync copies the disk in full (``replica_mismatch``).
Exit code 0 when every replica checked is equal, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
from dataclasses import asdict, dataclass
from typing import Any

from cbtstream.config import Settings


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "verify",
        help="re-hash replicas and compare them with their last commit (exit 1 on a mismatch)",
        description="Re-hash every replica this copier host keeps (or those of --disk/--vm), "
        "compare each with the hash tree its record holds and with the disk's latest commit in "
        "the log; with --source also re-hash the snapshot's NBD export while it exists. Each "
        "result is published as ReplicaVerified or ReplicaMismatch (topic cbt.replica.verified); "
        "a mismatched replica is copied in full by its next sync (reason replica_mismatch). "
        "Exit code 0 if every replica checked is equal, 1 otherwise.",
    )
    who = p.add_mutually_exclusive_group()
    who.add_argument("--disk", metavar="KEY", action="append", help="this disk (repeatable)")
    who.add_argument("--vm", metavar="UUID", action="append", help="the disks of this VM")
    who.add_argument("--all", action="store_true", help="every replica (the default)")
    p.add_argument("--source", action="store_true",
                   help="also re-hash the snapshot's NBD export named by the last commit")
    p.add_argument("--no-publish", action="store_true",
                   help="do not publish result events (and do not mark mismatches)")
    p.add_argument("--json", action="store_true", help="one JSON line per replica, no bar")
    p.set_defaults(handler=run)


@dataclass
class Row:
    disk_key: str
    result: str  # equal | mismatch | busy | unverifiable
    change_id: str | None
    replica_digest: str | None
    expected_digest: str | None
    source_digest: str | None
    target: str
    detail: str


def run(args: argparse.Namespace, settings: Settings) -> int:
    rows = asyncio.run(_run(args, settings))
    from rich.console import Console
    from rich.table import Table

    if args.json:
        for row in rows:
            print(json.dumps(asdict(row), sort_keys=True))
    else:
        console = Console()
        if not console.is_terminal:
            console = Console(width=200)  # logs and pipes: one line per row
        table = Table(title="cbtstream verify")
        for col in ("disk", "result", "change ID", "replica digest", "detail"):
            table.add_column(col)
        for r in rows:
            digest = (r.replica_digest or "-").rsplit(":", 1)[-1][:16]
            table.add_row(r.disk_key, r.result, r.change_id or "-", digest,
                          "" if r.result == "equal" else r.detail)
        console.print(table)
        if not rows:
            console.print("no replica record matches (records live under copier.target_root "
                          "and copier.state_dir/targets)")
    return 0 if rows and all(r.result == "equal" for r in rows) else 1


def _wanted(key: str, args: argparse.Namespace) -> bool:
    if args.disk:
        return key in args.disk
    if args.vm:
        return key.split("/")[0] in {v.lower() for v in args.vm}
    return True


async def _run(args: argparse.Namespace, settings: Settings) -> list[Row]:
    from consumers.replica.location import TargetResolver
    from consumers.replica.verify import find_records

    targets = TargetResolver(settings.copier)
    found = [f for f in find_records(targets) if _wanted(f.disk_key, args)]
    latest = await _latest_commits(settings, {f.disk_key for f in found}) if found else {}
    publisher = None
    if not args.no_publish and found:
        from cbtstream.kafka import Publisher

        publisher = Publisher(settings.kafka)
        await publisher.start()
    rows = []
    try:
        for f in found:
            rows.append(await _verify_one(f, targets, settings, latest.get(f.disk_key), args,
                                          publisher))
    finally:
        if publisher is not None:
            await publisher.stop()
    return rows


async def _latest_commits(settings: Settings, keys: set[str]) -> dict[str, Any]:
    """The table row replayed from the log for each disk (its latest applied commit)."""
    from cbtctl.replay.reader import StartAt
    from cbtctl.replay.run import load

    result = await load(settings, StartAt())
    return {k: d.state for k, d in result.disks.items() if k in keys and d.state is not None}


async def _verify_one(f: Any, targets: Any, settings: Settings, row: Any,
                      args: argparse.Namespace, publisher: Any) -> Row:
    from functools import partial

    from cbtstream.tls import nbd_tls_context
    from consumers.replica.verify import check_replica, event_for, read_local_or_nbd

    loc = f.location
    latest = (row.change_id, row.replica_digest) if row is not None else None
    read = partial(read_local_or_nbd, tls_context=nbd_tls_context(settings.copier))

    async def source_root(state: Any) -> str | None:
        if row is None:
            return None
        return await hash_source(settings, row.disk, state.held.vm_snapshot,
                                 state.held.replica_digest, state.capacity_bytes)

    with _bar(args, f.disk_key, _capacity(f)) as advance:
        check = await check_replica(loc, read, latest=latest,
                                    source_root=source_root if args.source else None,
                                    progress=advance, mark=not args.no_publish)
    held = check.state.held if check.state is not None else None
    out = Row(f.disk_key, check.result, held.change_id if held else None, check.replica_digest,
              held.replica_digest if held else None, check.source_digest, loc.location,
              check.detail)
    event = event_for(check, row.disk if row is not None else None)
    if publisher is not None and event is not None:
        await publisher.publish(event)
    return out


def _capacity(f: Any) -> int:
    from consumers.replica.state import ReplicaState

    return f.record.capacity_bytes if isinstance(f.record, ReplicaState) else 0


async def hash_source(settings: Settings, disk: Any, vm_snapshot: str, like: str,
                      capacity: int) -> str | None:
    """Root of the export of ``disk`` in ``vm_snapshot``, in the tree format of the root
    ``like`` (None if the snapshot is gone)."""
    from cbtstream.tls import nbd_tls_context
    from consumers.copy.digest_v1 import version_of
    from consumers.copy.sources import open_nbd_source
    from consumers.exports import ExportNotFound, open_exports
    from consumers.replica.verify import tree_of

    async with contextlib.AsyncExitStack() as stack:
        exports = await stack.enter_async_context(open_exports(settings))
        try:
            export = await stack.enter_async_context(exports.export(disk, vm_snapshot))
        except ExportNotFound:
            return None
        src = await stack.enter_async_context(open_nbd_source(
            export.uri, settings.copier.nbd_allow, connections=1,
            tls_context=nbd_tls_context(settings.copier)))
        tree = await tree_of(src.read_into, capacity, version=version_of(like))
    root: str = tree.root()
    return root


class _bar:
    """A rich progress bar over the bytes re-hashed (none with --json or off a terminal)."""

    def __init__(self, args: argparse.Namespace, key: str, total: int) -> None:
        self.progress: Any = None
        if not args.json:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TransferSpeedColumn,
            )

            console = Console(stderr=True)
            if console.is_terminal:
                self.progress = Progress(TextColumn(key[-12:]), BarColumn(), DownloadColumn(True),
                                         TransferSpeedColumn(), console=console, transient=True)
        self.total = total

    def __enter__(self) -> Any:
        if self.progress is None:
            return None
        self.progress.start()
        task = self.progress.add_task("verify", total=self.total)
        return lambda n: self.progress.advance(task, n)

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()
