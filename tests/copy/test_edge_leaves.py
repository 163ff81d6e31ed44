"""Issue 24, item 1: a corrupt replica must never be certified as good.

A sync hashes a leaf it covers only in part (an "edge leaf") whole, bytes it keeps from the
replica included. Bytes flipped behind the copier's back in such a leaf used to go into the new
tree: the commit's ``replica_digest`` described the corrupt replica and ``verify`` said equal.

Real parts: nbdkit serves the frozen snapshot image read-only; the replica is a file, a loop
device, or a qemu-nbd export. The replica starts as the base snapshot (what two good cycles
left), corrupted where a test says, with the base's tree computed independently
(``tests/copy/treeref.py``). After the sync the replica must equal the new snapshot byte for
byte and the new root must equal one computed from the snapshot's bytes.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import random
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cbtstream.extents import Extent
from consumers.copy import digest as dg
from consumers.copy.checkpoint import Checkpoint, CheckpointState
from consumers.copy.engine import CopyOptions, CopyResult, Edge, copy_disk, cut_edges
from consumers.copy.plan import fingerprint, plan_ranges
from consumers.copy.sources import NbdSource
from consumers.copy.targets import BlockTarget, FileTarget, NbdTarget
from consumers.nbd.uri import parse_nbd_uri
from consumers.replica.verify import tree_of
from tests.copy.images import M, apply, make_image
from tests.copy.treeref import leaves_of, pieces_of, root_of
from tests.nbd.nbdkit import nbdkit, needs_nbdkit

pytestmark = needs_nbdkit

KEY = "4211c3d5-7f1e-4b8a-9d6c-0123456789ab/disk-2000"
K = 1024
#: 193 leaves of 64 KiB in 13 pieces of 1 MiB, the last leaf and piece short (24 sectors: a
#: loop device has whole sectors).
SIZE = 12 * M + 12288
#: The changed areas of the incremental (CBT-like), by 64 KiB leaf (by 1 MiB piece):
#:   32 and 39 one small area each (piece 2); 56 one whole 64 KiB area (piece 3); 95+96 one area
#:   across a piece border (pieces 5, 6); 115+116 one 64 KiB area across a leaf border, in a hole
#:   of the base (piece 7); 146-149 a new hole, whole leaves (piece 9); 155 the head of an area
#:   that covers 156-191 whole (pieces 9-11); 192 (the short last leaf) its last 5000 bytes.
CHANGES = [
    (2 * M + 1000, 100), (2 * M + 500_000, 100),
    (3 * M + 512 * K, 64 * K),
    (6 * M - 4096, 12288),
    (7 * M + 200 * K, 64 * K),
    (9 * M + 128 * K, 256 * K),
    (10 * M - 300 * K, 2 * M + 300 * K),
    (SIZE - 5000, 5000),
]
EDGES = (32, 39, 95, 96, 115, 116, 155, 192)
OPTS = CopyOptions(disk_key=KEY, request_bytes=M, merge_gap_bytes=0, max_in_flight=3)


@dataclass
class Snapshots:
    base: bytes
    new: bytes
    new_image: Path


@pytest.fixture(scope="module")
def snaps(tmp_path_factory: pytest.TempPathFactory) -> Snapshots:
    d = tmp_path_factory.mktemp("snaps")
    base_img, fresh_img, new_img = d / "base.img", d / "fresh.img", d / "new.img"
    make_image(base_img, SIZE, 21, [(0, 7 * M, "data"), (8 * M, SIZE - 8 * M, "data")])
    make_image(fresh_img, SIZE, 22, [(0, SIZE, "data")])
    base = base_img.read_bytes()
    new = apply(base, fresh_img.read_bytes(), CHANGES)
    new_img.write_bytes(new)
    # the guest discarded a file: a hole in the new snapshot, reported zero by block status
    subprocess.run(["fallocate", "-p", "-o", str(9 * M + 128 * K), "-l", str(256 * K),
                    str(new_img)], check=True)
    new = new_img.read_bytes()
    assert new[9 * M + 128 * K : 9 * M + 384 * K] == bytes(256 * K) != base[9 * M + 128 * K :
                                                                             9 * M + 384 * K]
    return Snapshots(base, new, new_img)


def base_tree(base: bytes) -> dg.HashTree:
    """The base's tree as the two good cycles recorded it (computed from the definition)."""
    return dg.HashTree(SIZE, bytearray(b"".join(pieces_of(base))),
                       dg.MemoryLeaves(bytearray(b"".join(leaves_of(base)))))


