"""``cbtstream bench``: benchmarks run by hand (not tests).

``bench copy`` builds its own images (in /dev/shm when it exists), serves them read-only with
nbdkit over unix sockets, and times ``cbtstream copy`` and ``nbdcopy`` on identical work:

(a) full copy of a dense random image to a file, (b) full copy of an image 25% allocated, (c) the
dense copy from a latency-bound source (nbdkit's ``delay`` filter, 2 ms per read: where
production's VDDK/NFC spends its time, requests in flight decide), (d) four disks at once, each
source behind nbdkit's ``rate`` filter (1 Gbit/s), aggregate throughput (cbtstream: one process
copying the four, as the copier does, ``cbtctl.bench.multicopy``; nbdcopy: four processes), (e)
an incremental of 1% of the disk in scattered 64 KiB extents (cbtstream only; nbdcopy has no extent
list), and the CPU seconds (user+sys, every thread) per GiB of the copying process on (a). Each
measurement is the best of ``--runs`` runs; tools alternate; targets are deleted before every full
copy, so both tools pay for fresh target pages. cbtstream runs as a child process (``cbtstream copy
--json``) so its peak RSS is measured with ``wait4``; its time is the engine's own ``duration_s``
(connect, copy, flush; not Python start-up) and its CPU is measured around the copy; nbdcopy's are
its wall time and ``wait4`` rusage. (d) is the wall time of all four copies (connections included;
Python start-up excluded, nbdcopy's process start-up included).
The last line is machine-readable::

    full_ratio=<cbtstream MB/s / nbdcopy MB/s> sparse_ratio=<same> latency_ratio=<same>
    aggregate_ratio=<same> cpu_ratio=<cbtstream CPU/GiB / nbdcopy CPU/GiB>
    incr_fraction=<incr time / full time> peak_rss_mib=<n>

``bench pipeline`` (disks/s through the whole orchestration) is described in
:mod:`cbtctl.bench.pipeline`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cbtstream.config import Settings
from cbtstream.errors import StackError

_M = 1 << 20
_VM = "00000000-0000-4000-8000-00000000b0b0"


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
                   help="read latency of case (c), nbdkit's delay filter (default 2)")
    c.add_argument("--rate", default="1G",
                   help="per-source rate of case (d), nbdkit's rate filter (default 1G bit/s)")
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


def _make_images(work: Path, size: int) -> tuple[Path, Path]:
    rng = random.Random(20240601)
    block = bytearray(rng.randbytes(4 * _M))
    dense, sparse = work / "dense.img", work / "sparse.img"
    with dense.open("wb") as f:
        for i in range(0, size, len(block)):
            block[:8] = i.to_bytes(8, "big")  # every block differs
            f.write(block[: min(len(block), size - i)])
    chunks = size // _M
    allocated = sorted(rng.sample(range(chunks), chunks // 4))
    with sparse.open("wb") as f:
        f.truncate(size)
        for c in allocated:
            f.seek(c * _M)
            block[:8] = c.to_bytes(8, "big")
            f.write(block[:_M])
    return dense, sparse


class _Nbdkit:
    def __init__(self, image: Path, sock: Path, *filters: str) -> None:
        """``nbdkit file`` serving ``image`` read-only on ``sock``; ``filters`` are
        ``--filter=NAME`` options and their ``key=value`` parameters, in nbdkit's order."""
        self.sock = sock
        self.uri = f"nbd+unix:///?socket={sock}"
        names = [f for f in filters if f.startswith("--filter=")]
        params = [f for f in filters if not f.startswith("--filter=")]
        self.proc = subprocess.Popen(
            ["nbdkit", "--exit-with-parent", "-f", "-r", "-U", str(sock), *names, "file",
             str(image), *params]
        )
        deadline = time.monotonic() + 10
        while True:  # bind() creates the socket file before listen(): wait for a connect
            if sock.exists():
                with socket.socket(socket.AF_UNIX) as s:
                    if s.connect_ex(str(sock)) == 0:
                        break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise StackError("nbdkit did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@dataclass
class _Run:
    """One copy: engine (or wall) seconds, CPU seconds of the copying process, peak RSS."""

    seconds: float
    cpu_s: float
    rss: int = 0


def _cbtstream_cmd(args: argparse.Namespace, uri: str, key: str, extents: Path | None
                   ) -> list[str]:
    cmd = [sys.executable, "-m", "cbtctl.cli", "copy", uri, key, "--json"]
    cmd += ["--request-size", str(args.request_size), "--in-flight", str(args.in_flight)]
    cmd += ["--connections", str(args.connections)]
    if extents is not None:
        cmd += ["--extents", str(extents)]
    return cmd


def _wait(proc: subprocess.Popen[bytes], what: str) -> tuple[bytes, Any]:
    assert proc.stdout is not None
    out = proc.stdout.read()
    proc.stdout.close()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise StackError(f"{what} failed with exit code {proc.returncode}")
    return out, usage


def _run_cbtstream(
    args: argparse.Namespace, env: dict[str, str], uri: str, extents: Path | None,
    key: str = f"{_VM}/disk-1",
) -> _Run:
    """One ``cbtstream copy`` child: its engine time, the CPU the copy took (all threads,
    measured inside the child around the copy, so Python start-up is not counted) and peak
    RSS (``wait4``)."""
    proc = subprocess.Popen(_cbtstream_cmd(args, uri, key, extents), env=env,
                            stdout=subprocess.PIPE)
    out, usage = _wait(proc, "cbtstream copy")
    result = json.loads(out.decode().strip().splitlines()[-1])
    return _Run(float(result["duration_s"]), float(result["cpu_s"]), usage.ru_maxrss * 1024)


def _run_nbdcopy(uri: str, target: Path) -> _Run:
    t = time.perf_counter()
    proc = subprocess.Popen(["nbdcopy", uri, str(target)], stdout=subprocess.PIPE)
    _, usage = _wait(proc, "nbdcopy")
    return _Run(time.perf_counter() - t, usage.ru_utime + usage.ru_stime)


def _parallel(cmds: list[list[str]], env: dict[str, str]) -> float:
    """Wall time of running ``cmds`` at once (nbdcopy's side of the aggregate case)."""
    t = time.perf_counter()
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL) for c in cmds]
    for cmd, p in zip(cmds, procs, strict=True):
        if p.wait() != 0:
            raise StackError(f"{cmd[0]} failed with exit code {p.returncode}")
    return time.perf_counter() - t


