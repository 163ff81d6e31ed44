"""Restore points' storage core, timed (run by hand: ``python -m cbtctl.bench.points``).

Prints MB/s, asserts nothing. On tmpfs (``/dev/shm`` when it exists) and on a plain directory
(``--dir``, default the system's temp dir), for a replica of ``--mib`` MiB:

* ``copy``: a plain file copy of the replica (``shutil.copyfile``), the yardstick;
* ``save``: the old bytes of 1 MiB areas saved into an undo store, one ``sync`` per group of
  ``--group`` areas (a sync's write groups), as the copier will before overwriting them;
* ``save-64k``: the same in scattered 64 KiB areas (an incremental's CBT blocks);
* ``materialise``: the previous point read whole in 64 KiB chunks, half from the store and
  half from the replica.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from consumers.points.reader import PointReader
from consumers.points.undo import UndoStore, UndoWriter

MIB = 1 << 20


def _timed(label: str, nbytes: int, work: Callable[[], None]) -> None:
    start = time.perf_counter()
    work()
    took = time.perf_counter() - start
    print(f"  {label:<12} {nbytes / MIB:8.0f} MiB  {took:7.3f} s  {nbytes / MIB / took:8.0f} MB/s")


def _save(directory: Path, replica: Path, areas: list[tuple[int, int]], group: int,
          size: int, store: str) -> None:
    writer = UndoWriter.open(directory, "bench.img", store, size)
    fd = os.open(replica, os.O_RDONLY)
    try:
        for i in range(0, len(areas), group):
            for offset, length in areas[i : i + group]:
                for e in writer.missing(offset, length):
                    writer.save_many([(e.start, os.pread(fd, e.length, e.start))])
            writer.sync()
        writer.seal("bench-root", "bench-cid")
    finally:
        os.close(fd)
        writer.close()


def run(directory: Path, size: int, group: int) -> None:
    print(f"{directory} ({size // MIB} MiB replica, a sync per {group} areas)")
    replica = directory / "bench.img"
    replica.write_bytes(os.urandom(size))

    def copy() -> None:
        shutil.copyfile(replica, directory / "bench.copy")

    _timed("copy", size, copy)
    (directory / "bench.copy").unlink()
    half = [(o, MIB) for o in range(0, size, 2 * MIB)]
    _timed("save", len(half) * MIB, lambda: _save(directory, replica, half, group, size, "a"))
    rnd = random.Random(1)
    blocks = sorted(rnd.sample(range(size // 65536), size // 65536 // 2))
    small = [(b * 65536, 65536) for b in blocks]
    _timed("save-64k", len(small) * 65536,
           lambda: _save(directory, replica, small, group * 16, size, "b"))
    fd = os.open(replica, os.O_RDONLY)
    store = UndoStore.open(directory, "bench.img", "a", size)
    reader = PointReader([store], lambda o, n: os.pread(fd, n, o), size)

    def materialise() -> None:
        for _ in reader.chunks():
            pass

    try:
        _timed("materialise", size, materialise)
    finally:
        reader.close()
        os.close(fd)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=512)
    p.add_argument("--group", type=int, default=8, help="areas per sync (1 MiB areas)")
    p.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    args = p.parse_args()
    places = [Path("/dev/shm")] if Path("/dev/shm").is_dir() else []
    for place in [*places, args.dir]:
        with tempfile.TemporaryDirectory(dir=place, prefix="cbtpoints-") as tmp:
            run(Path(tmp), args.mib * MIB, args.group)


if __name__ == "__main__":
    main()
