"""One sync of one disk as the copier runs it, for ``bench copy``'s incremental cases.

``python -m cbtctl.bench.synccopy [--extents FILE] [--merge-gap N] ... --generation N URI KEY``
copies the NBD export onto the replica of ``KEY`` (a file under ``copier.target_root``) through
the replica's session and record (``consumers/replica/session.py``): admission, dirty record,
the base tree's leaf file and journal, the copy, the tree saved and the clean record. Generation
1 is a full copy; generation N > 1 an incremental of ``FILE``'s extents from generation N - 1,
so its cost includes opening and saving the tree, as in production (``cbtstream copy`` keeps no
record, so an incremental there starts from a zero tree). Prints one JSON line: the wall time
of the sync (process start-up and connections excluded), the engine's share, the CPU seconds of
the process over the sync, the bytes read from the source and the bytes of the changed areas.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cbtstream.config import load_settings
from cbtstream.extents import Extent
from consumers.copy.engine import CopyOptions, copy_disk
from consumers.copy.sources import open_nbd_source
from consumers.copy.targets import FileTarget
from consumers.executor import SyncResult
from consumers.replica.location import TargetResolver
from consumers.replica.session import ReplicaSession, copier_host
from schemas import DiskRef, FullReason, ReplicationType, SyncPlanned

_EPOCH = "52 00 00 00 00 00 00 00-00 00 00 00 00 00 be 0c"
_T0 = datetime(2026, 1, 1, tzinfo=UTC)


def plan_for(key: str, capacity: int, generation: int) -> SyncPlanned:
    """The plan of ``generation`` in a chain: full first, then incrementals one after another."""
    vm, _, disk = key.partition("/disk-")
    full = generation == 1
    previous = None if full else f"{_EPOCH}/{generation - 1}"
    return SyncPlanned(
        disk=DiskRef(vm_instance_uuid=vm, vm_path="/bench/vm", vm_name="bench",
                     device_key=int(disk), disk_id=f"disk-{disk}", backing_uuid="6000C29-bench",
                     backing_file="[ds] bench/bench.vmdk", capacity_bytes=capacity),
        sync_id=uuid.uuid5(uuid.NAMESPACE_OID, f"{key}/{generation}"),
        snapshot_event_id=uuid.uuid4(), vm_snapshot=f"snapshot-{generation}",
        replication_type=ReplicationType.FULL if full else ReplicationType.INCREMENTAL,
        reason=FullReason.NO_PREVIOUS_COMMIT if full else FullReason.PREVIOUS_COMMIT,
        previous_change_id=previous, base_change_id=previous,
        change_id=f"{_EPOCH}/{generation}", generation=generation,
        snapshot_taken_at=_T0 + timedelta(seconds=generation))


async def _main(args: argparse.Namespace) -> dict[str, float | int | str]:
    settings = load_settings()
    options = CopyOptions.from_settings(
        settings.copier, request_bytes=args.request_size, max_in_flight=args.in_flight,
        progress_interval_s=60,
        **({} if args.merge_gap is None else {"merge_gap_bytes": args.merge_gap}))
    resolver = TargetResolver(settings.copier)
    loc = resolver.locate(args.key)
    async with contextlib.AsyncExitStack() as stack:
        src = await stack.enter_async_context(open_nbd_source(
            args.uri, settings.copier.nbd_allow, connections=args.connections))
        capacity = src.size
        plan = plan_for(args.key, capacity, args.generation)
        extents = ([Extent(0, capacity)] if args.extents is None
                   else [Extent(s, n) for s, n in json.loads(args.extents.read_text())])
        t0, cpu0 = time.perf_counter(), time.process_time()
        await stack.enter_async_context(loc.store.lock())
        session = await ReplicaSession.begin(loc, plan, "bench", copier_host(settings.copier))
        stack.callback(session.close)
        if session.admission.replication_type != plan.replication_type:
            raise SystemExit(f"the replica was not admitted as planned: {session.admission}")
        opened = await asyncio.to_thread(resolver.open, loc, capacity)
        assert isinstance(opened, FileTarget)
        target = await stack.enter_async_context(opened)
        identity = await asyncio.to_thread(loc.identity)
        assert identity is not None
        await session.mark_dirty(plan.replication_type, identity)
        tree = await session.base_tree(plan.replication_type, capacity)
        result = await copy_disk(src, target, extents, capacity=capacity, options=options,
                                 tree=tree)
        synced = SyncResult(plan.replication_type, plan.reason, result.bytes_copied,
                            result.bytes_zeroed, result.extents, result.digest,
                            result.duration_s, bytes_read=result.bytes_read,
                            bytes_changed=result.bytes_changed)
        done = await session.mark_clean(synced, tree, identity)
        seconds, cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
    return {"duration_s": seconds, "engine_s": result.duration_s, "cpu_s": cpu_s,
            "bytes_read": result.bytes_read, "bytes_changed": result.bytes_changed,
            "replica_digest": done.replica_digest or ""}


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m cbtctl.bench.synccopy")
    p.add_argument("--request-size", type=int, default=4 << 20)
    p.add_argument("--in-flight", type=int, default=8)
    p.add_argument("--connections", type=int, default=2)
    p.add_argument("--merge-gap", type=int, help="bytes (default: copier.merge_gap_bytes)")
    p.add_argument("--extents", type=Path, help="JSON [[start, length], ...] (incrementals)")
    p.add_argument("--generation", type=int, required=True, help="1: full; N: incremental")
    p.add_argument("uri")
    p.add_argument("key")
    print(json.dumps(asyncio.run(_main(p.parse_args()))))


if __name__ == "__main__":
    main()
