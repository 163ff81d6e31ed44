"""How long the table's status takes for a site: ``python -m cbtctl.bench.status [--disks
15000] [--workers 2] [--partitions 4] [--disks-per-vm 3]``.

On the real broker, with real workers and a no-op copier: every disk gets one ``SnapshotTaken``
and its first (full) sync committed, then ``GET /api/v1/status`` (every disk and the site
summary, gathered from every worker) and ``?disks=0`` (the summary only) are timed several
times on the first worker, and ``cbtstream status --json --summary`` and ``--json`` end to end
(a Python process start included; first and best of 3). Prints the figures; asserts nothing.
The run uses its own topic prefix and deletes its topics at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from cbtctl.bench.pipeline import (
    Options,
    _ChangelogWatch,
    _push,
    bench_settings,
    delete_topics,
    snapshot_event,
    wait_group_stable,
    worker_settings,
)
from cbtctl.demo.processes import Proc, child_env
from cbtstream.config import Settings, load_settings
from cbtstream.kafka import create_topics


def get(url: str, token: str | None) -> tuple[float, int, dict[str, Any]]:
    """Seconds, body bytes and the decoded answer of one GET."""
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=60) as resp:
        body = resp.read()
    return time.perf_counter() - t0, len(body), json.loads(body)


async def fill(settings: Settings, opts: Options, work: Path, workers: list[Proc]) -> None:
    """Every disk through its first sync (the table then holds ``opts.disks`` committed rows)."""
    if opts.workers > 1:
        await wait_group_stable(settings, opts.workers, time.monotonic() + 120)
    run = uuid.uuid4().hex
    # without snapshot_device_keys: no lifecycle notices, only the rows the status reads
    events = [snapshot_event(i, opts.disks_per_vm, run, device_keys=False)
              for i in range(opts.disks)]
    watch = _ChangelogWatch(settings)
    reader = None
    try:
        await _push(settings, watch, events[:1], 0)
        await asyncio.wait_for(watch.start(), 120)
        reader = asyncio.create_task(watch.run(opts.disks, time.monotonic() + opts.timeout_s))
        await _push(settings, watch, events[1:], 0)
        while not reader.done():
            await asyncio.wait([reader], timeout=5)
            if not all(w.alive for w in workers):
                raise RuntimeError("a worker exited")
            print(f"  {len(watch.seen)}/{opts.disks} committed", flush=True)
        await reader
    finally:
        await watch.stop()


def measure(settings: Settings, base: str, token: str | None, rounds: int) -> None:
    for query, what in (("", "every disk + summary"), ("?disks=0", "summary only")):
        times: list[float] = []
        size, doc = 0, dict[str, Any]()
        for _ in range(rounds):
            t, size, doc = get(f"{base}/api/v1/status{query}", token)
            times.append(t)
        print(f"GET /api/v1/status{query} ({what}): {doc['summary']['disks']} disks from "
              f"{len(doc['workers'])} workers, {size / 1e6:.1f} MB; first {times[0]:.3f} s, "
              f"median {statistics.median(times):.3f} s, max {max(times):.3f} s", flush=True)
    for flags in (["--json", "--summary"], ["--json"]):
        cli: list[float] = []
        for _ in range(3):
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, "-m", "cbtctl.cli", "status", *flags],
                                 env=child_env(settings), capture_output=True, text=True,
                                 check=True)
            cli.append(time.perf_counter() - t0)
        site = next(json.loads(x) for x in out.stdout.splitlines() if '"type":"site"' in x)
        print(f"cbtstream status {' '.join(flags)}: first {cli[0]:.2f} s, best {min(cli):.2f} s "
              f"end to end ({site['disks']} disks, {len(out.stdout) / 1e6:.1f} MB, states "
              f"{site['states']})", flush=True)


async def main_async(opts: Options, rounds: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="cbtbench-status-"))
    settings = bench_settings(load_settings(), work, opts)
    token = "bench-status-token-0123456789"
    settings = Settings.model_validate({**settings.model_dump(), "api": {"token": token}})
    print(f"topic prefix {settings.kafka.topic_prefix}, {opts.disks} disks, {opts.workers} "
          f"workers, {opts.partitions} partitions, logs {work}", flush=True)
    await create_topics(settings.kafka)
    wsettings = [worker_settings(settings, work, i) for i in range(opts.workers)]
    workers = [Proc(["worker"], s, work / f"worker{i}.log") for i, s in enumerate(wsettings)]
    copier = Proc(["copier", "--noop"], settings, work / "copier.log")
    try:
        t0 = time.perf_counter()
        await fill(settings, opts, work, workers)
        print(f"filled in {time.perf_counter() - t0:.0f} s", flush=True)
        await asyncio.to_thread(measure, wsettings[0],
                                f"http://127.0.0.1:{wsettings[0].streams.web_port}", token,
                                rounds)
    finally:
        for p in (copier, *workers):
            p.stop()
        print(f"deleted {await delete_topics(settings)} topics", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--disks", type=int, default=15_000)
    p.add_argument("--disks-per-vm", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    opts = Options(disks=a.disks, disks_per_vm=a.disks_per_vm, partitions=a.partitions,
                   workers=a.workers, timeout_s=900)
    asyncio.run(main_async(opts, a.rounds))


if __name__ == "__main__":
    main()
