"""A replica in memory driven through :class:`PointChain` as the copier will drive it, with a
model of every point's bytes to compare against."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

from consumers.points.catalogue import Held
from consumers.points.chain import PointChain
from consumers.points.undo import UndoWriter

T0 = datetime(2024, 1, 1, tzinfo=UTC)


class Sim:
    """One disk: ``replica`` is the live bytes, ``models`` each committed point's bytes."""

    def __init__(self, directory: Path, capacity: int, seed: int) -> None:
        self.capacity = capacity
        self.rnd = random.Random(seed)
        self.replica = bytearray(self.rnd.randbytes(capacity))
        self.chain = PointChain(directory, "disk-2000.img", "vm/disk-2000", capacity)
        self.models: dict[int, bytes] = {}
        self.held: Held | None = None
        self.cycle = 0

    def read_live(self, offset: int, length: int) -> bytes:
        return bytes(self.replica[offset : offset + length])

    def areas(self, n: int, most: int) -> list[tuple[int, int]]:
        out = []
        for _ in range(n):
            length = self.rnd.randrange(1, most)
            out.append((self.rnd.randrange(self.capacity - length + 1), length))
        return out

    def write(self, writer: UndoWriter | None, group: list[tuple[int, int]]) -> None:
        """Save the old bytes of a group of areas, sync, then write them (the durable rule)."""
        if writer is not None:
            for offset, length in group:
                for e in writer.missing(offset, length):
                    writer.save_many([(e.start, self.read_live(e.start, e.length))])
            writer.sync()
        for offset, length in group:
            self.replica[offset : offset + length] = self.rnd.randbytes(length)

    def begin(self) -> UndoWriter | None:
        self.cycle += 1
        return self.chain.begin(f"sync-{self.cycle}", f"cid-{self.cycle}", self.at(),
                                self.held)

    def at(self) -> datetime:
        return T0 + timedelta(hours=6 * self.cycle)

    def commit(self, writer: UndoWriter | None) -> int:
        root = f"root-{self.cycle}"
        cat = self.chain.commit(writer, f"sync-{self.cycle}", root, self.at())
        self.held = Held(f"sync-{self.cycle}", f"cid-{self.cycle}", root, self.at())
        assert cat.live is not None
        self.models[cat.live.id] = bytes(self.replica)
        return cat.live.id

    def run_cycle(self, groups: int = 3, per_group: int = 4, most: int = 20_000) -> int:
        writer = self.begin()
        for _ in range(groups):
            self.write(writer, self.areas(per_group, most))
        return self.commit(writer)

    def read_point(self, point_id: int, chunk: int = 65536) -> bytes:
        reader = self.chain.reader(point_id, self.read_live)
        try:
            return b"".join(data for _, data in reader.chunks(chunk=chunk))
        finally:
            reader.close()

    def check_all(self) -> None:
        """Every point the catalogue keeps reads back equal to its model."""
        for p in self.chain.load().complete:
            assert self.read_point(p.id) == self.models[p.id], f"point {p.id}"