def flipped(data: bytes, offset: int, n: int = 3) -> bytes:
    out = bytearray(data)
    for i in range(offset, offset + n):
        out[i] ^= 0xFF
    return bytes(out)


# -- replicas: a file, a loop device, a qemu-nbd export ---------------------------------------
@dataclass
class Replica:
    target: BlockTarget
    path: Path  # the file, device or raw image holding the replica's bytes

    def read(self) -> bytes:
        with open(self.path, "rb") as fh:
            return fh.read(SIZE)


@contextlib.contextmanager
def _loop_device(backing: Path) -> Iterator[Path]:
    if not os.path.exists("/dev/loop-control") or shutil.which("losetup") is None:
        pytest.skip("no loop devices on this machine (needs /dev/loop-control and losetup)")
    made = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True,
                          text=True, check=False)
    if made.returncode != 0:
        pytest.skip(f"losetup is not permitted here: {made.stderr.strip()}")
    dev = Path(made.stdout.strip())
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", str(dev)], check=False)


@contextlib.contextmanager
def _qemu_nbd(raw: Path) -> Iterator[str]:
    if shutil.which("qemu-nbd") is None:
        pytest.skip("qemu-nbd is not installed (Debian: qemu-utils)")
    sock = raw.with_suffix(".sock")
    proc = subprocess.Popen(["qemu-nbd", "-f", "raw", "--persistent", "-k", str(sock),
                             str(raw)])
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("qemu-nbd did not start")
            time.sleep(0.02)
        yield f"nbd+unix:///?socket={sock}"
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.asynccontextmanager
async def replica(kind: str, tmp_path: Path, content: bytes) -> AsyncIterator[Replica]:
    """A replica of ``kind`` holding ``content``, opened as the copier opens its targets."""
    backing = tmp_path / f"replica-{kind}.raw"
    backing.write_bytes(content)
    if kind == "file":
        async with FileTarget.open(backing) as t:
            yield Replica(t, backing)
    elif kind == "block":
        with _loop_device(backing) as dev:
            async with FileTarget.open(dev) as t:
                assert t.size == SIZE
                yield Replica(t, dev)
    else:
        with _qemu_nbd(backing) as uri:
            async with NbdTarget(parse_nbd_uri(uri)) as t:
                yield Replica(t, backing)


class CountingSource:
    """The snapshot export, counting the bytes read from it."""

    def __init__(self, inner: NbdSource) -> None:
        self.inner, self.read_bytes = inner, 0

    @property
    def size(self) -> int:
        return self.inner.size

    @property
    def max_request(self) -> int:
        return self.inner.max_request

    async def read_into(self, offset: int, buf: memoryview) -> None:
        self.read_bytes += len(buf)
        await self.inner.read_into(offset, buf)

    async def zero_map(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        return await self.inner.zero_map(offset, length)


async def sync(tmp_path: Path, snaps: Snapshots, rep: Replica, tree: dg.HashTree | None = None,
               checkpoint: Checkpoint | None = None) -> tuple[CopyResult, int]:
    """The incremental from the base to the new snapshot: (result, source bytes read)."""
    with nbdkit(tmp_path, "-r", "file", str(snaps.new_image)) as uri:
        async with NbdSource(parse_nbd_uri(uri)) as src:
            counted = CountingSource(src)
            result = await copy_disk(
                counted, rep.target, [Extent(*c) for c in CHANGES], capacity=SIZE, options=OPTS,
                tree=tree if tree is not None else base_tree(snaps.base), checkpoint=checkpoint)
    return result, counted.read_bytes


KINDS = ["file", "block", "nbd"]


# -- the reported bug, on every kind of target --------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("leaf, at", [(95, 6 * M - 64 * K + 100), (115, 7 * M + 196 * K)],
                         ids=["hashed-leaf", "zero-leaf"])
