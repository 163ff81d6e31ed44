"""``cbtstream points``: the restore points of the replicas on this copier host.

``points list`` reads each replica's points catalogue (beside its record, found as ``verify``
finds records: under ``copier.target_root`` and the copier's record directory). ``points
export`` materialises a disk's point, or every disk's point of one VM snapshot, under the
replica's lock, and proves each against the root its commit recorded
(``consumers/replica/export.py``): a point that does not prove is not written, and the exit
code is 1. ``points serve`` exports a point (or every disk's point of one VM snapshot)
read-only over NBD without materialising it, proven first, holding the replica's lock while it
serves (``consumers/replica/serve.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cbtstream.config import Settings

if TYPE_CHECKING:
    from consumers.points.catalogue import Point
    from consumers.replica.verify import Found

#: How long ``export`` waits for a sync holding a replica before reporting it busy.
LOCK_WAIT_S = 600.0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "points",
        help="list and export the restore points of the replicas on this copier host",
        description="Restore points ([points] in the configuration: count, max_age, daily, "
        "weekly): each commit of a disk is a point; the live replica is the newest, older ones "
        "keep the bytes later syncs overwrote (undo data). 'list' shows them; 'export' writes "
        "a point of a disk, or of every disk of a VM at one VM snapshot, to a directory and "
        "proves each against its commit's hash tree root.",
    )
    verbs = p.add_subparsers(dest="verb", required=True)
    ls = verbs.add_parser("list", help="the points of each disk (time, change ID, undo data, "
                          "complete or not)")
    who = ls.add_mutually_exclusive_group()
    who.add_argument("--vm", metavar="UUID", help="the disks of this VM")
    who.add_argument("--disk", metavar="KEY", help="this disk")
    ls.add_argument("--json", action="store_true", help="one JSON line per point")
    ls.set_defaults(handler=run_list)
    ex = verbs.add_parser("export", help="materialise a point and prove it against its root "
                          "(exit 1 if it does not prove)")
    who = ex.add_mutually_exclusive_group(required=True)
    who.add_argument("--vm", metavar="UUID", help="every disk of this VM, at one VM snapshot")
    who.add_argument("--disk", metavar="KEY", help="this disk")
    ex.add_argument("--at", metavar="POINT", required=True,
                    help="the point: its VM snapshot (snapshot-42), or with --disk also its id, "
                    "sync id or change ID (as 'points list' shows them)")
    ex.add_argument("--to", metavar="DIR", required=True, type=Path,
                    help="directory to write <vm uuid>-disk-<n>.<format> into")
    ex.add_argument("--format", choices=("raw", "qcow2"), default="raw",
                    help="raw (sparse) or qcow2 (through qemu-img convert; default raw)")
    ex.add_argument("--json", action="store_true", help="one JSON line per disk exported")
    ex.set_defaults(handler=run_export)
    sv = verbs.add_parser(
        "serve", help="export a point read-only over NBD for an instant look (no copy); a sync "
        "of the disk waits while it serves",
        description="Serve a restore point read-only over NBD, without materialising it and "
        "without touching the live replica: the point is proven against its commit's hash tree "
        "root first (unless --no-verify; exit 1 if it does not prove), then served until "
        "SIGINT/SIGTERM (or --for). Writes are refused. The replica's lock is held the whole "
        "time: a sync of a served disk waits until the serve ends (the copier waits up to an "
        "hour for a replica's lock; a longer serve fails the sync), so keep serves short. "
        "Prints each disk's NBD URI (export <vm uuid>-disk-<n>).")
    who = sv.add_mutually_exclusive_group(required=True)
    who.add_argument("--vm", metavar="UUID", help="every disk of this VM, at one VM snapshot "
                     "(one export per disk)")
    who.add_argument("--disk", metavar="KEY", help="this disk")
    sv.add_argument("--at", metavar="POINT", required=True,
                    help="the point: its VM snapshot (snapshot-42), or with --disk also its id, "
                    "sync id or change ID (as 'points list' shows them)")
    where = sv.add_mutually_exclusive_group()
    where.add_argument("--socket", metavar="PATH", type=Path,
                       help="listen on this unix socket (created mode 0600, removed on exit)")
    where.add_argument("--port", metavar="N", type=int, default=10809,
                       help="listen on this TCP port (default 10809; 0: any free port)")
    sv.add_argument("--bind", metavar="ADDR", default="127.0.0.1",
                    help="TCP address to listen on (default 127.0.0.1; anything else serves "
                    "the point, unencrypted and unauthenticated, to whoever reaches it)")
    sv.add_argument("--for", dest="for_s", metavar="SECONDS", type=float,
                    help="stop after serving this many seconds (default: until SIGINT/SIGTERM)")
    sv.add_argument("--no-verify", action="store_true",
                    help="serve without proving the point first (a full read of it)")
    sv.add_argument("--wait", metavar="SECONDS", type=float, default=LOCK_WAIT_S,
                    help="how long to wait for a sync holding the replica (default 600)")
    sv.add_argument("--json", action="store_true", help="one JSON line per disk served")
    sv.set_defaults(handler=run_serve)


def _wanted(key: str, args: argparse.Namespace) -> bool:
    disk: str | None = args.disk
    vm: str | None = args.vm
    if disk:
        return key == disk
    if vm:
        return key.split("/")[0] == vm.lower()
    return True


def _undo_size(directory: Path, name: str, store: str) -> int:
    """Bytes in an unsealed store's data file (a sync saving into it now, or interrupted)."""
    from consumers.points.undo import HEAD, file_names

    try:
        return max(0, (directory / file_names(name, store)[0]).stat().st_size - HEAD.size)
    except OSError:
        return 0


