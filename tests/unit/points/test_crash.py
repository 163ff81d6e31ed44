"""Kill -9 in the middle of saving undo data and in the middle of the replica write: every
acknowledged save survives with its first bytes, and the point reads back as it was."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from consumers.points.coverage import Coverage
from consumers.points.reader import PointReader
from consumers.points.undo import UndoStore, UndoWriter
from tests.unit.points import crashchild
from tests.unit.points.crashchild import CAP, NAME, STORE

ROOT = Path(__file__).resolve().parents[3]


def _run_and_kill(tmp_path: Path, seed: int, mode: str) -> int:
    """Start the child, let it acknowledge a random number of steps, kill it (SIGKILL) a
    random moment later; returns how many steps it acknowledged."""
    rnd = random.Random(seed)
    want = rnd.randrange(1, 40)
    child = subprocess.Popen([sys.executable, "-m", "tests.unit.points.crashchild",
                              str(tmp_path), str(seed), mode], cwd=ROOT,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    acked = 0
    try:
        for line in child.stdout:
            acked = int(line.split()[1]) + 1
            if acked >= want:
                break
        time.sleep(rnd.random() * 0.01)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        child.stdout.close()
    assert acked >= want, "the child stopped before the kill"
    return acked


@pytest.mark.parametrize("seed", range(8))
def test_kill_while_saving(tmp_path: Path, seed: int) -> None:
    acked = _run_and_kill(tmp_path, seed, "save")
    rnd = random.Random(seed)
    expected = bytearray(CAP)
    covered = Coverage()
    for _ in range(acked):  # the child's saves, first bytes winning
        offset, length = crashchild.area(rnd)
        data = rnd.randbytes(length)
        for s, e in covered.missing(offset, offset + length):
            expected[s:e] = data[s - offset : e - offset]
        covered.add(offset, offset + length)
    writer = UndoWriter.open(tmp_path, NAME, STORE, CAP)  # recovery
    for s, e in covered:
        assert writer.coverage.covers(s, e)
    writer.close()
    store = UndoStore.open(tmp_path, NAME, STORE, CAP)
    for s, e in covered:
        assert store.read(s, e - s) == expected[s:e]
    assert sum(1 for _ in store.extents()) >= 1  # every extent's checksum holds
    store.close()


@pytest.mark.parametrize("seed", range(8))
def test_kill_while_writing_the_replica(tmp_path: Path, seed: int) -> None:
    original = random.Random(f"replica-{seed}").randbytes(CAP)
    (tmp_path / "replica").write_bytes(original)
    _run_and_kill(tmp_path, seed, "write")
    replica = tmp_path / "replica"

    def read_live(offset: int, length: int) -> bytes:
        with replica.open("rb") as fh:
            fh.seek(offset)
            return fh.read(length)

    # the point the interrupted sync started from reads back whole
    writer = UndoWriter.open(tmp_path, NAME, STORE, CAP)
    writer.close()
    reader = PointReader([UndoStore.open(tmp_path, NAME, STORE, CAP)], read_live, CAP)
    assert reader.read(0, CAP) == original
    reader.close()
    # the resume rewrites areas (some half written): the point still reads back whole
    writer = UndoWriter.open(tmp_path, NAME, STORE, CAP)
    rnd = random.Random(seed + 1000)
    data = bytearray(replica.read_bytes())
    for _ in range(10):
        offset, length = crashchild.area(rnd)
        for e in writer.missing(offset, length):
            writer.save_many([(e.start, bytes(data[e.start : e.end]))])
        writer.sync()
        data[offset : offset + length] = rnd.randbytes(length)
        replica.write_bytes(data)
    writer.seal("root", "cid")
    writer.close()
    reader = PointReader([UndoStore.open(tmp_path, NAME, STORE, CAP)], read_live, CAP)
    assert b"".join(c for _, c in reader.chunks()) == original
    reader.close()
