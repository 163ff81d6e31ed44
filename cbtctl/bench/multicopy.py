"""Several disk copies in one process, as the copier runs them (``bench copy`` case (d)).

``python -m cbtctl.bench.multicopy --request-size N --in-flight N --connections N
URI KEY [URI KEY ...]`` copies each NBD export whole to the replica of its disk key (files under
``copier.target_root``, sources in ``copier.nbd_allow``, from the environment) with
:func:`consumers.copy.engine.copy_disks`, and prints one JSON line: the wall time of all copies
(connections included) and the process's CPU seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time

from cbtstream.config import load_settings
from cbtstream.extents import Extent
from consumers.copy.engine import CopyOptions, DiskJob, copy_disks
from consumers.copy.sources import open_nbd_source
from consumers.replica.location import TargetResolver


async def _main(args: argparse.Namespace) -> dict[str, float]:
    settings = load_settings()
    pairs = list(zip(args.pairs[::2], args.pairs[1::2], strict=True))
    options = CopyOptions.from_settings(settings.copier, request_bytes=args.request_size,
                                        max_in_flight=args.in_flight, progress_interval_s=60)
    t0, cpu0 = time.perf_counter(), time.process_time()
    async with contextlib.AsyncExitStack() as stack:
        jobs = []
        for uri, key in pairs:
            src = await stack.enter_async_context(open_nbd_source(
                uri, settings.copier.nbd_allow, connections=args.connections))
            target = await stack.enter_async_context(
                TargetResolver(settings.copier).target_for(key, src.size))
            jobs.append(DiskJob(key, src, target, [Extent(0, src.size)], src.size))
        results = await copy_disks(jobs, options, max_parallel=len(jobs))
    failed = [k for k, r in results.items() if isinstance(r, Exception)]
    if failed:
        raise SystemExit(f"copies failed: {failed}")
    return {"duration_s": time.perf_counter() - t0, "cpu_s": time.process_time() - cpu0}


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m cbtctl.bench.multicopy")
    p.add_argument("--request-size", type=int, default=4 << 20)
    p.add_argument("--in-flight", type=int, default=8)
    p.add_argument("--connections", type=int, default=2)
    p.add_argument("pairs", nargs="+", metavar="URI KEY")
    print(json.dumps(asyncio.run(_main(p.parse_args()))))


if __name__ == "__main__":
    main()
