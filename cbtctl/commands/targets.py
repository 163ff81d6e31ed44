"""``cbtstream targets``: each disk's replica target and what its record says it holds, with the
replica's id, the host that last wrote its record and this copier's pool."""

from __future__ import annotations

import argparse
import json

from cbtstream.config import Settings


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "targets",
        help="list each replica's target (file, block device, NBD) and its recorded state",
        description="Lists the replica records this copier host sees (under copier.target_root "
        "and copier.record_dir) and the operator's copier.targets mappings: for each disk its "
        "target, this copier's pool (copier.pool), the replica id and the host that last wrote "
        "its record, the state (clean/dirty/mismatch/unknown), the change ID, generation and "
        "replica digest it holds. --forget KEY drops a record and its resume checkpoints (the "
        "next sync is then full with reason replica_state_unknown; in a host-local pool, the "
        "way to let this host take over a replica another host's record names).",
    )
    p.add_argument("--json", action="store_true", help="one JSON line per target")
    p.add_argument("--forget", metavar="KEY", action="append",
                   help="remove the record of this disk's replica (repeatable)")
    p.set_defaults(handler=run)


def rows(settings: Settings) -> list[dict[str, object]]:
    from consumers.replica.location import TargetResolver
    from consumers.replica.state import ReplicaState
    from consumers.replica.verify import find_records

    targets = TargetResolver(settings.copier)
    pool = settings.copier.pool
    out: list[dict[str, object]] = []
    keys = set()
    for f in find_records(targets):
        keys.add(f.disk_key)
        r = f.record
        row: dict[str, object] = {"disk_key": f.disk_key, "kind": f.location.kind.value,
                                  "target": f.location.location, "pool": pool}
        if isinstance(r, ReplicaState):
            held = r.held
            row |= {"replica_id": str(r.replica_id) if r.replica_id else None,
                    "host": r.host,
                    "state": r.status.value,
                    "change_id": held.change_id if held else None,
                    "generation": r.high_generation,
                    "sync_id": str(held.sync_id) if held else None,
                    "replica_digest": held.replica_digest if held else None,
                    "writing_sync_id": str(r.writing.sync_id) if r.writing else None,
                    "detail": r.mismatch_detail}
        else:
            row |= {"state": "unknown", "detail": r.detail}
        out.append(row)
    for m in settings.copier.targets:
        if m.disk is not None and m.disk not in keys:
            loc = targets.locate(m.disk)
            out.append({"disk_key": m.disk, "kind": loc.kind.value, "target": loc.location,
                        "pool": pool, "state": "no record"})
    return out


def run(args: argparse.Namespace, settings: Settings) -> int:
    from rich.console import Console
    from rich.table import Table

    from consumers.replica.location import TargetResolver

    if args.forget:
        targets = TargetResolver(settings.copier)
        for key in args.forget:
            targets.locate(key).store.forget()
            print(f"forgot the replica record of {key}")
        return 0
    found = rows(settings)
    if args.json:
        for row in found:
            print(json.dumps(row, sort_keys=True))
        return 0
    table = Table(title="cbtstream targets")
    for col in ("disk", "kind", "target", "pool", "host", "replica id", "state", "change ID",
                "generation"):
        table.add_column(col)
    for r in found:
        table.add_row(str(r["disk_key"]), str(r["kind"]), str(r["target"]), str(r["pool"]),
                      str(r.get("host") or "-"), str(r.get("replica_id") or "-"),
                      str(r["state"]), str(r.get("change_id") or "-"),
                      str(r.get("generation") or "-"))
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)  # logs and pipes: one line per row
    console.print(table)
    return 0
