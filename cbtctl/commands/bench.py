"""``cbtstream bench``: benchmarks run by hand (not tests).

``bench copy`` (cbtstream's copy engine against ``nbdcopy``: full copies, a latency-bound and
rate-limited source, four disks at once, incrementals onto a replica with its record and tree)
is described in :mod:`cbtctl.bench.copy`; ``bench pipeline`` (disks/s through the whole
orchestration) in :mod:`cbtctl.bench.pipeline`; ``bench site`` (a site in miniature: the
scheduler, several workers, a copier pool, restarts) in :mod:`cbtctl.bench.site`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cbtstream.config import Settings

_M = 1 << 20


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("bench", help="benchmarks run by hand (not tests)")
    bench_sub = p.add_subparsers(title="benchmarks", metavar="BENCH")
    c = bench_sub.add_parser("copy", help="cbtstream's copy engine against nbdcopy")
    c.add_argument("--size-mib", type=int, default=1024, help="image size (default 1024)")
    c.add_argument("--runs", type=int, default=3, help="runs per case, best kept (default 3)")
    c.add_argument("--dir", type=Path, help="work directory (default: /dev/shm or tmp)")
    c.add_argument("--request-size", type=int, default=2 * _M)
    c.add_argument("--in-flight", type=int, default=8)
    c.add_argument("--connections", type=int, default=2)
    c.add_argument("--latency-ms", type=int, default=2,
                   help="read latency of cases (c), (f), (h), nbdkit's delay filter (default 2)")
    c.add_argument("--rate", default="1G",
                   help="per-source rate of cases (d), (g), (h), nbdkit's rate filter "
                   "(default 1G bit/s)")
    c.add_argument("--many", type=int, default=64,
                   help="disks of case (i), copied at once, each 1/MANY of the image "
                   "(default 64)")
    c.add_argument("--gaps", default="",
                   help="merge gaps to run the incrementals (f)-(h) with, e.g. 0,64K,256K,1M "
                   "(default: copier.merge_gap_bytes)")
    c.set_defaults(handler=run_copy)
    pl = bench_sub.add_parser(
        "pipeline", help="disks/s and latency through snapshot -> plan -> no-op copy -> table")
    pl.add_argument("--disks", type=int, default=20_000, help="disks (default 20000)")
    pl.add_argument("--disks-per-vm", type=int, default=2)
    pl.add_argument("--partitions", type=int, help="partitions per topic (default: settings)")
    pl.add_argument("--rate", type=float, default=0.0,
                    help="publish at this many disks/s (default 0: as fast as possible)")
    pl.add_argument("--timeout", type=float, default=600.0, help="seconds (default 600)")
    pl.add_argument("--log-level", default="WARNING",
                    choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                    help="of the worker and copier (default WARNING)")
    pl.add_argument("--keep-topics", action="store_true", help="do not delete the run's topics")
    pl.add_argument("--device-keys", action=argparse.BooleanOptionalAction, default=True,
                    help="publish snapshot_device_keys like `cbtstream snapshot` does, so every "
                    "VM snapshot goes through the lifecycle (--no-device-keys: like an upstream "
                    "publisher that manages its snapshots; default: with)")
    pl.add_argument("--workers", type=int, default=1,
                    help="worker processes sharing the partitions (default 1)")
    pl.set_defaults(handler=run_pipeline)

    st = bench_sub.add_parser(
        "site", help="a site in miniature: VMs in a private simulator, workers, a copier pool, "
        "the scheduler; seeding and cycles with restarts, then every replica compared",
        description="See cbtctl/bench/site.py. Needs the stack's Kafka (cbtstream stack up); "
        "starts its own simulator. The last line is JSON.")
    st.add_argument("--vms", type=int, default=1000, help="VMs (default 1000)")
    st.add_argument("--disks-per-vm", type=int, default=3)
    st.add_argument("--disk-mib", type=int, default=1,
                    help="small disk size; every 20th disk is 8x, every 100th 32x (default 1)")
    st.add_argument("--cycles", type=int, default=5, help="incremental cycles (default 5)")
    st.add_argument("--workers", type=int, default=2)
    st.add_argument("--copiers", type=int, default=3)
    st.add_argument("--rate", type=int, default=8 * _M,
                    help="per-copy read rate in bytes/s (default 8 MiB/s)")
    st.add_argument("--rpo", type=float, default=120.0, help="the policy's RPO in seconds")
    st.add_argument("--every", type=float, default=20.0, help="seconds between snapshot slots")
    st.add_argument("--partitions", type=int, default=8)
    st.add_argument("--no-restart", action="store_true",
                    help="do not restart a worker and a copier during the cycles")
    st.add_argument("--churn", action="store_true",
                    help="kill a copier in every cycle and restart a worker in every other, "
                    "instead of one of each")
    st.add_argument("--timeout", type=float, default=1800.0, help="seconds per phase")
    st.add_argument("--keep", action="store_true", help="keep the work directory")
    st.set_defaults(handler=run_site)

    def usage(args: argparse.Namespace, settings: Settings) -> int:
        p.print_help()
        return 2

    p.set_defaults(handler=usage)


def run_pipeline(args: argparse.Namespace, settings: Settings) -> int:
    """``bench pipeline``: see :mod:`cbtctl.bench.pipeline`."""
    from cbtctl.bench.pipeline import Options
    from cbtctl.bench.pipeline import run_pipeline as run

    return run(settings, Options(
        disks=args.disks, disks_per_vm=args.disks_per_vm,
        partitions=args.partitions or settings.kafka.partitions, rate=args.rate,
        timeout_s=args.timeout, log_level=args.log_level, keep=args.keep_topics,
        device_keys=args.device_keys, workers=args.workers))


def run_copy(args: argparse.Namespace, settings: Settings) -> int:
    """``bench copy``: see :mod:`cbtctl.bench.copy`."""
    from cbtctl.bench.copy import run_copy as run

    return run(args)


def run_site(args: argparse.Namespace, settings: Settings) -> int:
    """``bench site``: see :mod:`cbtctl.bench.site`."""
    import asyncio

    from cbtctl.bench.site import SiteOptions
    from cbtctl.bench.site import run_site as run

    opts = SiteOptions(
        vms=args.vms, disks_per_vm=args.disks_per_vm, disk_bytes=args.disk_mib * _M,
        cycles=args.cycles, workers=args.workers, copiers=args.copiers, rate=args.rate,
        rpo_s=args.rpo, every_s=args.every, partitions=args.partitions,
        restart=not args.no_restart, churn=args.churn, timeout_s=args.timeout, keep=args.keep)
    result = asyncio.run(run(settings, opts, report=lambda line: print(line, flush=True)))
    print(result.line())
    return 0 if result.replicas_differing == 0 and result.snapshots_left == 0 else 1
