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
        table = Table(title="cbtstream verify")
        for col in ("disk", "result", "change ID", "target", "detail"):
            table.add_column(col)
        for r in rows:
            table.add_row(r.disk_key, r.result, r.change_id or "-", r.target, r.detail)
        Console().print(table)
        if not rows:
            Console().print("no replica records found under copier.target_root / state_dir")
    return 0 if rows and all(r.result == "equal" for r in rows) else 1


def _wanted(key: str, args: argparse.Namespace) -> bool:
    if args.disk:
        return key in args.disk
    if args.vm:
        return key.split("/")[0] in {v.lower() for v in args.vm}
    return True


async def _run(args: argparse.Namespace, settings: Settings) -> list[Row]:
    from consumers.copy.targets import TargetResolver
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
    from cbtstream.replay.reader import StartAt
    from cbtstream.replay.run import load

    result = await load(settings, StartAt())
    return {k: d.state for k, d in result.disks.items() if k in keys and d.state is not None}


async def _verify_one(f: Any, targets: Any, settings: Settings, row: Any,
                      args: argparse.Namespace, publisher: Any) -> Row:
    from consumers.copy.sources import open_nbd_source
    from consumers.replica.state import ReplicaState
    from consumers.replica.store import ReplicaBusy
    from consumers.replica.verify import tree_of, usable, verdict

    loc = f.location
    base = Row(f.disk_key, "unverifiable", None, None, None, None, loc.location, "")
    try:
        async with loc.store.lock(wait_s=5.0):
            record = await asyncio.to_thread(loc.store.load)
            assert record is not None
            why = usable(record)
            if why is not None:
                base.detail = why
                return base
            assert isinstance(record, ReplicaState) and record.held is not None
            held = record.held
            base.change_id, base.expected_digest = held.change_id, held.replica_digest
            capacity = record.capacity_bytes
            with _bar(args, f.disk_key, capacity) as advance:
                actual = await _hash_target(targets, loc, capacity, settings, advance)
            held_tree = await asyncio.to_thread(loc.store.load_tree, held, capacity)
            source_root = None
            if args.source:
                source_root = await _hash_source(settings, row, held, capacity,
                                                 open_nbd_source, tree_of)
                base.source_digest = source_root
            latest_cid = row.change_id if row is not None else None
            latest_digest = row.replica_digest if row is not None else None
            v = verdict(record, actual, held_tree, latest_cid, latest_digest, source_root)
            base.replica_digest = actual.root()
            base.result, base.detail = ("equal" if v.ok else "mismatch"), v.detail
            if not v.ok and publisher is not None:
                await asyncio.to_thread(loc.store.save, record.mismatched(v.detail))
            if publisher is not None and row is not None:
                await publisher.publish(_event(v, row, held, base))
            elif row is None:
                base.detail += " (no commit of this disk in the log: no event published)"
            return base
    except ReplicaBusy as exc:
        base.result, base.detail = "busy", str(exc)
        return base


def _event(v: Any, row: Any, held: Any, r: Row) -> Any:
    from schemas.events import ReplicaMismatch, ReplicaVerified

    common = dict(disk=row.disk, sync_id=held.sync_id, change_id=held.change_id,
                  expected_digest=r.expected_digest, replica_digest=r.replica_digest,
                  source_digest=r.source_digest, target=r.target[:1024])
    if v.ok:
        return ReplicaVerified(**common)
    return ReplicaMismatch(**common, detail=v.detail[:4096], bad_leaves=v.bad_leaves,
                           first_bad_offset=v.first_bad_offset)


async def _hash_target(targets: Any, loc: Any, capacity: int, settings: Settings,
                       advance: Any) -> Any:
    from cbtstream.tls import nbd_tls_context
    from consumers.copy.sources import NbdSource
    from consumers.nbd.uri import parse_nbd_uri
    from consumers.replica.state import TargetKind
    from consumers.replica.verify import tree_of

    if loc.kind == TargetKind.NBD:
        async with NbdSource(parse_nbd_uri(loc.location), connections=1,
                             tls_context=nbd_tls_context(settings.copier)) as src:
            return await tree_of(src.read_into, capacity, advance)
    import os

    fd = os.open(loc.location, os.O_RDONLY | os.O_CLOEXEC
                 | (os.O_NOFOLLOW if loc.kind == TargetKind.FILE else 0))
    try:
        async def read_into(offset: int, buf: memoryview) -> None:
            done = 0
            while done < len(buf):
                n = await asyncio.to_thread(os.preadv, fd, [buf[done:]], offset + done)
                if n == 0:
                    raise OSError(f"{loc.location} ends before {offset + done}")
                done += n

        return await tree_of(read_into, capacity, advance)
    finally:
        os.close(fd)


async def _hash_source(settings: Settings, row: Any, held: Any, capacity: int,
                       open_nbd_source: Any, tree_of: Any) -> str | None:
    """Root of the snapshot's export the replica is recorded to hold (None if it is gone)."""
    if row is None:
        return None
    from cbtstream.tls import nbd_tls_context
    from cbtstream.vsphere.exports import ExportNotFound, open_exports

    async with contextlib.AsyncExitStack() as stack:
        exports = await stack.enter_async_context(open_exports(settings))
        try:
            export = await stack.enter_async_context(exports.export(row.disk, held.vm_snapshot))
        except ExportNotFound:
            return None
        src = await stack.enter_async_context(open_nbd_source(
            export.uri, settings.copier.nbd_allow, connections=1,
            tls_context=nbd_tls_context(settings.copier)))
        tree = await tree_of(src.read_into, capacity)
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
