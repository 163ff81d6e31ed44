"""Replica records on disk: atomic, checksummed, tree checked against the recorded root; the
leaf file and its journal as a sync uses them."""

from __future__ import annotations

import os
import struct
import uuid
from pathlib import Path

from consumers.copy.digest import HashTree, hash_run
from consumers.copy.digest_v1 import V1Tree
from consumers.replica.state import (
    HeldSync,
    ReplicaState,
    ReplicaStatus,
    TargetIdentity,
    TargetKind,
    Unknown,
)
from consumers.replica.store import ReplicaStore
from tests.copy.treeref import leaves_of, leaves_of_v1, root_of, root_of_v1

M = 1 << 20
KEY = "5012abcd-1111-2222-3333-444455556666/disk-2000"
TARGET = TargetIdentity(kind=TargetKind.FILE, location="/x", device=1, inode=2, size=3 * M)


def _state(store: ReplicaStore, tree: HashTree) -> ReplicaState:
    name = store.save_tree(tree, 7, 5)
    held = HeldSync(sync_id=uuid.uuid4(), generation=7, change_id="52 8a/3",
                    vm_snapshot="snapshot-3", snapshot_taken_at=None,
                    replica_digest=tree.root(), tree_file=name, result={"bytes_copied": 1})
    return ReplicaState(pipeline="p", disk_key=KEY, backing_uuid="u", capacity_bytes=3 * M,
                        target=TARGET, status=ReplicaStatus.CLEAN, held=held)


DATA = os.urandom(3 * M)


def _tree(store: ReplicaStore | None = None) -> HashTree:
    """The tree of DATA; with a store, its leaves in the store's leaf file of generation 5."""
    leaves = store.new_leaves(3 * M, 5) if store is not None else None
    tree = HashTree.zeros(3 * M, leaves)
    tree.set_leaves(*hash_run(0, memoryview(DATA), 3 * M))
    tree.refold([(0, 3)])
    if leaves is not None:
        leaves.sync()
        leaves.close()
    return tree


def test_round_trip_and_tree(tmp_path: Path) -> None:
    store = ReplicaStore(tmp_path / "vm", "disk-2000.img")
    assert store.load() is None
    tree = _tree(store)
    state = _state(store, tree)
    store.save(state)
    assert store.load() == state
    assert state.held is not None
    loaded = store.load_tree(state.held, 3 * M)
    assert isinstance(loaded, HashTree) and loaded.root() == tree.root() == root_of(DATA)
    leaves, generation = store.open_leaves(state.held, 3 * M)
    assert generation == 5 and leaves.read(0, 48) == b"".join(leaves_of(DATA))
    leaves.close()
    assert not [p for p in (tmp_path / "vm").iterdir() if ".tmp" in p.name]


def test_a_version_1_tree_is_read_as_such(tmp_path: Path) -> None:
    """What an older copier wrote (``disk.img.tree.<gen>``, CBTTREE1) is loaded for verify and
    conversion, and checked against its root like a version 2 one."""
    store = ReplicaStore(tmp_path, "disk-2000.img")
    legacy = b"".join(leaves_of_v1(DATA))
    (tmp_path / "disk-2000.img.tree.4").write_bytes(struct.pack(">8sQQ", b"CBTTREE1", 3 * M, M)
                                                    + legacy)
    held = HeldSync(sync_id=uuid.uuid4(), generation=4, change_id="52 8a/3",
                    vm_snapshot="snapshot-3", snapshot_taken_at=None,
                    replica_digest=root_of_v1(DATA), tree_file="disk-2000.img.tree.4",
                    result={})
    loaded = store.load_tree(held, 3 * M)
    assert isinstance(loaded, V1Tree) and loaded.pieces == legacy
    assert store.load_tree(held.model_copy(update={"replica_digest": root_of(DATA)}),
                           3 * M) is None


def test_an_interrupted_syncs_leaf_entries_are_put_back(tmp_path: Path) -> None:
    """The sync journals the entries it rewrites; killed after rewriting some, the next open of
    the held tree's leaves puts them back (the record still holds the base)."""
    store = ReplicaStore(tmp_path, "disk-2000.img")
    base = _tree(store)
    state = _state(store, base)
    assert state.held is not None
    leaves, _ = store.open_leaves(state.held, 3 * M)
    base.leaves = leaves
    leaves.protect([(16, leaves.read(16, 16))])
    leaves.write(17, os.urandom(64))
    assert not base.consistent(1)
    leaves.close()  # killed
    again, _ = store.open_leaves(state.held, 3 * M)
    base.leaves = again
    assert all(base.consistent(j) for j in range(3))
    assert again.read(0, 48) == b"".join(leaves_of(DATA))
    again.close()


def test_a_missing_leaf_file_is_replaced_and_its_pieces_do_not_fold(tmp_path: Path) -> None:
    store = ReplicaStore(tmp_path, "disk-2000.img")
    tree = _tree(store)
    state = _state(store, tree)
    assert state.held is not None
    (tmp_path / store.leaves_name(5)).unlink()
    leaves, _ = store.open_leaves(state.held, 3 * M)
    tree.leaves = leaves
    assert not any(tree.consistent(j) for j in range(3))  # the engine proves them whole
    leaves.close()


def test_torn_edited_or_foreign_records_are_unknown(tmp_path: Path) -> None:
    store = ReplicaStore(tmp_path, "disk-2000.img")
    state = _state(store, _tree())
    store.save(state)
    path = tmp_path / store.state_name
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])  # torn
    assert isinstance(store.load(), Unknown)
    path.write_bytes(good.replace(b'"clean"', b'"dirty"'))  # edited: checksum no longer matches
    assert isinstance(store.load(), Unknown)
    path.write_bytes(b"\x00" * 100)
    assert isinstance(store.load(), Unknown)
    path.write_bytes(b'{"record": {"x": 1}, "blake3": "00"}')
    assert isinstance(store.load(), Unknown)


def test_a_tree_file_that_does_not_fold_to_the_root_is_not_used(tmp_path: Path) -> None:
    store = ReplicaStore(tmp_path, "disk-2000.img")
    state = _state(store, _tree(store))
    assert state.held is not None
    tree_path = tmp_path / state.held.tree_file
    raw = bytearray(tree_path.read_bytes())
    raw[-1] ^= 1
    tree_path.write_bytes(bytes(raw))
    assert store.load_tree(state.held, 3 * M) is None
    assert store.load_tree(state.held.model_copy(update={"tree_file": "../etc"}), 3 * M) is None
    store.prune_trees()
    assert not list(tmp_path.glob("*.pieces.*")) and not list(tmp_path.glob("*.leaves.*"))