def run_copy(args: argparse.Namespace, settings: Settings) -> int:
    for tool in ("nbdkit", "nbdcopy"):
        if shutil.which(tool) is None:
            raise StackError(f"{tool} is not installed (Debian: nbdkit, libnbd-bin)")
    base = args.dir or (Path("/dev/shm") if Path("/dev/shm").is_dir() else None)
    work = Path(tempfile.mkdtemp(prefix="cbtbench-", dir=base))
    servers: list[_Nbdkit] = []
    try:
        return _bench(args, work, servers)
    finally:
        for s in servers:
            s.stop()
        shutil.rmtree(work, ignore_errors=True)


def _bench(args: argparse.Namespace, work: Path, servers: list[_Nbdkit]) -> int:
    size = args.size_mib * _M
    print(f"building {args.size_mib} MiB images in {work} ...", flush=True)
    dense, sparse = _make_images(work, size)
    small = work / "small.img"  # the rate-limited aggregate case copies a quarter per disk
    with dense.open("rb") as fin, small.open("wb") as fout:
        # in 4 MiB pieces: children forked from a fat parent would report its RSS as theirs
        for _ in range(max(_M, size // 4) // (4 * _M) or 1):
            fout.write(fin.read(4 * _M))
    servers += [_Nbdkit(dense, work / "dense.sock"), _Nbdkit(sparse, work / "sparse.sock"),
                _Nbdkit(dense, work / "slow.sock", "--filter=delay",
                        f"rdelay={args.latency_ms}ms")]
    # burstiness well below the copy's length, so the rate is what each disk sustains
    rated = [_Nbdkit(small, work / f"rated{i}.sock", "--filter=rate", f"rate={args.rate}",
                     "burstiness=0.1") for i in range(4)]
    servers += rated
    root = work / "replicas"
    replica = root / _VM / "disk-1.img"
    other = work / "nbdcopy.img"
    allow = json.dumps([f"unix:{s.sock}" for s in servers])
    env = dict(os.environ, CBTSTREAM_COPIER__TARGET_ROOT=str(root))
    env["CBTSTREAM_COPIER__NBD_ALLOW"] = allow
    peak = 0

    def fresh() -> None:
        for p in (replica, other):
            p.unlink(missing_ok=True)

    def full(uri: str) -> tuple[_Run, _Run]:
        nonlocal peak
        best_c = best_n = _Run(float("inf"), 0.0)
        for _ in range(args.runs):
            fresh()
            c = _run_cbtstream(args, env, uri, None)
            peak = max(peak, c.rss)
            best_c = min(best_c, c, key=lambda r: r.seconds)
            fresh()
            best_n = min(best_n, _run_nbdcopy(uri, other), key=lambda r: r.seconds)
        return best_c, best_n

    # Warm-up: fault in target pages once so the first timed run is not penalised.
    _run_nbdcopy(servers[0].uri, other)
    fresh()
    dense_c, dense_n = full(servers[0].uri)
    sparse_c, sparse_n = full(servers[1].uri)
    slow_c, slow_n = full(servers[2].uri)

    # (d) four disks at once, each source behind the rate filter: aggregate throughput.
    small_size = small.stat().st_size
    agg_c = agg_n = float("inf")
    multi = [sys.executable, "-m", "cbtctl.bench.multicopy", "--request-size",
             str(args.request_size), "--in-flight", str(args.in_flight), "--connections",
             str(args.connections)]
    for i, s in enumerate(rated):
        multi += [s.uri, f"{_VM}/disk-{i + 10}"]
    for _ in range(args.runs):
        shutil.rmtree(root, ignore_errors=True)
        proc = subprocess.Popen(multi, env=env, stdout=subprocess.PIPE)
        out, _ = _wait(proc, "cbtstream multicopy")
        agg_c = min(agg_c, float(json.loads(out.decode().splitlines()[-1])["duration_s"]))
        for i in range(4):
            (work / f"nbdcopy{i}.img").unlink(missing_ok=True)
        agg_n = min(agg_n, _parallel([["nbdcopy", s.uri, str(work / f"nbdcopy{i}.img")]
                                      for i, s in enumerate(rated)], env))
    shutil.rmtree(root, ignore_errors=True)

    # (e) incremental: 1% of the disk in scattered 64 KiB extents, onto an existing replica.
    rng = random.Random(7)
    n_ext = max(1, size // 100 // (64 * 1024))
    starts = sorted(rng.sample(range(size // (64 * 1024)), n_ext))
    extents = work / "extents.json"
    extents.write_text(json.dumps([[s * 64 * 1024, 64 * 1024] for s in starts]))
    fresh()
    _run_cbtstream(args, env, servers[0].uri, None)
    incr = float("inf")
    for _ in range(args.runs):
        r = _run_cbtstream(args, env, servers[0].uri, extents)
        peak, incr = max(peak, r.rss), min(incr, r.seconds)

    mb, gib = size / 1e6, size / (1 << 30)
    agg_mb = 4 * small_size / 1e6
    print(f"{'case':<34}{'cbtstream':>14}{'nbdcopy':>14}")
    rows = [("(a) dense full", dense_c, dense_n), ("(b) 25% allocated full", sparse_c, sparse_n),
            (f"(c) dense, {args.latency_ms} ms per read", slow_c, slow_n)]
    for name, c, n in rows:
        print(f"{name:<34}{mb / c.seconds:>10.0f} MB/s{mb / n.seconds:>10.0f} MB/s")
    print(f"{'(d) 4 disks at ' + args.rate + 'bit/s each':<34}{agg_mb / agg_c:>10.0f} MB/s"
          f"{agg_mb / agg_n:>10.0f} MB/s")
    print(f"{'(e) 1% incremental':<34}{incr:>12.3f} s {'-':>13}")
    print(f"{'CPU s per GiB, dense full':<34}{dense_c.cpu_s / gib:>12.3f}  "
          f"{dense_n.cpu_s / gib:>12.3f}")
    print(f"times (s): dense {dense_c.seconds:.3f}/{dense_n.seconds:.3f} sparse "
          f"{sparse_c.seconds:.3f}/{sparse_n.seconds:.3f} latency {slow_c.seconds:.3f}/"
          f"{slow_n.seconds:.3f} aggregate {agg_c:.3f}/{agg_n:.3f}")

    def ratio(c: float, n: float) -> float:
        return n / c  # MB/s ratio = inverse time ratio on identical work

    print(
        f"full_ratio={ratio(dense_c.seconds, dense_n.seconds):.2f} "
        f"sparse_ratio={ratio(sparse_c.seconds, sparse_n.seconds):.2f} "
        f"latency_ratio={ratio(slow_c.seconds, slow_n.seconds):.2f} "
        f"aggregate_ratio={ratio(agg_c, agg_n):.2f} "
        f"cpu_ratio={dense_c.cpu_s / max(dense_n.cpu_s, 1e-9):.2f} "
        f"incr_fraction={incr / dense_c.seconds:.3f} peak_rss_mib={peak / _M:.0f}"
    )
    return 0
