"""``cbtstream bench``: benchmarks run by hand (not tests).

``bench copy`` builds its own images (in /dev/shm when it exists), serves them read-only with
nbdkit over unix sockets, and times ``cbtstream copy`` and ``nbdcopy`` on identical work:

(a) full copy of a dense random image to a file, (b) full copy of an image 25% allocated,
(c) an incremental of 1% of the disk in scattered 64 KiB extents (cbtstream only; nbdcopy has
no extent list). Each measurement is the best of ``--runs`` runs; tools alternate; targets are
deleted before every full copy, so both tools pay for fresh target pages. cbtstream runs as a
child process (``cbtstream copy --json``) so its peak RSS is measured with ``wait4``; its time
is the engine's own ``duration_s`` (connect, copy, flush; not Python start-up), nbdcopy's is its
wall time. The last line is machine-readable::

    full_ratio=<cbtstream MB/s / nbdcopy MB/s> sparse_ratio=<same> incr_fraction=<incr time /
    full time> peak_rss_mib=<n>

``bench pipeline`` (disks/s through the whole orchestration) is described in
:mod:`cbtstream.bench.pipeline`.
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
from pathlib import Path

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
    """``bench pipeline``: see :mod:`cbtstream.bench.pipeline`."""
    from cbtstream.bench.pipeline import Options
    from cbtstream.bench.pipeline import run_pipeline as run

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
    def __init__(self, image: Path, sock: Path) -> None:
        self.sock = sock
        self.uri = f"nbd+unix:///?socket={sock}"
        self.proc = subprocess.Popen(
            ["nbdkit", "--exit-with-parent", "-f", "-r", "-U", str(sock), "file", str(image)]
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


def _run_cbtstream(
    args: argparse.Namespace, env: dict[str, str], uri: str, extents: Path | None
) -> tuple[float, int]:
    """One ``cbtstream copy`` child: (engine seconds, peak RSS bytes)."""
    cmd = [sys.executable, "-m", "cbtstream.cli", "copy", uri, f"{_VM}/disk-1", "--json"]
    cmd += ["--request-size", str(args.request_size), "--in-flight", str(args.in_flight)]
    cmd += ["--connections", str(args.connections)]
    if extents is not None:
        cmd += ["--extents", str(extents)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    out = proc.stdout.read()
    proc.stdout.close()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise StackError(f"cbtstream copy failed with exit code {proc.returncode}")
    result = json.loads(out.decode().strip().splitlines()[-1])
    return float(result["duration_s"]), usage.ru_maxrss * 1024


def _run_nbdcopy(uri: str, target: Path) -> float:
    t = time.perf_counter()
    subprocess.run(["nbdcopy", uri, str(target)], check=True)
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
    servers += [_Nbdkit(dense, work / "dense.sock"), _Nbdkit(sparse, work / "sparse.sock")]
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

    def full(uri: str) -> tuple[float, float]:
        nonlocal peak
        best_c = best_n = float("inf")
        for _ in range(args.runs):
            fresh()
            t, rss = _run_cbtstream(args, env, uri, None)
            peak, best_c = max(peak, rss), min(best_c, t)
            fresh()
            best_n = min(best_n, _run_nbdcopy(uri, other))
        return best_c, best_n

    # Warm-up: fault in target pages once so the first timed run is not penalised.
    _run_nbdcopy(servers[0].uri, other)
    fresh()
    dense_c, dense_n = full(servers[0].uri)
    sparse_c, sparse_n = full(servers[1].uri)

    # (c) incremental: 1% of the disk in scattered 64 KiB extents, onto an existing replica.
    rng = random.Random(7)
    n_ext = max(1, size // 100 // (64 * 1024))
    starts = sorted(rng.sample(range(size // (64 * 1024)), n_ext))
    extents = work / "extents.json"
    extents.write_text(json.dumps([[s * 64 * 1024, 64 * 1024] for s in starts]))
    fresh()
    _run_cbtstream(args, env, servers[0].uri, None)
    incr = float("inf")
    for _ in range(args.runs):
        t, rss = _run_cbtstream(args, env, servers[0].uri, extents)
        peak, incr = max(peak, rss), min(incr, t)

    mb = size / 1e6
    print(f"{'case':<28}{'cbtstream':>14}{'nbdcopy':>14}")
    print(f"{'(a) dense full':<28}{mb / dense_c:>10.0f} MB/s{mb / dense_n:>10.0f} MB/s")
    print(f"{'(b) 25% allocated full':<28}{mb / sparse_c:>10.0f} MB/s{mb / sparse_n:>10.0f} MB/s")
    print(f"{'(c) 1% incremental':<28}{incr:>12.3f} s {'-':>13}")
    print(f"times (s): dense {dense_c:.3f}/{dense_n:.3f} sparse {sparse_c:.3f}/{sparse_n:.3f}")
    full_ratio = (mb / dense_c) / (mb / dense_n)
    sparse_ratio = (mb / sparse_c) / (mb / sparse_n)
    print(
        f"full_ratio={full_ratio:.2f} sparse_ratio={sparse_ratio:.2f} "
        f"incr_fraction={incr / dense_c:.3f} peak_rss_mib={peak / _M:.0f}"
    )
    return 0
