"""The replica hash tree: leaves, pieces, root, touched runs and the sync digest, against the
definition (tests/copy/treeref.py); the leaf file and its undo journal."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from pathlib import Path

import blake3
import pytest

from cbtstream.extents import Extent
from consumers.copy import digest as dg
from consumers.copy import digest_v1 as v1
from consumers.copy.engine import prepare_tree
from consumers.copy.leaves import FileLeaves, Journal, undo
from tests.copy.treeref import leaves_of, leaves_of_v1, pieces_of, root_of, root_of_v1

M = 1 << 20
K = 1 << 10


def _tree_of(data: bytes) -> dg.HashTree:
    tree = dg.HashTree.zeros(len(data))
    first, entries = dg.hash_run(0, memoryview(data), len(data))
    tree.set_leaves(first, entries)
    tree.refold([(0, dg.piece_count(len(data)))])
    return tree


@pytest.mark.parametrize("size", [0, 1, 64 * K - 1, M - 1, M, M + 1, 3 * M + 4097])
def test_zero_tree_is_the_tree_of_zero_bytes(size: int) -> None:
    assert dg.HashTree.zeros(size).root() == root_of(bytes(size))
    assert dg.HashTree.zeros(size).leaf_count == dg.leaf_count(size) == len(leaves_of(
        bytes(size)))
    assert _tree_of(bytes(size)).root() == root_of(bytes(size))


@pytest.mark.parametrize("size", [1, 64 * K + 1, 3 * M + 100])
def test_root_of_data_matches_definition_and_changes_with_one_byte(size: int) -> None:
    data = bytearray(os.urandom(size))
    data[size // 2 : size // 2 + 64 * K] = bytes(len(data[size // 2 : size // 2 + 64 * K]))
    tree = _tree_of(bytes(data))
    assert tree.root() == root_of(bytes(data))
    assert tree.store().read(0, tree.leaf_count) == b"".join(leaves_of(bytes(data)))
    assert tree.pieces == b"".join(pieces_of(bytes(data)))
    for j in range(dg.piece_count(size)):
        assert tree.consistent(j)
    data[size - 1] ^= 1
    assert _tree_of(bytes(data)).root() != tree.root()


def test_zero_entries_stand_for_zero_leaves_and_pieces() -> None:
    assert dg.leaf_entry(bytes(64 * K)) == dg.leaf_entry(bytes(10)) == dg.ZERO
    assert dg.leaf_entry(b"\0" * 9 + b"\1") == blake3.blake3(b"\0" * 9 + b"\1").digest()
    assert dg.fold(bytes(16 * 32)) == dg.ZERO
    one = bytes(32) + os.urandom(32)
    assert dg.fold(one) == blake3.blake3(b"cbtstream-piece-v2" + one).digest()


def test_runs_hash_only_whole_leaves_and_partial_pieces_are_found() -> None:
    cap = 4 * M + 10
    leaf = dg.LEAF
    assert dg.hash_run(leaf, memoryview(bytes(2 * leaf)), cap)[0] == 1
    assert len(dg.hash_run(leaf, memoryview(bytes(2 * leaf)), cap)[1]) == 64
    assert len(dg.hash_run(leaf + 1, memoryview(bytes(2 * leaf)), cap)[1]) == 32
    assert dg.hash_run(4 * M, memoryview(os.urandom(10)), cap)[0] == 64  # the short last leaf
    assert dg.zero_run(4 * M, 10, cap) == (64, bytes(32))
    ranges = [Extent(0, M), Extent(M + 5, 10), Extent(2 * M, M + leaf), Extent(4 * M, 10)]
    assert dg.partial_pieces(ranges, cap) == [1, 3]  # the short last piece is covered whole
    assert list(dg.touched_units(ranges, dg.PIECE)) == [(0, 5)]
    assert list(dg.touched_units([Extent(0, 10), Extent(5 * M, 1)], dg.PIECE)) == [(0, 1), (5, 1)]


def test_touched_runs_and_sync_digest() -> None:
    leaf = dg.LEAF
    ranges = [Extent(0, 10), Extent(leaf - 1, 2), Extent(5 * leaf, leaf), Extent(7 * leaf + 3, 1)]
    assert list(dg.touched_units(ranges)) == [(0, 2), (5, 1), (7, 1)]
    data = os.urandom(8 * leaf)
    tree = _tree_of(data)
    leaves = leaves_of(data)
    h = blake3.blake3()
    for first, n in [(0, 2), (5, 1), (7, 1)]:
        h.update(struct.pack(">QQ", first, n) + b"".join(leaves[first : first + n]))
    assert tree.touched_digest(ranges) == "blake3:" + h.hexdigest()


def test_tree_refuses_wrong_sizes() -> None:
    with pytest.raises(ValueError):
        dg.HashTree(2 * M, bytearray(32))
    with pytest.raises(ValueError):
        dg.HashTree.zeros(M).set_leaves(16, bytes(32))
    with pytest.raises(ValueError):
        dg.HashTree(M, bytearray(32)).leaf(0)  # known by its pieces only


def test_version_1_definition_is_still_computed_and_recognised() -> None:
    data = os.urandom(3 * M + 5)
    tree = v1.V1Tree(len(data), bytearray(v1.hash_pieces(memoryview(data))))
    assert tree.pieces == b"".join(leaves_of_v1(data))
    assert tree.root() == root_of_v1(data)
    assert v1.version_of(root_of_v1(data)) == 1 and v1.version_of(root_of(data)) == 2
    assert v1.version_of("sha256:00") == 0


def test_leaf_file_round_trip_and_refusals(tmp_path: Path) -> None:
    cap = 3 * M + 5
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        leaves = FileLeaves.create("x.leaves.1", cap, fd)
        assert leaves.read(0, dg.leaf_count(cap)) == bytes(32 * dg.leaf_count(cap))  # sparse
        leaves.write(3, b"a" * 64)
        leaves.write(5, b"b" * 32)  # joined with the run before it on its way to the file
        leaves.sync()
        leaves.write(6, b"c" * 32)
        leaves.close()  # not synced: dropped, as a killed copier would lose it
        again = FileLeaves.open("x.leaves.1", cap, fd)
        assert again.read(2, 5) == bytes(32) + b"a" * 64 + b"b" * 32 + bytes(32)
        with pytest.raises(ValueError):
            again.write(dg.leaf_count(cap), bytes(32))
        again.close()
        with pytest.raises(ValueError):
            FileLeaves.open("x.leaves.1", cap + M, fd)  # another disk's
    finally:
        os.close(fd)


def test_the_journal_restores_the_base_entries_of_an_interrupted_sync(tmp_path: Path) -> None:
    """A sync journals the entries it will rewrite, then rewrites them in place and is killed:
    the next open puts the base back. A journal of a sync recorded clean is dropped unused."""
    cap = 4 * M
    base = os.urandom(cap)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        leaves = FileLeaves.create("r.leaves.1", cap, fd)
        leaves.write(0, b"".join(leaves_of(base)))
        tree = dg.HashTree.of_leaves(cap, leaves)
        root = tree.root()
        leaves.journal = Journal(fd, "r.leaves.undo", root)
        leaves.protect([(16, leaves.read(16, 32))])  # pieces 1 and 2
        leaves.write(20, os.urandom(64))  # the interrupted sync's rewrites
        leaves.write(40, os.urandom(32))
        assert not tree.consistent(1) and not tree.consistent(2) and tree.consistent(0)
        leaves.journal.close()
        leaves.close()

        reopened = FileLeaves.open("r.leaves.1", cap, fd)
        assert undo("r.leaves.undo", fd, reopened, root) is True
        assert not (tmp_path / "r.leaves.undo").exists()
        tree.leaves = reopened
        assert all(tree.consistent(j) for j in range(4))
        assert reopened.read(0, dg.leaf_count(cap)) == b"".join(leaves_of(base))

        # a sync that was recorded clean leaves a journal of the old root: dropped, not applied
        reopened.journal = Journal(fd, "r.leaves.undo", root)
        reopened.protect([(0, reopened.read(0, 16))])
        reopened.write(0, b"n" * 32)
        assert undo("r.leaves.undo", fd, reopened, "blake3tree2:65536:1048576:new") is False
        assert not (tmp_path / "r.leaves.undo").exists()
        assert reopened.read(0, 1) == b"n" * 32
        reopened.journal.close()
        reopened.close()
    finally:
        os.close(fd)




class RecordingLeaves(dg.MemoryLeaves):
    """A buffer store that keeps what the engine hands to ``protect``."""

    kept: list[tuple[int, bytes]]

    def protect(self, old: Iterable[tuple[int, bytes]]) -> None:
        self.kept = list(old)


def test_prepare_tree_keeps_the_old_entries_of_every_leaf_rewritten_and_finds_unknown_pieces(
) -> None:
    """Runs across batches of pieces, a run of whole pieces, small areas: every leaf the sync
    rewrites is kept with its entry as it was (nothing else), and a piece covered in part whose
    entries do not fold is reported."""
    cap = 300 * M + 5
    data = os.urandom(cap)
    store = RecordingLeaves(bytearray(b"".join(leaves_of(data))))
    tree = dg.HashTree.of_leaves(cap, store)
    store.write(2 * 16 + 5, bytes(32))  # piece 2's entries no longer fold (a lost update)
    ranges = [Extent(2 * M + 10, 100), Extent(5 * M, 200 * M + 64 * K), Extent(250 * M, 1000),
              Extent(cap - 3, 3)]
    assert prepare_tree(tree, ranges) == frozenset({2})  # 205, 250, 300 fold: not "coarse"
    leaves = store.read(0, tree.leaf_count)
    want = [i for first, n in dg.touched_units(ranges) for i in range(first, first + n)]
    got = [first + k for first, entries in store.kept for k in range(len(entries) // 32)]
    assert got == want
    assert all(entries == leaves[first * 32 : first * 32 + len(entries)]
               for first, entries in store.kept)
