"""``cbtstream failover VM``: hand a VM's replicas to the operator; ``--undo`` takes them back.

Failover, in order: publish ``ReplicationHold(failed_over)`` on ``cbt.vm.holds`` (every planner
worker reads it: each later snapshot of the VM's disks is refused with
``SyncFailed(vm_failed_over)``, nothing is planned); then, on this copier host, mark each of the
VM's replica records failed over, under the replica's lock (a sync writing it is waited for,
``--wait``). The copier refuses any plan for a failed-over replica (``replica_failed_over``),
also one produced again by hand. Run it on every copier host that keeps replicas of the VM.

``--at POINT`` (a VM snapshot, as ``points list`` shows it): after the hold, each replica is
rolled back to that restore point, under its lock: the point's bytes are written back from its
undo data, the whole replica is proven against the point's hash-tree root, and the record then
holds the point (its change ID: after failback the next sync is incremental from it,
``replica_rebased``). Points newer than POINT are dropped (export them first if needed). File
and block-device replicas; ``consumers/replica/rollback.py`` has the order of effects.

``--undo``, in order: re-hash each replica and compare it with its record. Untouched, it returns
to replication and the next sync is incremental; written while failed over (or not verifiable),
it is marked ``mismatch`` and the next sync copies it in full (``replica_mismatch``). Then the
hold is released. A replica left busy keeps the hold: run the command again.

Exit code 0 when every replica of the VM was handled, 1 otherwise (also when none was found).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import uuid
from dataclasses import asdict
from typing import Any

from cbtstream.config import Settings
from cbtstream.errors import ConfigError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "failover", help="hand a VM's replicas to the operator (nothing planned or written "
        "for it); --undo returns them to replication", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("vm", metavar="VM", nargs="?", help="the VM: instance uuid, name or "
                   "inventory path (as its replica records name it)")
    p.add_argument("--list", action="store_true",
                   help="print every VM's latest hold (JSON lines) and exit")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--undo", action="store_true",
                      help="fail back: check each replica and return it to replication")
    what.add_argument("--at", metavar="POINT",
                      help="roll each replica back to this restore point first (its VM "
                      "snapshot, as 'cbtstream points list' shows it); newer points are dropped")
    p.add_argument("--reason", default="", help="why (kept in the hold and the records)")
    p.add_argument("--wait", type=float, default=600.0, metavar="S",
                   help="seconds to wait for a sync writing a replica (default 600)")
    p.add_argument("--json", action="store_true", help="one JSON line per replica")
    p.add_argument("--force", action="store_true",
                   help="also for a VM that was cut over (cbtstream cutover): its replicas "
                   "belong to the target platform, and --undo would replicate onto them again")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.list:
        from streams.holds import read_holds

        for hold in asyncio.run(read_holds(settings.kafka)):
            print(hold.model_dump_json())
        return 0
    if not args.vm:
        raise ConfigError("name the VM (or --list the holds)")
    rows, vm = asyncio.run(_run(args, settings))
    if args.json:
        for r in rows:
            print(json.dumps({"vm": vm, **asdict(r)}, sort_keys=True))
    else:
        from rich.console import Console
        from rich.table import Table

        console = Console()
        if not console.is_terminal:
            console = Console(width=200)
        table = Table(title=f"cbtstream failover{' --undo' if args.undo else ''} {vm}")
        for col in ("disk", "result", "change ID", "detail"):
            table.add_column(col)
        for r in rows:
            table.add_row(r.disk_key, r.result, r.change_id or "-", r.detail)
        console.print(table)
    return 0 if rows and all(r.ok for r in rows) else 1


def _match(found: Any, vm: str) -> bool:
    from consumers.replica.state import ReplicaState

    key = found.disk_key.split("/")[0]
    if key == vm.lower():
        return True
    disk = found.record.disk if isinstance(found.record, ReplicaState) else None
    return disk is not None and vm in (disk.vm_name, disk.vm_path)


def find_vm_records(settings: Settings, vm: str) -> list[Any]:
    """The replica records on this copier host of the VM ``vm`` (uuid, name or path)."""
    from consumers.replica.location import TargetResolver
    from consumers.replica.verify import find_records

    return [f for f in find_records(TargetResolver(settings.copier)) if _match(f, vm)]


async def _run(args: argparse.Namespace, settings: Settings) -> tuple[list[Any], str]:
    from functools import partial

    from cbtstream.kafka import Publisher
    from cbtstream.tls import nbd_tls_context
    from consumers.replica.failover import hand_over, take_back
    from consumers.replica.rollback import roll_back
    from consumers.replica.verify import read_local_or_nbd
    from schemas.events import HoldState, ReplicationHold

    found = find_vm_records(settings, args.vm)
    vms = {f.disk_key.split("/")[0] for f in found}
    if len(vms) > 1:
        raise ConfigError(f"{args.vm!r} names several VMs ({', '.join(sorted(vms))}): "
                          "give the instance uuid")
    if not vms:
        try:
            vm = str(uuid.UUID(args.vm))
        except ValueError:
            raise ConfigError(f"no replica record on this host names the VM {args.vm!r}; give "
                              "its instance uuid to publish the hold anyway") from None
    else:
        vm = vms.pop()
    if not args.force:
        from streams.holds import read_holds

        cut = [h for h in await read_holds(settings.kafka)
               if str(h.vm_instance_uuid) == vm and h.state == HoldState.CUT_OVER]
        if cut:
            raise ConfigError(f"{vm} was cut over at {cut[0].occurred_at.isoformat()} "
                              f"({cut[0].reason}): its replicas belong to the target platform. "
                              "Give --force to fail it over or back all the same")
    if args.at:
        from consumers.replica.rollback import missing_point

        lacking = [why for f in found if (why := missing_point(f, args.at)) is not None]
        if lacking:
            raise ConfigError("not every replica of the VM can be rolled back to "
                              f"{args.at!r}, so none is (nothing held): " + "; ".join(lacking))
    reason = args.reason or ("failed back" if args.undo else "failed over by the operator")
    hold = ReplicationHold(vm_instance_uuid=uuid.UUID(vm), reason=reason,
                           state=HoldState.RELEASED if args.undo else HoldState.FAILED_OVER)
    rows = []
    async with Publisher(settings.kafka) as pub:
        if not args.undo:
            await pub.publish(hold)  # first: no new plan for the VM from here on
            for f in found:
                if args.at:
                    rows.append(await roll_back(f, args.at, reason, args.wait))
                else:
                    rows.append(await hand_over(f, reason, args.wait))
        else:
            read = partial(read_local_or_nbd, tls_context=nbd_tls_context(settings.copier))
            for f in found:
                rows.append(await take_back(f, read, args.wait))
            if rows and all(r.ok for r in rows):
                await pub.publish(hold)  # last: plans resume only onto checked replicas
    return rows, vm