def list_rows(settings: Settings, args: argparse.Namespace) -> list[dict[str, Any]]:
    from consumers.points import catalogue as cat_mod
    from consumers.replica.location import TargetResolver
    from consumers.replica.verify import find_records

    rows: list[dict[str, Any]] = []
    for f in find_records(TargetResolver(settings.copier)):
        if not _wanted(f.disk_key, args):
            continue
        store = f.location.store
        try:
            cat = cat_mod.load(store.directory, store.name)
        except cat_mod.CatalogueCorrupt as exc:
            rows.append({"disk_key": f.disk_key, "error": str(exc)})
            continue
        if cat is None:
            continue
        live = cat.live
        for p in cat.points:
            undo = p.undo_bytes if p.sealed or p.store is None else _undo_size(
                store.directory, store.name, p.store)
            rows.append({
                "disk_key": f.disk_key, "point": p.id, "vm_snapshot": p.vm_snapshot,
                "taken_at": p.taken_at.isoformat() if p.taken_at else None,
                "committed_at": p.committed_at.isoformat() if p.committed_at else None,
                "change_id": p.change_id, "sync_id": p.sync_id, "undo_bytes": undo,
                "complete": p.complete, "live": live is not None and p.id == live.id,
                "root_digest": p.root_digest,
            })
    return rows


def run_list(args: argparse.Namespace, settings: Settings) -> int:
    rows = list_rows(settings, args)
    if args.json:
        for row in rows:
            print(json.dumps(row, sort_keys=True))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=200)
    table = Table(title="cbtstream points")
    for col in ("disk", "point", "VM snapshot", "snapshot taken", "committed", "change ID",
                "undo data", "state"):
        table.add_column(col)
    for r in rows:
        if "error" in r:
            table.add_row(r["disk_key"], "-", "-", "-", "-", "-", "-", r["error"])
            continue
        state = ("live" if r["live"] else "complete") if r["complete"] else "pending"
        table.add_row(r["disk_key"], str(r["point"]), r["vm_snapshot"] or "-",
                      r["taken_at"] or "-", r["committed_at"] or "-", r["change_id"] or "-",
                      _size(r["undo_bytes"]), state)
    console.print(table)
    if not rows:
        console.print("no restore points (the [points] policy keeps history with count > 1, "
                      "daily or weekly)", markup=False)
    return 0


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)  # pragma: no cover


def run_export(args: argparse.Namespace, settings: Settings) -> int:
    if args.format == "qcow2" and shutil.which("qemu-img") is None:
        print("qcow2 needs qemu-img, which is not installed here: use --format raw")
        return 2
    try:
        results = asyncio.run(_export(args, settings))
    except _Refused as exc:
        print(f"points export: {exc}")
        return 1
    failed = False
    for r in results:
        if args.json:
            print(json.dumps(r, sort_keys=True))
        elif r.get("error"):
            print(f"{r['disk_key']}: NOT exported: {r['error']}")
        else:
            print(f"{r['disk_key']}: point {r['point']} ({r['vm_snapshot']}) -> {r['path']} "
                  f"(proven: {r['root_digest']})")
        failed = failed or bool(r.get("error"))
    return 1 if failed else 0


class _Refused(Exception):
    """The export cannot start (nothing matches, a disk of the VM has no such point)."""


def _choose(args: argparse.Namespace, settings: Settings) -> list[tuple[Found, Point]]:
    """The point ``--at`` of ``--disk``, or of every disk of ``--vm`` (each must have it, or
    nothing is chosen: a VM point is all its disks), in disk key order."""
    from consumers.points import catalogue as cat_mod
    from consumers.replica.location import TargetResolver
    from consumers.replica.state import ReplicaState
    from consumers.replica.verify import find_records

    found = [f for f in find_records(TargetResolver(settings.copier)) if _wanted(f.disk_key, args)
             and isinstance(f.record, ReplicaState)]
    if not found:
        raise _Refused("no replica record on this copier host matches "
                       f"{args.disk or args.vm}")
    chosen = []
    for f in sorted(found, key=lambda f: f.disk_key):
        store = f.location.store
        cat = cat_mod.load(store.directory, store.name)
        point = cat.select(args.at) if cat is not None else None
        if point is None or (args.vm and point.vm_snapshot != args.at):
            raise _Refused(f"{f.disk_key} has no complete point {args.at!r} (see "
                           "'cbtstream points list')")
        chosen.append((f, point))
    return chosen


