"""``bench copy``: cbtstream's copy engine against ``nbdcopy`` on identical work.

It builds its own images (in /dev/shm when it exists), serves them read-only with nbdkit over unix
sockets, and times both tools:

(a) full copy of a dense random image to a file; (b) full copy of an image 25% allocated; (c) the
dense copy from a latency-bound source (nbdkit's ``delay`` filter, 2 ms per read: where
production's VDDK/NFC spends its time, requests in flight decide); (d) four disks at once, each
source behind nbdkit's ``rate`` filter (1 Gbit/s), aggregate throughput (cbtstream: one process
copying the four, as the copier does, ``cbtctl.bench.multicopy``; nbdcopy: four processes); (e) an
incremental of 1% of the disk in scattered 64 KiB extents onto the replica of a full copy, as the
copier runs it (``cbtctl.bench.synccopy``: record, tree, journal and all); (f) the same incremental
from the 2 ms source, (g) from a source rate-limited to 1 Gbit/s and (h) from one with both; (i)
``--many`` (64) small disks at once, the image cut in as many pieces: one cbtstream process copying
them all (``cbtctl.bench.multicopy``, every copy at once, as a copier's pool of small disks)
against as many nbdcopy processes, all read from one nbdkit serving the folder of pieces (an export
per file). nbdcopy copies the same ranges in (e)-(h), from the same server: the image behind
nbdkit's ``extentlist`` filter, which reports only the changed extents as data, so nbdcopy with
``--destination-is-zero`` skips the rest; with 64 KiB requests (larger ones copy whole requests
around each range); its destination is a copy of the image served by nbdkit (nbdcopy truncates a
local file), so it pays one NBD hop more on the write side. The filter also answers block status
from its list, as a VDDK export answers from the disk's allocation map: nbdkit's file plugin on
tmpfs answers each query with ``SEEK_HOLE``, which walks the file (about 50 ms per GiB here), and
neither tool should be charged that per incremental.

For each case: the time (best of ``--runs``; tools alternate; targets are deleted before every
full copy, so both pay for fresh target pages), the CPU seconds per GiB of the case's work (disk
bytes, or changed bytes for incrementals; cbtstream's measured inside its child around the copy,
every thread; nbdcopy's from ``wait4``), and for cbtstream's incrementals the read amplification
(bytes read from the source / bytes in the changed areas). cbtstream's time is the engine's
(``cbtstream copy --json``'s ``duration_s``: copy and flush, not Python start-up) for full copies,
and the whole sync's for incrementals (tree opened, copy, tree and record saved). nbdcopy's is its
wall time. ``--gaps 0,64K,256K,1M`` repeats (f)-(h) per merge gap (``copier.merge_gap_bytes``),
the measurement that chose its default. The last line is machine-readable::

    full_ratio=<cbtstream MB/s / nbdcopy MB/s> sparse_ratio=<same> latency_ratio=<same>
    aggregate_ratio=<same> many_ratio=<same, case (i)>
    cpu_ratio=<cbtstream CPU/GiB / nbdcopy CPU/GiB, dense full>
    incr_fraction=<incremental time / dense full time> incr_ratio=<nbdcopy time / cbtstream
    time, incremental> read_amplification=<bytes read / changed bytes, incremental>
    peak_rss_mib=<n>
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cbtstream.errors import StackError

_M = 1 << 20
_K = 1 << 10
_GIB = 1 << 30
_VM = "00000000-0000-4000-8000-00000000b0b0"


def parse_size(text: str) -> int:
    """``64K``, ``1M``, ``262144``."""
    units = {"K": _K, "M": _M, "G": _GIB}
    text = text.strip().upper()
    return int(text[:-1]) * units[text[-1]] if text[-1:] in units else int(text)


def make_images(work: Path, size: int) -> tuple[Path, Path]:
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


def cut(image: Path, folder: Path, count: int) -> list[Path]:
    """``image`` cut in ``count`` equal pieces, files of ``folder`` (case (i)'s small disks)."""
    folder.mkdir()
    size = image.stat().st_size // count
    out = []
    with image.open("rb") as fin:
        for i in range(count):
            piece = folder / f"small{i:03d}.img"
            with piece.open("wb") as fout:
                for _ in range(0, size, 4 * _M):  # in pieces: children report the parent's RSS
                    fout.write(fin.read(min(4 * _M, size - fout.tell())))
            out.append(piece)
    return out


def scattered_extents(size: int, fraction: float = 0.01, block: int = 64 * _K
                      ) -> list[list[int]]:
    """``fraction`` of the disk in scattered ``block``-sized, aligned extents (CBT blocks)."""
    rng = random.Random(7)
    n = max(1, int(size * fraction) // block)
    return [[s * block, block] for s in sorted(rng.sample(range(size // block), n))]


class Nbdkit:
    def __init__(self, image: Path, sock: Path, *filters: str, readonly: bool = True) -> None:
        """``nbdkit file`` serving ``image`` (read-only unless told) on ``sock``, or every file
        of ``image`` if it is a folder (the export name is the file's name); ``filters`` are
        ``--filter=NAME`` options and their ``key=value`` parameters, in nbdkit's order."""
        self.sock = sock
        self.uri = f"nbd+unix:///?socket={sock}"
        names = [f for f in filters if f.startswith("--filter=")]
        params = [f for f in filters if not f.startswith("--filter=")]
        pidfile = sock.with_name(f"{sock.name}.pid")
        pidfile.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            ["nbdkit", "--exit-with-parent", "-f", *(["-r"] if readonly else []), "-U",
             str(sock), "-P", str(pidfile), *names, "file",
             f"dir={image}" if image.is_dir() else str(image), *params]
        )
        deadline = time.monotonic() + 10
        # nbdkit writes its pid file once it accepts connections (a probe connection instead
        # made it log a broken handshake for every image)
        while not (pidfile.exists() and pidfile.stat().st_size > 0):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise StackError("nbdkit did not start")
            time.sleep(0.01)

    def export(self, name: str) -> str:
        """The URI of export ``name`` (a file of a served folder)."""
        return f"nbd+unix:///{name}?socket={self.sock}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@dataclass
class Run:
    """One copy: engine (or wall) seconds, CPU seconds of the copying process, peak RSS, and for
    cbtstream's incrementals the bytes read from the source and in the changed areas."""

    seconds: float
    cpu_s: float
    rss: int = 0
    bytes_read: int = 0
    bytes_changed: int = 0

    @property
    def amplification(self) -> float:
        return self.bytes_read / self.bytes_changed if self.bytes_changed else 0.0


_NONE = Run(float("inf"), 0.0)


def _wait(proc: subprocess.Popen[bytes], what: str) -> tuple[bytes, Any]:
    out = b""
    if proc.stdout is not None:
        out = proc.stdout.read()
        proc.stdout.close()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise StackError(f"{what} failed with exit code {proc.returncode}")
    return out, usage


def _tuning(args: argparse.Namespace) -> list[str]:
    return ["--request-size", str(args.request_size), "--in-flight", str(args.in_flight),
            "--connections", str(args.connections)]


def _child(cmd: list[str], env: dict[str, str], what: str) -> tuple[dict[str, Any], int]:
    """Run a cbtstream child printing JSON last: (its result, its peak RSS from ``wait4``)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE)
    out, usage = _wait(proc, what)
    return json.loads(out.decode().strip().splitlines()[-1]), usage.ru_maxrss * 1024


def run_cbtstream_copy(args: argparse.Namespace, env: dict[str, str], uri: str) -> Run:
    """One ``cbtstream copy`` (a full copy, no record): engine time, CPU around the copy."""
    cmd = [sys.executable, "-m", "cbtctl.cli", "copy", uri, f"{_VM}/disk-1", "--json",
           *_tuning(args)]
    result, rss = _child(cmd, env, "cbtstream copy")
    return Run(float(result["duration_s"]), float(result["cpu_s"]), rss)


def run_sync(args: argparse.Namespace, env: dict[str, str], uri: str, generation: int,
             extents: Path | None, gap: int | None = None) -> Run:
    """One sync through the replica's session (``cbtctl.bench.synccopy``)."""
    cmd = [sys.executable, "-m", "cbtctl.bench.synccopy", *_tuning(args), "--generation",
           str(generation), uri, f"{_VM}/disk-2"]
    if extents is not None:
        cmd += ["--extents", str(extents)]
    if gap is not None:
        cmd += ["--merge-gap", str(gap)]
    r, rss = _child(cmd, env, "cbtstream sync")
    return Run(float(r["duration_s"]), float(r["cpu_s"]), rss, int(r["bytes_read"]),
               int(r["bytes_changed"]))


def run_nbdcopy(src: str, dst: str, *options: str) -> Run:
    t = time.perf_counter()
    proc = subprocess.Popen(["nbdcopy", *options, src, dst], stdout=subprocess.DEVNULL)
    _, usage = _wait(proc, "nbdcopy")
    return Run(time.perf_counter() - t, usage.ru_utime + usage.ru_stime)


def parallel(cmds: list[list[str]], env: dict[str, str]) -> Run:
    """Wall time and summed CPU of running ``cmds`` at once (nbdcopy's aggregate case)."""
    t = time.perf_counter()
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL) for c in cmds]
    cpu = 0.0
    for cmd, p in zip(cmds, procs, strict=True):
        _, usage = _wait(p, cmd[0])
        cpu += usage.ru_utime + usage.ru_stime
    return Run(time.perf_counter() - t, cpu)


def best(runs: list[Run]) -> Run:
    return min(runs, key=lambda r: r.seconds, default=_NONE)


def run_copy(args: argparse.Namespace) -> int:
    for tool in ("nbdkit", "nbdcopy"):
        if shutil.which(tool) is None:
            raise StackError(f"{tool} is not installed (Debian: nbdkit, libnbd-bin)")
    base = args.dir or (Path("/dev/shm") if Path("/dev/shm").is_dir() else None)
    work = Path(tempfile.mkdtemp(prefix="cbtbench-", dir=base))
    servers: list[Nbdkit] = []
    try:
        return _Bench(args, work, servers).run()
    finally:
        for s in servers:
            s.stop()
        shutil.rmtree(work, ignore_errors=True)


class _Bench:
    def __init__(self, args: argparse.Namespace, work: Path, servers: list[Nbdkit]) -> None:
        self.args, self.work, self.servers = args, work, servers
        self.size = args.size_mib * _M
        root = work / "replicas"
        self.root = root
        self.replica = root / _VM / "disk-1.img"
        self.other = work / "nbdcopy.img"
        self.env = dict(os.environ, CBTSTREAM_COPIER__TARGET_ROOT=str(root))
        self.peak = 0
        self.generation = 0

    def serve(self, image: Path, name: str, *filters: str, readonly: bool = True) -> Nbdkit:
        s = Nbdkit(image, self.work / f"{name}.sock", *filters, readonly=readonly)
        self.servers.append(s)
        self.env["CBTSTREAM_COPIER__NBD_ALLOW"] = json.dumps(
            [f"unix:{x.sock}" for x in self.servers])
        return s

    def fresh(self) -> None:
        for p in (self.replica, self.other):
            p.unlink(missing_ok=True)

    def full(self, uri: str) -> tuple[Run, Run]:
        cs, ns = [], []
        for _ in range(self.args.runs):
            self.fresh()
            c = run_cbtstream_copy(self.args, self.env, uri)
            self.peak = max(self.peak, c.rss)
            cs.append(c)
            self.fresh()
            ns.append(run_nbdcopy(uri, str(self.other)))
        return best(cs), best(ns)

    def sync(self, uri: str, extents: Path | None, gap: int | None = None) -> Run:
        self.generation += 1
        r = run_sync(self.args, self.env, uri, self.generation, extents, gap)
        self.peak = max(self.peak, r.rss)
        return r

    def incremental(self, uri: str, dst: str, extents: Path, gap: int | None = None
                    ) -> tuple[Run, Run]:
        cs, ns = [], []
        for _ in range(self.args.runs):
            cs.append(self.sync(uri, extents, gap))
            ns.append(run_nbdcopy(uri, dst, "--request-size=65536", "--destination-is-zero"))
        return best(cs), best(ns)

    def run(self) -> int:
        args, work, size = self.args, self.work, self.size
        print(f"building {args.size_mib} MiB images in {work} ...", flush=True)
        dense, sparse = make_images(work, size)
        small = work / "small.img"  # the rate-limited aggregate case copies a quarter per disk
        with dense.open("rb") as fin, small.open("wb") as fout:
            # in 4 MiB pieces: children forked from a fat parent would report its RSS as theirs
            for _ in range(max(_M, size // 4) // (4 * _M) or 1):
                fout.write(fin.read(4 * _M))
        extents = work / "extents.json"
        changes = scattered_extents(size)
        extents.write_text(json.dumps(changes))
        listed = work / "extents.txt"
        listed.write_text("".join(f"{s} {n}\n" for s, n in changes))
        incr_dst = work / "nbdcopy-incr.img"
        shutil.copyfile(dense, incr_dst)

        delay = ("--filter=delay", f"rdelay={args.latency_ms}ms")
        # a bucket well below the incremental's length, so the rate is what it sustains
        rate = ("--filter=rate", f"rate={args.rate}", "burstiness=0.005")
        only = ("--filter=extentlist", f"extentlist={listed}")
        plain = self.serve(dense, "dense")
        sparse_s = self.serve(sparse, "sparse")
        slow = self.serve(dense, "slow", *delay)
        n_plain = self.serve(dense, "n-plain", *only)
        n_slow = self.serve(dense, "n-slow", "--filter=extentlist", "--filter=delay", *only[1:],
                            *delay[1:])
        n_rated = self.serve(dense, "n-rated", "--filter=extentlist", "--filter=rate",
                             *only[1:], *rate[1:])
        n_both = self.serve(dense, "n-both", "--filter=extentlist", "--filter=rate",
                            "--filter=delay", *only[1:], *rate[1:], *delay[1:])
        dst = self.serve(incr_dst, "n-dst", readonly=False).uri
        # the aggregate case: burstiness well below the copy's length
        quarter = [self.serve(small, f"quarter{i}", "--filter=rate", f"rate={args.rate}",
                              "burstiness=0.1") for i in range(4)]
        pieces = cut(dense, work / "pieces", args.many)
        folder = self.serve(work / "pieces", "pieces")

        # Warm-up: fault in target pages once so the first timed run is not penalised.
        run_nbdcopy(plain.uri, str(self.other))
        self.fresh()
        dense_c, dense_n = self.full(plain.uri)
        sparse_c, sparse_n = self.full(sparse_s.uri)
        slow_c, slow_n = self.full(slow.uri)
        agg_c, agg_n = self.aggregate(quarter)
        many_c, many_n = self.many(folder, pieces)

        # (e)-(h): incrementals onto the replica of a full copy made through the record
        shutil.rmtree(self.root, ignore_errors=True)
        base = self.sync(plain.uri, None)
        gaps = [parse_size(g) for g in args.gaps.split(",")] if args.gaps else [None]
        incr = {"plain": self.incremental(n_plain.uri, dst, extents)}
        sweep: dict[int | None, dict[str, tuple[Run, Run]]] = {}
        for gap in gaps:
            sweep[gap] = {name: self.incremental(src.uri, dst, extents, gap)
                          for name, src in (("latency", n_slow), ("rate", n_rated),
                                            ("both", n_both))}

        gib, changed_gib = size / _GIB, sum(n for _, n in changes) / _GIB
        mb = size / 1e6
        print(f"{'case':<40}{'cbtstream':>13}{'nbdcopy':>13}   CPU s/GiB (cbtstream / nbdcopy)")
        for name, c, n in [("(a) dense full", dense_c, dense_n),
                           ("(b) 25% allocated full", sparse_c, sparse_n),
                           (f"(c) dense, {args.latency_ms} ms per read", slow_c, slow_n)]:
            print(f"{name:<40}{mb / c.seconds:>8.0f} MB/s{mb / n.seconds:>8.0f} MB/s"
                  f"   {c.cpu_s / gib:.3f} / {n.cpu_s / gib:.3f}")
        agg_gib = 4 * small.stat().st_size / _GIB
        print(f"{'(d) 4 disks at ' + args.rate + 'bit/s each':<40}"
              f"{agg_gib * _GIB / 1e6 / agg_c.seconds:>8.0f} MB/s"
              f"{agg_gib * _GIB / 1e6 / agg_n.seconds:>8.0f} MB/s"
              f"   {agg_c.cpu_s / agg_gib:.3f} / {agg_n.cpu_s / agg_gib:.3f}")
        piece_mib = pieces[0].stat().st_size // _M
        print(f"{f'(i) {len(pieces)} disks of {piece_mib} MiB at once':<40}"
              f"{mb / many_c.seconds:>8.0f} MB/s{mb / many_n.seconds:>8.0f} MB/s"
              f"   {many_c.cpu_s / gib:.3f} / {many_n.cpu_s / gib:.3f}")
        print(f"{'(a*) dense full, with record and tree':<40}{mb / base.seconds:>8.0f} MB/s")
        rows = [("(e) 1% incremental", incr["plain"])]
        for gap, cases in sweep.items():
            label = "" if gap is None else f", gap {gap // _K} KiB"
            rows += [(f"(f) 1%, {args.latency_ms} ms per read{label}", cases["latency"]),
                     (f"(g) 1%, {args.rate}bit/s{label}", cases["rate"]),
                     (f"(h) 1%, both{label}", cases["both"])]
        for name, (c, n) in rows:
            print(f"{name:<40}{c.seconds:>10.3f} s {n.seconds:>10.3f} s "
                  f"  {c.cpu_s / changed_gib:.2f} / {n.cpu_s / changed_gib:.2f}"
                  f"   read x{c.amplification:.2f}")
        e_c, e_n = incr["plain"]
        print(f"times (s): dense {dense_c.seconds:.3f}/{dense_n.seconds:.3f} sparse "
              f"{sparse_c.seconds:.3f}/{sparse_n.seconds:.3f} latency {slow_c.seconds:.3f}/"
              f"{slow_n.seconds:.3f} aggregate {agg_c.seconds:.3f}/{agg_n.seconds:.3f} "
              f"many {many_c.seconds:.3f}/{many_n.seconds:.3f} "
              f"incremental {e_c.seconds:.3f}/{e_n.seconds:.3f}")

        def ratio(c: Run, n: Run) -> float:
            return n.seconds / c.seconds  # MB/s ratio = inverse time ratio on identical work

        print(
            f"full_ratio={ratio(dense_c, dense_n):.2f} "
            f"sparse_ratio={ratio(sparse_c, sparse_n):.2f} "
            f"latency_ratio={ratio(slow_c, slow_n):.2f} "
            f"aggregate_ratio={ratio(agg_c, agg_n):.2f} "
            f"many_ratio={ratio(many_c, many_n):.2f} "
            f"cpu_ratio={dense_c.cpu_s / max(dense_n.cpu_s, 1e-9):.2f} "
            f"incr_fraction={e_c.seconds / dense_c.seconds:.3f} "
            f"incr_ratio={ratio(e_c, e_n):.2f} "
            f"read_amplification={e_c.amplification:.2f} peak_rss_mib={self.peak / _M:.0f}"
        )
        return 0

    def many(self, folder: Nbdkit, pieces: list[Path]) -> tuple[Run, Run]:
        """(i) every piece at once, each its own export of the folder's server."""
        return self.at_once([(folder.export(p.name), p.name) for p in pieces], "many", 100)

    def aggregate(self, quarter: list[Nbdkit]) -> tuple[Run, Run]:
        """(d) four disks at once, each source behind the rate filter."""
        return self.at_once([(s.uri, f"quarter{i}.img") for i, s in enumerate(quarter)],
                            "aggregate", 10)

    def at_once(self, sources: list[tuple[str, str]], case: str, first_key: int
                ) -> tuple[Run, Run]:
        """Copy every ``(uri, name)`` source at once: one cbtstream process (``multicopy``,
        disk keys from ``first_key`` on) against one nbdcopy per source (into ``name`` in a
        folder of the case); best of ``--runs`` each, targets deleted before every run."""
        multi = [sys.executable, "-m", "cbtctl.bench.multicopy", *_tuning(self.args)]
        for i, (uri, _) in enumerate(sources):
            multi += [uri, f"{_VM}/disk-{first_key + i}"]
        out = self.work / f"nbdcopy-{case}"
        cs, ns = [], []
        for _ in range(self.args.runs):
            shutil.rmtree(self.root, ignore_errors=True)
            result, rss = _child(multi, self.env, "cbtstream multicopy")
            self.peak = max(self.peak, rss)
            cs.append(Run(float(result["duration_s"]), float(result["cpu_s"])))
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            ns.append(parallel([["nbdcopy", uri, str(out / name)] for uri, name in sources],
                               self.env))
        shutil.rmtree(self.root, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        return best(cs), best(ns)
