"""The replica hash tree: leaves, root, touched runs and the sync digest, against the
definition (tests/copy/treeref.py)."""

from __future__ import annotations

import os
import struct

import blake3
import pytest

from cbtstream.extents import Extent
from consumers.copy import digest as dg
from tests.copy.treeref import leaves_of, root_of

M = 1 << 20


def _tree_of(data: bytes) -> dg.HashTree:
    tree = dg.HashTree.zeros(len(data))
    for i, h in dg.hash_item(0, memoryview(data), len(data)):
        tree.set(i, h)
    return tree


@pytest.mark.parametrize("size", [0, 1, M - 1, M, M + 1, 3 * M + 4097])
def test_zero_tree_is_the_tree_of_zero_bytes(size: int) -> None:
    assert dg.HashTree.zeros(size).root() == root_of(bytes(size))
    assert len(dg.HashTree.zeros(size)) == dg.leaf_count(size)


def test_root_of_data_matches_definition_and_changes_with_one_byte() -> None:
    data = bytearray(os.urandom(3 * M + 100))
    tree = _tree_of(bytes(data))
    assert tree.root() == root_of(bytes(data))
    assert [tree.get(i) for i in range(len(tree))] == leaves_of(bytes(data))
    data[2 * M + 5] ^= 1
    assert _tree_of(bytes(data)).root() != tree.root()


def test_items_hash_only_whole_leaves_and_report_partial_ones() -> None:
    cap = 4 * M + 10
    assert [i for i, _ in dg.hash_item(M, memoryview(bytes(2 * M)), cap)] == [1, 2]
    assert [i for i, _ in dg.hash_item(M + 1, memoryview(bytes(2 * M)), cap)] == [2]
    assert dg.partial_leaves(M + 1, 2 * M, cap) == [1, 3]
    assert dg.partial_leaves(M, 2 * M, cap) == []
    assert dg.partial_leaves(4 * M, 10, cap) == []  # the short last leaf, whole
    assert [i for i, _ in dg.zero_item(4 * M, 10, cap)] == [4]
    assert dg.zero_item(4 * M, 10, cap)[0][1] == blake3.blake3(bytes(10)).digest()


def test_touched_runs_and_sync_digest() -> None:
    ranges = [Extent(0, 10), Extent(M - 1, 2), Extent(5 * M, M), Extent(7 * M + 3, 1)]
    assert list(dg.touched_leaves(ranges)) == [(0, 2), (5, 1), (7, 1)]
    data = os.urandom(8 * M)
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
        dg.HashTree.zeros(M).set(1, bytes(32))
