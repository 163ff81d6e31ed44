"""``cbtstream snapshots list|prune``: find and remove orphaned cbtstream snapshots.

Lists every snapshot of every VM with a decision (``producers/orphans.py``): ``orphaned``
(cbtstream's, needed by no running or waiting sync, older than ``--older-than``), ``needed``,
``too_young``, ``not_ours`` (never touched) or ``needs_unknown``; and the VMs whose
``runtime.consolidationNeeded`` is set. Which snapshots syncs need is asked of the planner
worker (``GET /api/v1/snapshots/needed``); without an answer from a worker holding the whole
table, ``prune`` refuses. ``prune`` removes the orphans and publishes ``SnapshotRemoved`` with
reason ``orphaned``; ``--dry-run`` only lists them; ``--consolidate`` also consolidates the
disks of the VMs that need it. One JSON line per snapshot, VM or removal.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta

from cbtstream.config import Settings


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("snapshots", help="list or prune orphaned cbtstream snapshots",
                       description=__doc__)
    p.add_argument("action", choices=("list", "prune"))
    p.add_argument("--older-than", default="6h", metavar="AGE",
                   help="orphans must be at least this old (30m, 6h, 2d; default 6h)")
    p.add_argument("--dry-run", action="store_true", help="prune: show, remove nothing")
    p.add_argument("--consolidate", action="store_true",
                   help="prune: also consolidate disks of VMs with consolidationNeeded")
    p.add_argument("--vcenter", metavar="URL", help="SDK URL (default: vsphere.url)")
    p.add_argument("--insecure", action="store_true",
                   help="do not verify the server's TLS certificate (labs and the simulator)")
    p.set_defaults(handler=run)


def needed_from_worker(settings: Settings) -> set[tuple[str, str]] | None:
    """The worker's answer, or None when no worker holding the whole table answers."""
    s = settings.streams
    req = urllib.request.Request(f"http://{s.web_host}:{s.web_port}/api/v1/snapshots/needed")
    if settings.api.token is not None:
        req.add_header("Authorization", f"Bearer {settings.api.token.get_secret_value()}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            doc = json.loads(resp.read())
    except (OSError, urllib.error.URLError, ValueError):
        return None
    if not doc.get("complete"):
        return None
    return {(n["vm_instance_uuid"], n["vm_snapshot"]) for n in doc.get("needed") or []}


def run(args: argparse.Namespace, settings: Settings) -> int:
    from cbtstream.errors import ConfigError
    from producers.scheduler import parse_interval

    try:
        older_than = timedelta(seconds=parse_interval(args.older_than))
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    from cbtctl.commands.vsphere_args import vsphere_settings

    vsettings = vsphere_settings(args, settings.vsphere)
    return asyncio.run(_run(args, settings.model_copy(update={"vsphere": vsettings}),
                            older_than))


async def _run(args: argparse.Namespace, settings: Settings, older_than: timedelta) -> int:
    from cbtstream.errors import CbtStreamError
    from cbtstream.kafka import Publisher
    from cbtstream.vsphere.adapter import VSphereClient
    from producers.orphans import prune, select

    def emit(doc: dict[str, object]) -> None:
        print(json.dumps(doc), flush=True)

    needed = await asyncio.to_thread(needed_from_worker, settings)
    async with VSphereClient(settings.vsphere) as client:
        selection = select(await client.list_snapshots(), needed, datetime.now(UTC), older_than)
        for v in selection.verdicts:
            emit({"type": "snapshot", "vm": v.snapshot.vm.instance_uuid,
                  "path": v.snapshot.vm.path, "vm_snapshot": v.snapshot.moref,
                  "name": v.snapshot.name, "created": v.snapshot.created.isoformat(),
                  "decision": v.decision})
        for vm in selection.consolidation_needed:
            emit({"type": "consolidation_needed", "vm": vm.instance_uuid, "path": vm.path})
        if args.action == "list" or args.dry_run:
            return 0
        if needed is None:
            raise CbtStreamError("no planner worker holding the whole disks table answered "
                                 "GET /api/v1/snapshots/needed: cannot tell which snapshots "
                                 "running or waiting syncs need, nothing removed")
        async with Publisher(settings.kafka) as publisher:
            removed = await prune(client, publisher, selection, consolidate=args.consolidate)
        for event in removed:
            emit({"type": "removed", "disk": event.disk.key, "vm_snapshot": event.vm_snapshot,
                  "reason": str(event.reason)})
        if args.consolidate:
            for vm in selection.consolidation_needed:
                emit({"type": "consolidated", "vm": vm.instance_uuid, "path": vm.path})
    return 0