async def test_flip_in_an_edge_leaf_is_repaired(
    kind: str, leaf: int, at: int, snaps: Snapshots, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A few bytes flipped where the sync keeps the replica's bytes (leaf 95: hashed in the base
    tree; leaf 115: a hole in the base, proven without a hash)."""
    assert not any(c[0] <= at < c[0] + c[1] for c in CHANGES)
    with caplog.at_level(logging.INFO, "cbtstream.copier.copy"):
        async with replica(kind, tmp_path, flipped(snaps.base, at)) as rep:
            result, _ = await sync(tmp_path, snaps, rep)
            after = rep.read()
    assert after == snaps.new  # the replica equals the snapshot, byte for byte
    assert result.replica_digest == root_of(snaps.new)  # and its root is the snapshot's
    assert result.tree is not None and result.tree.pieces == b"".join(pieces_of(after))
    assert result.tree.store().read(0, dg.leaf_count(SIZE)) == b"".join(
        leaves_of(after))
    assert result.repaired == (leaf,) and result.leaves_repaired == 1
    assert result.recopied == (leaf,)
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and KEY in warned[0].getMessage()
    assert f"leaf {leaf} " in warned[0].getMessage() and warned[0].__dict__["leaf"] == leaf


# -- the control: a flip where the sync does not write is left for verify ----------------------
@pytest.mark.parametrize("kind", KINDS)
async def test_flip_in_an_untouched_leaf_is_left_for_verify(
    kind: str, snaps: Snapshots, tmp_path: Path,
) -> None:
    at = M + 4242
    async with replica(kind, tmp_path, flipped(snaps.base, at)) as rep:
        result, _ = await sync(tmp_path, snaps, rep)
        seen = await tree_of(rep.target.read_into, SIZE)  # what verify computes
        after = rep.read()
    assert result.repaired == () and result.recopied == ()
    assert after == flipped(snaps.new, at)  # not touched, not repaired ...
    assert result.replica_digest == root_of(snaps.new)  # ... and never certified:
    assert seen.root() != result.replica_digest  # verify finds the difference, in piece 1
    assert result.tree is not None
    assert [j for j in range(dg.piece_count(SIZE)) if seen.piece(j) != result.tree.piece(j)
            ] == [1]


# -- no alarm, and no extra source read, where nothing is corrupt -------------------------------
async def test_clean_replica_costs_no_extra_source_or_target_read(
    snaps: Snapshots, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    async with replica("file", tmp_path, snaps.base) as rep:
        reads = 0
        inner_read = rep.target.read_into

        async def counting(offset: int, buf: memoryview) -> None:
            nonlocal reads
            reads += len(buf)
            await inner_read(offset, buf)

        rep.target.read_into = counting  # type: ignore[method-assign]
        with caplog.at_level(logging.INFO, "cbtstream.copier.copy"):
            result, source_read = await sync(tmp_path, snaps, rep)
        after = rep.read()
    assert after == snaps.new and result.replica_digest == root_of(snaps.new)
    assert result.repaired == result.recopied == ()
    planned = sum(r.length for r in plan_ranges([Extent(*c) for c in CHANGES], SIZE, 0))
    assert result.bytes_copied + result.bytes_zeroed == planned
    assert result.bytes_zeroed == 256 * K  # the new hole, in edge leaf 9, written as zeroes
    assert source_read == result.bytes_copied  # only the changed data, nothing more
    edge_bytes = sum(dg.leaf_span(i, SIZE).length for i in EDGES)
    assert reads == edge_bytes  # each edge leaf read once from the target (as before)
    assert not caplog.records


async def test_flip_in_bytes_the_sync_rewrites_is_no_corruption_alarm(
    snaps: Snapshots, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """The leaf's hash fails, but only bytes the sync overwrites differ (as after an interrupted
    write): the leaf is copied whole, without calling the replica corrupt."""
    at = 6 * M - 4000  # in the 4 KiB of leaf 95 that the sync rewrites
    with caplog.at_level(logging.INFO, "cbtstream.copier.copy"):
        async with replica("file", tmp_path, flipped(snaps.base, at)) as rep:
            result, _ = await sync(tmp_path, snaps, rep)
            after = rep.read()
    assert after == snaps.new and result.replica_digest == root_of(snaps.new)
    assert result.repaired == () and result.recopied == (95,)
    assert [r.levelno for r in caplog.records] == [logging.INFO]


async def test_dirty_replica_of_an_interrupted_sync_is_repaired_without_alarm(
    snaps: Snapshots, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """A replica an interrupted incremental from the same base left dirty (the guard admits an
    incremental from that base onto it): an earlier snapshot's changes are in some edge leaves,
    a subset of this sync's areas (CBT areas are cumulative)."""
    other = random.Random(5).randbytes(SIZE)
    earlier = apply(snaps.base, other, [CHANGES[2], CHANGES[3], CHANGES[-1]])
    with caplog.at_level(logging.INFO, "cbtstream.copier.copy"):
        async with replica("file", tmp_path, earlier) as rep:
            result, _ = await sync(tmp_path, snaps, rep)
            after = rep.read()
    assert after == snaps.new and result.replica_digest == root_of(snaps.new)
    assert result.repaired == () and result.recopied == (95, 96, 192)
    assert {r.levelno for r in caplog.records} == {logging.INFO}


