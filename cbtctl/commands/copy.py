"""``cbtstream copy``: a manual one-off copy of one disk from an NBD source to its replica.

The replica is the file the configuration assigns to the disk key (``copier.target_root``), and
the source must be in ``copier.nbd_allow``, exactly as for copies the pipeline runs. Extents come
from a JSON file (``[[start, length], ...]``, e.g. a saved QueryChangedDiskAreas answer) or
default to the whole disk.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from cbtstream.config import Settings
from cbtstream.errors import ConfigError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "copy",
        help="copy one disk from an NBD source to its replica (manual, with a progress bar)",
        description="Copy the given extents (default: the whole disk) of an NBD export to the "
        "replica file of DISK_KEY under copier.target_root, flush it, and print the result.",
    )
    p.add_argument("source", help="NBD URI, e.g. nbd://127.0.0.1:10809/ or nbd+unix:///?socket=P")
    p.add_argument("disk_key", help="<vm instance uuid>/disk-<device key>")
    p.add_argument("--extents", type=Path, help="JSON file with [[start, length], ...]")
    p.add_argument("--verify", action="store_true", help="read the target back and compare")
    p.add_argument("--request-size", type=int, help="bytes per request (default: config)")
    p.add_argument("--in-flight", type=int, default=8, help="requests in flight (default 8)")
    p.add_argument("--connections", type=int, default=2, help="NBD connections (default 2)")
    p.add_argument("--sync-id", help="resume key: with --state-dir, checkpoints this sync")
    p.add_argument("--state-dir", type=Path, help="checkpoint directory")
    p.add_argument("--json", action="store_true", help="print the result as JSON, no bar")
    p.set_defaults(handler=run)


def _load_extents(path: Path | None) -> list[tuple[int, int]] | None:
    if path is None:
        return None
    try:
        doc = json.loads(path.read_text())
        return [(int(s), int(n)) for s, n in doc]
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"cannot read extents from {path}: {exc}") from exc


def run(args: argparse.Namespace, settings: Settings) -> int:
    return asyncio.run(_run(args, settings))


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    from cbtstream.extents import Extent
    from consumers.copy.checkpoint import Checkpoint
    from consumers.copy.engine import CopyOptions, copy_disk
    from consumers.copy.progress import RichProgress
    from consumers.copy.sources import open_nbd_source
    from consumers.replica.location import TargetResolver

    copier = settings.copier
    raw = _load_extents(args.extents)
    checkpoint = None
    if args.sync_id or args.state_dir:
        if not (args.sync_id and args.state_dir):
            raise ConfigError("--sync-id and --state-dir go together")
        checkpoint = Checkpoint(args.state_dir, args.disk_key, args.sync_id)
    options = CopyOptions.from_settings(
        copier,
        disk_key=args.disk_key,
        verify=args.verify,
        max_in_flight=args.in_flight,
        progress_interval_s=0.2,
        **({"request_bytes": args.request_size} if args.request_size else {}),
    )
    cpu0 = time.process_time()  # every thread of the process: the engine's CPU cost
    async with open_nbd_source(args.source, copier.nbd_allow, connections=args.connections) as src:
        capacity = src.size
        extents = [Extent(0, capacity)] if raw is None else [Extent(s, n) for s, n in raw]
        target = TargetResolver(copier).target_for(args.disk_key, capacity)
        async with target:
            if args.json:
                result = await copy_disk(
                    src, target, extents, capacity=capacity, options=options, checkpoint=checkpoint
                )
            else:
                with RichProgress() as bar:
                    result = await copy_disk(
                        src,
                        target,
                        extents,
                        capacity=capacity,
                        options=options,
                        checkpoint=checkpoint,
                        on_progress=bar.callback(args.disk_key),
                    )
    cpu_s = time.process_time() - cpu0
    if checkpoint is not None:
        checkpoint.done()
    doc = {
        "disk_key": args.disk_key,
        "target": target.path,
        "bytes_copied": result.bytes_copied,
        "bytes_zeroed": result.bytes_zeroed,
        "bytes_read": result.bytes_read,
        "bytes_changed": result.bytes_changed,
        "extents": result.extents,
        "digest": result.digest,
        "replica_digest": result.replica_digest,
        "duration_s": round(result.duration_s, 4),
        "cpu_s": round(cpu_s, 4),
        "resumed_from": result.resumed_from,
        "verified": result.verified,
    }
    if args.json:
        print(json.dumps(doc))
    else:
        for k, v in doc.items():
            print(f"{k}: {v}")
    sys.stdout.flush()
    return 0
