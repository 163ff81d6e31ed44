"""The process the crash tests kill (``python -m tests.unit.points.crashchild DIR SEED MODE``).

``save``: saves seeded random areas into one undo store forever, printing ``acked <n>`` after
each ``save`` returns. ``write``: follows the durable rule over a replica file: saves a group's
old bytes, syncs, prints ``saved <n>``, then overwrites the group in 4 KiB writes."""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

from consumers.points.undo import UndoWriter

NAME = "disk-2000.img"
STORE = "c0ffee"
CAP = 1 << 20


def area(rnd: random.Random) -> tuple[int, int]:
    length = rnd.randrange(1, 100_000)
    return rnd.randrange(CAP - length), length


def main() -> None:
    directory, seed, mode = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    rnd = random.Random(seed)
    writer = UndoWriter.open(directory, NAME, STORE, CAP)
    n = 0
    if mode == "save":
        while True:
            offset, length = area(rnd)
            writer.save(offset, rnd.randbytes(length))
            print(f"acked {n}", flush=True)
            n += 1
    fd = os.open(directory / "replica", os.O_RDWR)
    while True:
        group = [area(rnd) for _ in range(3)]
        for offset, length in group:
            for e in writer.missing(offset, length):
                writer.save_many([(e.start, os.pread(fd, e.length, e.start))])
        writer.sync()
        print(f"saved {n}", flush=True)
        for offset, length in group:
            data = rnd.randbytes(length)
            for at in range(0, length, 4096):
                os.pwrite(fd, data[at : at + 4096], offset + at)
        n += 1


if __name__ == "__main__":
    main()
