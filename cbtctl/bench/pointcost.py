"""What restore points cost a sync (run by hand: ``python -m cbtctl.bench.pointcost``).

Prints figures, asserts nothing. One incremental sync of one disk, as the copier runs it
(``cbtctl.bench.synccopy``: session, record, hash tree, copy, and with points the copier's own
``SyncPoints``/``SavingTarget`` path), is timed twice on identical work:

* **A**: the default policy (``PointsPolicy(count=1)``: no history, nothing saved);
* **B**: points kept (``PointsPolicy(count=--count)``): the sync begins a point, every write
  first reads the old bytes of its area from the replica and saves them durably into the
  previous point's undo store, then the point is committed (store sealed) and pruned.

Same work: a ``--gib-disk`` GiB source image of random bytes (in /dev/shm when it exists, served
by nbdkit over a unix socket) is copied in full (generation 1, under the same policy) onto a
fresh replica under ``--dir`` (default the system's temp dir: a real file system, where fsyncs
cost what they cost; /dev/shm makes them nearly free); then generation 2 copies ``--changed-mib``
MiB from a second image that differs from the first exactly there: half of it in 1 MiB extents,
half in 64 KiB ones, aligned, scattered over the disk (touching extents merged, as CBT reports
them), the same extents, seed and bytes for A and B. Only generation 2 is measured. Before it the
page cache is written back (``sync``) and the replica directory's files are dropped from it
(``POSIX_FADV_DONTNEED``), as for a replica last written hours ago: the old bytes come from the
disk. ``--cached`` keeps them cached instead (then, on a kernel with large folios, a 64 KiB
write into pages the full copy wrote dirties a whole large folio, and ``dirtied`` below counts
it). A and B alternate in order from run to run; the summary is the median of ``--runs``.

Figures, per GiB of changed areas (``bytes_changed`` of the sync), all measured inside the
synccopy child over the sync (process start-up and connections excluded):

* ``wall``: elapsed seconds; ``CPU``: the process's CPU seconds (every thread);
* ``written``: bytes the process passed to ``write``-family calls (``wchar`` of
  ``/proc/self/io``; the NBD client's sockets use ``send``, which it does not count, so this is
  the replica, undo data and index, record, tree and catalogue: everything under ``--dir``);
* ``dirtied``: ``write_bytes`` of ``/proc/self/io``, the bytes of page-cache pages the process
  dirtied, i.e. what goes to the disk at writeback (page-granular; 0 on tmpfs);
* ``disk read``: ``read_bytes`` of ``/proc/self/io`` (0 on tmpfs and for cached pages);
* ``old read``: old bytes read from the replica and saved (the ``SavingTarget``'s count);
* ``fsyncs``: calls of ``os.fsync`` and ``os.fdatasync`` (counted by wrapping both);
* ``undo/changed``: the sealed undo data of the point the sync started from (its catalogue
  entry) over the changed bytes, and ``undo files``: the sizes of that store's files on disk.

Then the ratios B/A of wall, CPU and bytes written and dirtied, and whether both syncs left the
same replica (the root of their hash trees).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cbtctl.bench.copy import Nbdkit
from cbtstream.errors import StackError

_K = 1 << 10
_M = 1 << 20
_GIB = 1 << 30
_VM = "00000000-0000-4000-8000-00000000c0c0"
_KEY = f"{_VM}/disk-22"
#: The two extent sizes of the change: a CBT block, and a run of them a database rewrites.
_SMALL, _BIG = 64 * _K, _M


def changed_extents(size: int, changed: int, seed: int = 22) -> list[list[int]]:
    """``changed`` bytes of a ``size``-byte disk: half in 1 MiB extents, half in 64 KiB ones,
    aligned, disjoint, sorted, touching ones merged (``[[start, length], ...]``)."""
    rng = random.Random(seed)
    slots = size // _BIG
    n_big = changed // 2 // _BIG
    n_small = (changed - n_big * _BIG) // _SMALL
    per_slot = _BIG // _SMALL
    big = set(rng.sample(range(slots), n_big))
    free = [(s, i) for s in range(slots) if s not in big for i in range(per_slot)]
    if n_small > len(free):
        raise SystemExit(f"{changed // _M} MiB do not fit in a {size // _M} MiB disk")
    starts = sorted([(s * _BIG, _BIG) for s in big]
                    + [(s * _BIG + i * _SMALL, _SMALL) for s, i in rng.sample(free, n_small)])
    merged: list[list[int]] = []
    for start, length in starts:
        if merged and merged[-1][0] + merged[-1][1] == start:
            merged[-1][1] += length
        else:
            merged.append([start, length])
    return merged


def make_images(work: Path, size: int, changes: list[list[int]]) -> tuple[Path, Path]:
    """The disk before (random bytes) and after the change (other bytes in ``changes``)."""
    rng = random.Random(20260122)
    block = bytearray(rng.randbytes(4 * _M))
    before, after = work / "before.img", work / "after.img"
    with before.open("wb") as f:
        for i in range(0, size, len(block)):
            block[:8] = i.to_bytes(8, "big")  # every block differs
            f.write(block[: min(len(block), size - i)])
    shutil.copyfile(before, after)
    with after.open("r+b") as f:
        for start, length in changes:
            f.seek(start)
            f.write(rng.randbytes(length))
    return before, after


def sync(env: dict[str, str], uri: str, generation: int, count: int,
         extents: Path | None) -> dict[str, Any]:
    """One ``cbtctl.bench.synccopy`` child under ``PointsPolicy(count=count)``: its figures."""
    cmd = [sys.executable, "-m", "cbtctl.bench.synccopy", "--points", str(count),
           "--generation", str(generation), uri, _KEY]
    if extents is not None:
        cmd[3:3] = ["--extents", str(extents)]
    done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, check=False)
    if done.returncode != 0:
        raise StackError(f"synccopy failed with exit code {done.returncode}")
    figures: dict[str, Any] = json.loads(done.stdout.decode().strip().splitlines()[-1])
    return figures


def undo_files(directory: Path) -> int:
    """Bytes of every undo store's files in the replica's directory (data, index, seal)."""
    return sum(p.stat().st_size for p in directory.glob("*.undo.*"))


def evict(directory: Path) -> None:
    """Drop the (written back) pages of every file in ``directory`` from the page cache."""
    for path in directory.iterdir():
        if path.is_file():
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def one(env: dict[str, str], root: Path, base_uri: str, changed_uri: str, extents: Path,
        count: int, cached: bool) -> dict[str, Any]:
    """A fresh replica of the disk before, then the measured incremental, under ``count``."""
    shutil.rmtree(root, ignore_errors=True)
    sync(env, base_uri, 1, count, None)
    os.sync()  # nothing of the full copy left to write back during the measured sync
    if not cached:
        evict(root / _VM)
    figures = sync(env, changed_uri, 2, count, extents)
    figures["undo_files"] = undo_files(root / _VM)
    return figures


def _per_gib(key: str, unit: int = 1) -> Callable[[dict[str, Any]], float]:
    """Figure ``key`` (in ``unit``s) per GiB of changed areas."""
    return lambda f: float(f[key]) / unit / (int(f["bytes_changed"]) / _GIB)


#: (label, figure, format) of the summary, in order.
_ROWS: list[tuple[str, Callable[[dict[str, Any]], float], str]] = [
    ("wall s/GiB", _per_gib("duration_s"), "{:.2f}"),
    ("CPU s/GiB", _per_gib("cpu_s"), "{:.2f}"),
    ("written GiB/GiB", _per_gib("wchar", _GIB), "{:.3f}"),
    ("dirtied GiB/GiB", _per_gib("write_bytes", _GIB), "{:.3f}"),
    ("disk read GiB/GiB", _per_gib("read_bytes", _GIB), "{:.3f}"),
    ("old read GiB/GiB", _per_gib("saved_bytes", _GIB), "{:.3f}"),
    ("fsyncs /GiB", _per_gib("fsyncs"), "{:.0f}"),
    ("fsyncs", lambda f: float(f["fsyncs"]), "{:.0f}"),
    ("undo/changed", _per_gib("undo_bytes", _GIB), "{:.3f}"),
    ("undo files MiB", lambda f: int(f["undo_files"]) / _M, "{:.1f}"),
]


def report(runs: dict[str, list[dict[str, Any]]]) -> None:
    for name, figs in runs.items():
        for i, f in enumerate(figs):
            print(f"  {name} run {i + 1}: wall {f['duration_s']:.3f} s  cpu {f['cpu_s']:.3f} s"
                  f"  written {f['wchar'] / _M:.0f} MiB  dirtied {f['write_bytes'] / _M:.0f} MiB"
                  f"  disk read {f['read_bytes'] / _M:.0f} MiB  fsyncs {f['fsyncs']}"
                  f"  old read {f['saved_bytes'] / _M:.0f} MiB"
                  f"  changed {f['bytes_changed'] / _M:.0f} MiB")
    medians = {name: {label: statistics.median(figure(f) for f in figs)
                      for label, figure, _ in _ROWS}
               for name, figs in runs.items()}
    a, b = medians["A"], medians["B"]
    print(f"{'median of ' + str(len(runs['A'])) + ' runs':<20}{'A (no points)':>16}"
          f"{'B (points)':>16}{'B/A':>8}")
    for label, _, fmt in _ROWS:
        ratio = b[label] / a[label] if a[label] else float("nan")
        print(f"{label:<20}{fmt.format(a[label]):>16}{fmt.format(b[label]):>16}"
              f"{ratio:>8.2f}")
    same = {f["replica_digest"] for figs in runs.values() for f in figs}
    print(f"same replica after A and B: {'yes' if len(same) == 1 else 'NO: ' + str(same)}")

    def ratio_of(label: str) -> str:
        return f"{b[label] / a[label]:.2f}" if a[label] else "n/a"

    print(f"wall_ratio={ratio_of('wall s/GiB')} cpu_ratio={ratio_of('CPU s/GiB')} "
          f"written_ratio={ratio_of('written GiB/GiB')} "
          f"dirtied_ratio={ratio_of('dirtied GiB/GiB')} "
          f"undo_per_changed={b['undo/changed']:.3f}")


def run(args: argparse.Namespace) -> None:
    size, changed = args.gib_disk * _GIB, args.changed_mib * _M
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    images = Path(tempfile.mkdtemp(prefix="cbtpointcost-src-", dir=shm))
    work = Path(tempfile.mkdtemp(prefix="cbtpointcost-", dir=args.dir))
    servers: list[Nbdkit] = []
    try:
        changes = changed_extents(size, changed)
        extents = work / "extents.json"
        extents.write_text(json.dumps(changes))
        listed = work / "extents.txt"
        listed.write_text("".join(f"{s} {n}\n" for s, n in changes))
        small = sum(1 for _, n in changes if n < _BIG)
        print(f"{args.gib_disk} GiB disk, {args.changed_mib} MiB changed in {len(changes)} "
              f"extents ({small} under 1 MiB); images in {images}, replica in {work}",
              flush=True)
        before, after = make_images(images, size, changes)
        servers.append(Nbdkit(before, images / "before.sock"))
        # the extentlist filter answers block status from the list, as VDDK does
        servers.append(Nbdkit(after, images / "after.sock", "--filter=extentlist",
                              f"extentlist={listed}"))
        root = work / "replicas"
        env = dict(os.environ, CBTSTREAM_COPIER__TARGET_ROOT=str(root),
                   CBTSTREAM_COPIER__NBD_ALLOW=json.dumps([f"unix:{s.sock}" for s in servers]))
        runs: dict[str, list[dict[str, Any]]] = {"A": [], "B": []}
        counts = {"A": 1, "B": args.count}
        for i in range(args.runs):
            for name in ("A", "B") if i % 2 == 0 else ("B", "A"):
                runs[name].append(one(env, root, servers[0].uri, servers[1].uri, extents,
                                      counts[name], args.cached))
        print(f"PointsPolicy(count=1) against PointsPolicy(count={args.count}), replica in "
              f"{args.dir or tempfile.gettempdir()}, "
              f"{'cached' if args.cached else 'evicted from the page cache'}")
        report(runs)
    finally:
        for s in servers:
            s.stop()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(images, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gib-disk", type=int, default=2)
    p.add_argument("--changed-mib", type=int, default=256)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--count", type=int, default=2, help="points kept in B (at least 2)")
    p.add_argument("--dir", type=Path, help="where the replica is (default: the temp dir)")
    p.add_argument("--cached", action="store_true",
                   help="keep the replica's pages cached after the full copy")
    args = p.parse_args()
    if args.count < 2:
        p.error("--count must keep history (2 or more)")
    run(args)


if __name__ == "__main__":
    main()
