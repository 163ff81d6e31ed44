"""Exporting restore points, timed (run by hand: ``python -m cbtctl.bench.export``).

Prints MB/s and each speed's ratio to the reference's, asserts nothing. Builds a file replica
of ``--mib`` MiB (random bytes) with three points through the storage core, as the copier
makes them (``PointChain.begin`` -> save the old bytes, ``sync`` -> overwrite -> ``commit``,
each point's root the hash tree of its bytes): point 1, then every other MiB overwritten
(point 2), then scattered 64 KiB blocks over a sixteenth of the disk (point 3, the live one).
Then, on the directory given (``--dir``, default the system's temp dir; also on tmpfs,
``/dev/shm``, with ``--shm``):

* ``reference``: ``qemu-img convert -O raw`` of the live replica file;
* ``export live``: ``points export`` of the live point (every byte from the replica, hashed
  and proven against its root, written sparse, fsynced);
* ``export old``: the same for point 1 (half its bytes from its undo store, some from point
  2's, the rest from the replica);
* ``export qcow2``: point 1 exported, then ``qemu-img convert -O qcow2`` (what ``--format
  qcow2`` does);
* ``serve old``: point 1 served by ``points serve`` (unproven: the proof costs what an export's
  hashing costs) and copied by ``nbdcopy`` over a unix socket.

The page cache is warm (the replica was just written): figures compare the paths, not disks.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from cbtctl.commands.points import _to_qcow2
from consumers.points.catalogue import Held, Point
from consumers.points.chain import PointChain
from consumers.points.undo import UndoWriter
from consumers.replica.export import export_point
from consumers.replica.location import ReplicaLocation
from consumers.replica.serve import Listen, ServeTarget, serve_points
from consumers.replica.state import TargetKind
from consumers.replica.store import ReplicaStore
from consumers.replica.verify import tree_of

MIB = 1 << 20
KEY = "00000000-0000-0000-0000-00000000beef/disk-2000"
NAME = "disk-2000.img"


def _root(path: Path, size: int) -> str:
    fd = os.open(path, os.O_RDONLY)

    async def read_into(offset: int, buf: memoryview) -> None:
        buf[:] = os.pread(fd, len(buf), offset)

    try:
        return asyncio.run(tree_of(read_into, size)).root()
    finally:
        os.close(fd)


def _overwrite(writer: UndoWriter | None, replica: Path, areas: list[tuple[int, int]],
               group: int) -> None:
    """Write random bytes over ``areas``, saving the old bytes first, a ``sync`` per group."""
    fd = os.open(replica, os.O_RDWR)
    try:
        for i in range(0, len(areas), group):
            batch = areas[i : i + group]
            if writer is not None:
                for offset, length in batch:
                    for e in writer.missing(offset, length):
                        writer.save_many([(e.start, os.pread(fd, e.length, e.start))])
                writer.sync()
            for offset, length in batch:
                os.pwrite(fd, os.urandom(length), offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def build(directory: Path, size: int) -> tuple[ReplicaLocation, list[Point]]:
    """The replica and its three points (see the module docstring), oldest first."""
    replica = directory / NAME
    with open(replica, "wb") as fh:
        for _ in range(size // (64 * MIB)):
            fh.write(os.urandom(64 * MIB))
        fh.write(os.urandom(size % (64 * MIB)))
    chain = PointChain(directory, NAME, KEY, size)
    rnd = random.Random(1)
    steps: list[list[tuple[int, int]]] = [
        [],
        [(o, MIB) for o in range(0, size, 2 * MIB)],
        [(b * 65536, 65536)
         for b in sorted(rnd.sample(range(size // 65536), size // 65536 // 16))],
    ]
    held: Held | None = None
    for n, areas in enumerate(steps, 1):
        now = datetime.now(UTC)
        writer = chain.begin(f"sync-{n}", f"cid/{n}", now, held, None, f"snapshot-{n}")
        _overwrite(writer, replica, areas, 8)
        root = _root(replica, size)
        chain.commit(writer, f"sync-{n}", root, now)
        held = Held(f"sync-{n}", f"cid/{n}", root, now, now, f"snapshot-{n}")
    loc = ReplicaLocation(KEY, TargetKind.FILE, str(replica), ReplicaStore(directory, NAME))
    return loc, list(chain.load().points)


def _timed(label: str, size: int, work: Callable[[], None], reference: float | None) -> float:
    start = time.perf_counter()
    work()
    took = time.perf_counter() - start
    ratio = "" if reference is None else f"  {reference / took:5.2f} x reference"
    print(f"  {label:<13} {size / MIB:8.0f} MiB  {took:7.3f} s  {size / MIB / took:8.0f} MB/s"
          f"{ratio}")
    return took


def _export(loc: ReplicaLocation, size: int, point: Point, out: Path) -> None:
    async def locked() -> None:
        async with loc.store.lock(0):
            await export_point(loc, KEY, size, point, out)

    asyncio.run(locked())


def _serve_copy(loc: ReplicaLocation, size: int, point: Point, out: Path) -> None:
    sock = out.with_suffix(".sock")

    async def copy() -> None:
        stop = asyncio.Event()
        ready = asyncio.Event()
        task = asyncio.create_task(serve_points(
            [ServeTarget(KEY, loc, size, point)], Listen(socket=sock), stop, wait_s=0,
            verify=False, on_ready=lambda _: ready.set()))
        await ready.wait()
        proc = await asyncio.create_subprocess_exec(
            "nbdcopy", f"nbd+unix:///?socket={sock}", str(out))
        await proc.wait()
        stop.set()
        await task

    asyncio.run(copy())


def run(directory: Path, size: int) -> None:
    print(f"{directory} ({size // MIB} MiB replica, 3 points)")
    t0 = time.perf_counter()
    loc, points = build(directory, size)
    print(f"  (built in {time.perf_counter() - t0:.1f} s; undo data: "
          f"{', '.join(f'point {p.id} {p.undo_bytes / MIB:.0f} MiB' for p in points[:-1])})")
    oldest, live = points[0], points[-1]
    out = directory / "out"
    out.mkdir()

    def clean() -> None:
        for f in out.iterdir():
            f.unlink()

    def convert() -> None:
        subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "raw", loc.location,
                        str(out / "ref.raw")], check=True)

    reference = _timed("reference", size, convert, None)
    clean()
    _timed("export live", size, lambda: _export(loc, size, live, out / "live.raw"), reference)
    clean()
    _timed("export old", size, lambda: _export(loc, size, oldest, out / "old.raw"), reference)
    clean()

    def qcow2() -> None:
        _export(loc, size, oldest, out / "old.raw")
        _to_qcow2(out / "old.raw", out / "old.qcow2")

    _timed("export qcow2", size, qcow2, reference)
    clean()
    if shutil.which("nbdcopy"):
        _timed("serve old", size, lambda: _serve_copy(loc, size, oldest, out / "served.raw"),
               reference)
        clean()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=1024)
    p.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    p.add_argument("--shm", action="store_true", help="also on tmpfs (/dev/shm)")
    args = p.parse_args()
    if shutil.which("qemu-img") is None:
        raise SystemExit("needs qemu-img (the reference and qcow2)")
    places = [args.dir] + ([Path("/dev/shm")] if args.shm and Path("/dev/shm").is_dir() else [])
    for place in places:
        with tempfile.TemporaryDirectory(dir=place, prefix="cbtexport-") as tmp:
            run(Path(tmp), args.mib * MIB)


if __name__ == "__main__":
    main()
