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

``--points COUNT`` runs the sync under ``[points]`` with ``PointsPolicy(count=COUNT)``, through
the copier's own path (``consumers/vsphere_executor.py``): with history kept (COUNT > 1) the sync
becomes the pending point before "mark dirty", the target is wrapped in a ``SavingTarget`` (every
write saves the old bytes first) and the point is committed and pruned after "mark clean", all
inside the timed span; COUNT = 1 is the default policy, the path without points. With the option
the JSON line also has, over the same span: ``fsyncs`` (calls of ``os.fsync`` and
``os.fdatasync``, counted by wrapping both), ``wchar``, ``syscw``, ``write_bytes`` and
``read_bytes`` (the process's ``/proc/self/io``: bytes passed to ``write`` calls, their number,
bytes of page cache pages it dirtied and bytes it read from storage; tmpfs counts neither of the
last two), ``saved_bytes`` (old bytes read from the replica and saved, the ``SavingTarget``'s
count) and ``undo_bytes`` (the sealed undo data of the point the sync started from, from the
catalogue).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cbtstream.config import PointsPolicy, load_settings
from cbtstream.extents import Extent
from consumers.copy.engine import CopyOptions, copy_disk
from consumers.copy.sources import open_nbd_source
from consumers.copy.targets import BlockTarget, FileTarget
from consumers.executor import SyncResult
from consumers.points.saving import SavingTarget
from consumers.replica.location import TargetResolver
from consumers.replica.points import SyncPoints, chain_of
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


def _io() -> dict[str, int]:
    """This process's I/O counters (``/proc/self/io``: every thread, the living and the ended)."""
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (line.split(": ") for line in f.read().splitlines())}


def _count_fsyncs() -> list[int]:
    """Count every later call of ``os.fsync`` and ``os.fdatasync`` in this process (the code
    under test looks both up on ``os`` at each call): the list grows by one per call
    (``append`` is atomic, whichever thread calls)."""
    calls: list[int] = []

    def wrap(fn: Callable[[Any], None]) -> Callable[[Any], None]:
        def call(fd: Any) -> None:
            calls.append(fd)
            fn(fd)
        return call

    for name in ("fsync", "fdatasync"):
        setattr(os, name, wrap(getattr(os, name)))
    return calls


async def _main(args: argparse.Namespace) -> dict[str, float | int | str]:
    settings = load_settings()
    options = CopyOptions.from_settings(
        settings.copier, request_bytes=args.request_size, max_in_flight=args.in_flight,
        progress_interval_s=60,
        **({} if args.merge_gap is None else {"merge_gap_bytes": args.merge_gap}))
    resolver = TargetResolver(settings.copier)
    loc = resolver.locate(args.key)
    policy = None if args.points is None else PointsPolicy(count=args.points)
    fsyncs = _count_fsyncs() if policy is not None else []
    points: SyncPoints | None = None
    saving: SavingTarget | None = None
    async with contextlib.AsyncExitStack() as stack:
        src = await stack.enter_async_context(open_nbd_source(
            args.uri, settings.copier.nbd_allow, connections=args.connections))
        capacity = src.size
        plan = plan_for(args.key, capacity, args.generation)
        extents = ([Extent(0, capacity)] if args.extents is None
                   else [Extent(s, n) for s, n in json.loads(args.extents.read_text())])
        t0, cpu0, io0, fsync0 = time.perf_counter(), time.process_time(), _io(), len(fsyncs)
        await stack.enter_async_context(loc.store.lock())
        session = await ReplicaSession.begin(loc, plan, "bench", copier_host(settings.copier))
        stack.callback(session.close)
        if session.admission.replication_type != plan.replication_type:
            raise SystemExit(f"the replica was not admitted as planned: {session.admission}")
        opened = await asyncio.to_thread(resolver.open, loc, capacity)
        assert isinstance(opened, FileTarget)
        target: BlockTarget = await stack.enter_async_context(opened)
        identity = await asyncio.to_thread(loc.identity)
        assert identity is not None
        if policy is not None and policy.keeps_history:  # as the copier's _begin_points
            points = SyncPoints(chain_of(loc.store, plan.disk.key, capacity), policy)
            stack.callback(points.close)
            await points.begin(plan, session.record if session.state is None else session.state)
            if points.writer is not None:
                target = saving = SavingTarget(target, points.writer)
        await session.mark_dirty(plan.replication_type, identity)
        tree = await session.base_tree(plan.replication_type, capacity)
        result = await copy_disk(src, target, extents, capacity=capacity, options=options,
                                 tree=tree)
        synced = SyncResult(plan.replication_type, plan.reason, result.bytes_copied,
                            result.bytes_zeroed, result.extents, result.digest,
                            result.duration_s, bytes_read=result.bytes_read,
                            bytes_changed=result.bytes_changed)
        done = await session.mark_clean(synced, tree, identity)
        if points is not None:
            assert session.state is not None
            await points.commit(plan, session.state)
        seconds, cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
        io = _io()
    figures: dict[str, float | int | str] = {
        "duration_s": seconds, "engine_s": result.duration_s, "cpu_s": cpu_s,
        "bytes_read": result.bytes_read, "bytes_changed": result.bytes_changed,
        "replica_digest": done.replica_digest or ""}
    if policy is not None:
        figures |= {k: io[k] - io0[k] for k in ("wchar", "syscw", "write_bytes", "read_bytes")}
        figures |= {"fsyncs": len(fsyncs) - fsync0,
                    "saved_bytes": saving.saved_bytes if saving is not None else 0,
                    "undo_bytes": _undo_bytes(points)}
    return figures


def _undo_bytes(points: SyncPoints | None) -> int:
    """The sealed undo data of the point the sync started from (0: none, or not sealed)."""
    if points is None:
        return 0
    complete = points.chain.load().complete
    return complete[-2].undo_bytes if len(complete) > 1 else 0


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m cbtctl.bench.synccopy")
    p.add_argument("--request-size", type=int, default=4 << 20)
    p.add_argument("--in-flight", type=int, default=8)
    p.add_argument("--connections", type=int, default=2)
    p.add_argument("--merge-gap", type=int, help="bytes (default: copier.merge_gap_bytes)")
    p.add_argument("--extents", type=Path, help="JSON [[start, length], ...] (incrementals)")
    p.add_argument("--generation", type=int, required=True, help="1: full; N: incremental")
    p.add_argument("--points", type=int, metavar="COUNT",
                   help="[points] count (1: the default policy), and the I/O figures")
    p.add_argument("uri")
    p.add_argument("key")
    print(json.dumps(asyncio.run(_main(p.parse_args()))))


if __name__ == "__main__":
    main()