async def _export(args: argparse.Namespace, settings: Settings) -> list[dict[str, Any]]:
    from cbtstream.errors import CbtStreamError
    from cbtstream.tls import nbd_tls_context
    from consumers.points import catalogue as cat_mod
    from consumers.replica.export import export_point
    from consumers.replica.state import ReplicaState

    # Every disk must have the point before anything is written (a VM point is all its disks).
    chosen = _choose(args, settings)
    args.to.mkdir(parents=True, exist_ok=True)
    out: list[dict[str, Any]] = []
    for f, point in chosen:
        name = f.disk_key.replace("/", "-")
        raw = args.to / f"{name}.raw"
        row: dict[str, Any] = {"disk_key": f.disk_key, "point": point.id,
                               "vm_snapshot": point.vm_snapshot, "change_id": point.change_id,
                               "root_digest": point.root_digest}
        try:
            async with f.location.store.lock(LOCK_WAIT_S):
                # read again under the lock: a sync may have dropped or merged it meanwhile
                store = f.location.store
                cat = cat_mod.load(store.directory, store.name)
                again = cat.select(str(point.id)) if cat is not None else None
                if again is None or again.root_digest != point.root_digest:
                    raise _Refused(f"point {point.id} of {f.disk_key} was dropped meanwhile")
                assert isinstance(f.record, ReplicaState)
                await export_point(f.location, f.disk_key, f.record.capacity_bytes, again, raw,
                                   tls_context=nbd_tls_context(settings.copier))
            path = raw
            if args.format == "qcow2":
                path = args.to / f"{name}.qcow2"
                await asyncio.to_thread(_to_qcow2, raw, path)
            row["path"] = str(path)
        except (CbtStreamError, OSError, ValueError, subprocess.CalledProcessError) as exc:
            row["error"] = str(exc)
        out.append(row)
    return out


def _to_qcow2(raw: Path, qcow2: Path) -> None:
    """``qemu-img convert`` the proven raw file, then remove it."""
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw),
                    str(qcow2)], check=True, capture_output=True)
    os.unlink(raw)


def run_serve(args: argparse.Namespace, settings: Settings) -> int:
    from cbtstream.errors import CbtStreamError

    if args.socket is None and not 0 <= args.port <= 65535:
        print(f"points serve: --port {args.port} is not a TCP port")
        return 2
    try:
        return asyncio.run(_serve(args, settings))
    except _Refused as exc:
        print(f"points serve: {exc}")
        return 1
    except (CbtStreamError, OSError, ValueError) as exc:
        print(f"points serve: NOT served: {exc}")
        return 1


async def _serve(args: argparse.Namespace, settings: Settings) -> int:
    import signal

    from cbtstream.tls import nbd_tls_context
    from consumers.replica.serve import Listen, ServeTarget, serve_points
    from consumers.replica.state import ReplicaState

    targets = []
    for f, point in _choose(args, settings):
        assert isinstance(f.record, ReplicaState)
        targets.append(ServeTarget(f.disk_key, f.location, f.record.capacity_bytes, point))
    listen = Listen(args.bind, args.port, args.socket.absolute() if args.socket else None)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    ready = False

    def show(uris: dict[str, str]) -> None:
        nonlocal ready
        ready = True
        for t in targets:
            p = t.point
            row = {"disk_key": t.disk_key, "point": p.id, "vm_snapshot": p.vm_snapshot,
                   "change_id": p.change_id, "root_digest": p.root_digest,
                   "export": t.export_name, "uri": uris[t.disk_key], "proven": not args.no_verify}
            print(json.dumps(row, sort_keys=True) if args.json else
                  f"{t.disk_key}: point {p.id} ({p.vm_snapshot}) read-only at {uris[t.disk_key]}"
                  + ("" if args.no_verify else f" (proven: {p.root_digest})"), flush=True)
        if not args.json:
            print("a sync of these disks waits until this ends (Ctrl-C to stop)", flush=True)
        if args.for_s is not None:
            loop.call_later(max(0.0, args.for_s), on_signal)

    task = asyncio.create_task(serve_points(
        targets, listen, stop, wait_s=args.wait, verify=not args.no_verify,
        tls_context=nbd_tls_context(settings.copier), on_ready=show))

    def on_signal() -> None:
        stop.set()
        if not ready:  # still waiting for a lock or proving: give up now
            task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    try:
        await task
    except asyncio.CancelledError:
        print("points serve: stopped before serving")
        return 1
    return 0