async def test_resumed_sync_trusts_the_edge_leaves_its_checkpoint_covers(
    snaps: Snapshots, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """A checkpoint up to the end of edge leaf 96: those leaves were proven and written by the
    run that saved it; the rest is proven now. No source byte below the checkpoint is read."""
    ranges = plan_ranges([Extent(*c) for c in CHANGES], SIZE, 0)
    durable = 6 * M + 8192
    done = [(r.start, min(r.end, durable) - r.start) for r in ranges if r.start < durable]
    cp = Checkpoint(tmp_path / "state", KEY, str(uuid.uuid4()))
    cp.save(CheckpointState(fingerprint(ranges, SIZE), durable, sum(n for _, n in done), 0))
    with caplog.at_level(logging.INFO, "cbtstream.copier.copy"):
        async with replica("file", tmp_path, apply(snaps.base, snaps.new, done)) as rep:
            result, source_read = await sync(tmp_path, snaps, rep, checkpoint=cp)
            after = rep.read()
    assert after == snaps.new and result.replica_digest == root_of(snaps.new)
    assert result.resumed_from == durable and result.repaired == result.recopied == ()
    later = sum(r.end - max(r.start, durable) for r in ranges if r.end > durable)
    assert source_read == later - 256 * K  # the hole is written as zeroes, not read
    assert not caplog.records


async def test_full_copy_onto_a_used_replica_reads_no_extra_source_bytes(
    snaps: Snapshots, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """A full copy starts from the all-zero tree after the copier zeroed what is not copied;
    the old bytes under the copied areas do not matter and cost no source read."""
    ranges = plan_ranges([Extent(*c) for c in CHANGES], SIZE, 0)
    gaps, pos = [], 0
    for r in ranges:
        gaps.append((pos, r.start - pos))
        pos = r.end
    gaps.append((pos, SIZE - pos))
    expected = apply(bytes(SIZE), snaps.new, CHANGES)
    with caplog.at_level(logging.INFO, "cbtstream.copier.copy"):
        async with replica("file", tmp_path, snaps.base) as rep:
            for s, n in gaps:
                if n:
                    await rep.target.zero(s, n)
            result, source_read = await sync(tmp_path, snaps, rep, tree=dg.HashTree.zeros(SIZE))
            after = rep.read()
    assert after == expected and result.replica_digest == root_of(expected)
    assert result.repaired == result.recopied == () and source_read == result.bytes_copied
    assert not caplog.records


# -- leaf entries the tree cannot vouch for: proven piece by piece ----------------------------
#: The pieces CHANGES cover in part (10 and 11 are covered whole).
PARTIAL = (2, 3, 5, 6, 7, 9, 12)


def lost_leaves(base: bytes) -> dg.HashTree:
    """The base's pieces with a leaf file that lost its entries (all zero): no piece folds."""
    return dg.HashTree(SIZE, bytearray(b"".join(pieces_of(base))),
                       dg.MemoryLeaves(bytearray(32 * dg.leaf_count(SIZE))))


async def test_unknown_leaf_entries_cost_target_reads_not_a_wrong_tree(
    snaps: Snapshots, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """Each piece the sync covers in part is read whole from the replica and proven against the
    base's piece entry; a clean replica passes, and no source byte beyond the changes is read."""
    async with replica("file", tmp_path, snaps.base) as rep:
        reads = 0
        inner_read = rep.target.read_into

        async def counting(offset: int, buf: memoryview) -> None:
            nonlocal reads
            reads += len(buf)
            await inner_read(offset, buf)

        rep.target.read_into = counting  # type: ignore[method-assign]
        with caplog.at_level(logging.INFO, "cbtstream.copier.copy"):
            result, source_read = await sync(tmp_path, snaps, rep, tree=lost_leaves(snaps.base))
        after = rep.read()
    assert after == snaps.new and result.replica_digest == root_of(snaps.new)
    assert result.repaired == result.recopied == () and source_read == result.bytes_copied
    # piece 7 is a hole in the base: its zero entry agrees with zero leaf entries, so it stays
    # proven leaf by leaf (edge leaves 115 and 116)
    assert reads == sum(dg.piece_span(j, SIZE).length for j in PARTIAL if j != 7) + 2 * dg.LEAF
    assert result.tree is not None
    entries = result.tree.store().read(0, dg.leaf_count(SIZE))
    for j in (*PARTIAL, 10, 11):  # every touched piece's leaves are known again
        assert entries[j * 512 : (j + 1) * 512] == b"".join(leaves_of(after)[j * 16 : j * 16 + 16])
    assert not caplog.records


@pytest.mark.parametrize("kind", KINDS)
async def test_flip_in_a_piece_with_unknown_leaf_entries_is_repaired(
    kind: str, snaps: Snapshots, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """Bytes flipped in leaf 48 of piece 3, which the sync does not touch (it writes leaf 56
    whole): with the leaf entries known they are left for verify, but here piece 3 is proven
    whole, fails, and is copied whole from the snapshot with a warning naming it."""
    at = 3 * M + 100
    with caplog.at_level(logging.INFO, "cbtstream.copier.copy"):
        async with replica(kind, tmp_path, flipped(snaps.base, at)) as rep:
            result, _ = await sync(tmp_path, snaps, rep, tree=lost_leaves(snaps.base))
            after = rep.read()
    assert after == snaps.new and result.replica_digest == root_of(snaps.new)
    assert result.repaired == (48,) and result.recopied == tuple(range(48, 64))
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and f"{KEY}: replica corrupt in piece 3 " in warned[0].getMessage()
    assert warned[0].__dict__["leaf"] == 48


# -- the cut itself (pure) ----------------------------------------------------------------------
def test_cut_edges() -> None:
    ranges = plan_ranges([Extent(*c) for c in CHANGES], SIZE, 0)
    units = cut_edges(ranges, SIZE)
    assert [u.span.start // dg.LEAF for u in units if isinstance(u, Edge)] == list(EDGES)
    assert all(u.span == dg.leaf_span(u.span.start // dg.LEAF, SIZE) and not u.coarse
               for u in units if isinstance(u, Edge))
    assert [u for u in units if isinstance(u, Extent)] == [
        Extent(3 * M + 512 * K, 64 * K), Extent(9 * M + 128 * K, 256 * K),
        Extent(9 * M + 768 * K, 2 * M + 256 * K)]

    def every_byte_once(units: list[Extent | Edge]) -> None:
        flat = [e for u in units for e in (u.touched if isinstance(u, Edge) else (u,))]
        assert sum(e.length for e in flat) == sum(r.length for r in ranges)
        assert all(a.end <= b.start for a, b in itertools.pairwise(flat))

    every_byte_once(units)
    # a piece whose leaf entries are unknown is one unit: here piece 9, shared by two ranges
    coarse = cut_edges(ranges, SIZE, frozenset({9}))
    every_byte_once(coarse)
    shared = next(u for u in coarse if isinstance(u, Edge) and u.coarse)
    assert shared.span == Extent(9 * M, M)
    assert shared.touched == (Extent(9 * M + 128 * K, 256 * K), Extent(10 * M - 300 * K, 300 * K))
    assert [u.span.start // dg.LEAF for u in coarse if isinstance(u, Edge) and not u.coarse
            ] == [e for e in EDGES if e // dg.FANOUT != 9]
    # whole units only outside edges; a range ending at the disk's end covers its short leaf
    leaf = dg.LEAF
    assert cut_edges([Extent(M, SIZE - M)], SIZE) == [Extent(M, SIZE - M)]
    assert cut_edges([Extent(100, 10)], SIZE) == [Edge(Extent(0, leaf), (Extent(100, 10),))]
    assert cut_edges([Extent(100, 10), Extent(200, 10)], SIZE) == [
        Edge(Extent(0, leaf), (Extent(100, 10), Extent(200, 10)))]
    assert cut_edges([Extent(M - 1, M + 2)], SIZE) == [
        Edge(Extent(M - leaf, leaf), (Extent(M - 1, 1),)), Extent(M, M),
        Edge(Extent(2 * M, leaf), (Extent(2 * M, 1),))]
    assert cut_edges([Extent(M - 1, M + 2)], SIZE, frozenset({0, 1})) == [
        Edge(Extent(0, M), (Extent(M - 1, 1),), True), Extent(M, M),
        Edge(Extent(2 * M, leaf), (Extent(2 * M, 1),))]


def test_untouched_and_the_proof() -> None:
    leaf_size = dg.LEAF
    span = dg.leaf_span(1, SIZE)
    start = span.start
    keep = dg.untouched(span, [Extent(start + 10, 5), Extent(start + 100, 10)])
    assert keep == [(0, 10), (15, 100), (110, leaf_size)]
    assert dg.untouched(span, [span]) == []
    leaf = bytearray(leaf_size)
    leaf[12] = 7  # inside the touched bytes: a zero base leaf is still proven
    assert dg.holds_base(memoryview(leaf), dg.ZERO, keep)
    leaf[200] = 7  # inside the kept bytes: not
    assert not dg.holds_base(memoryview(leaf), dg.ZERO, keep)
    h = dg.leaf_entry(bytes(leaf))
    assert dg.holds_base(memoryview(leaf), h, keep)  # a hashed base leaf: the whole leaf
    leaf[12] = 8
    assert not dg.holds_base(memoryview(leaf), h, keep)
    other = bytearray(leaf)
    other[12] = 9
    assert dg.same_runs(memoryview(leaf), memoryview(other), keep)
    other[0] = 1
    assert not dg.same_runs(memoryview(leaf), memoryview(other), keep)
    # a whole piece is proven by its leaves' entries folded, against the base's piece entry
    piece = bytearray(os.urandom(M))
    base = dg.fold(b"".join(leaves_of(bytes(piece))))
    assert dg.holds_base(memoryview(piece), base, [(0, 10)], piece=True)
    piece[M - 1] ^= 1
    assert not dg.holds_base(memoryview(piece), base, [(0, 10)], piece=True)
