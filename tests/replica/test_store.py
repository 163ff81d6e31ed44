"""Replica records on disk: atomic, checksummed, tree checked against the recorded root."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from consumers.copy.digest import HashTree, hash_item
from consumers.replica.state import (
    HeldSync,
    ReplicaState,
    ReplicaStatus,
    TargetIdentity,
    TargetKind,
    Unknown,
)
from consumers.replica.store import ReplicaStore

M = 1 << 20
KEY = "5012abcd-1111-2222-3333-444455556666/disk-2000"
TARGET = TargetIdentity(kind=TargetKind.FILE, location="/x", device=1, inode=2, size=3 * M)


def _state(store: ReplicaStore, tree: HashTree) -> ReplicaState:
    name = store.save_tree(tree, 7)
    held = HeldSync(sync_id=uuid.uuid4(), generation=7, change_id="52 8a/3",
                    vm_snapshot="snapshot-3", snapshot_taken_at=None,
                    replica_digest=tree.root(), tree_file=name, result={"bytes_copied": 1})
    return ReplicaState(pipeline="p", disk_key=KEY, backing_uuid="u", capacity_bytes=3 * M,
                        target=TARGET, status=ReplicaStatus.CLEAN, held=held)


def _tree() -> HashTree:
    tree = HashTree.zeros(3 * M)
    for i, h in hash_item(0, memoryview(os.urandom(3 * M)), 3 * M):
        tree.set(i, h)
    return tree


def test_round_trip_and_tree(tmp_path: Path) -> None:
    store = ReplicaStore(tmp_path / "vm", "disk-2000.img")
    assert store.load() is None
    tree = _tree()
    state = _state(store, tree)
    store.save(state)
    assert store.load() == state
    assert state.held is not None
    loaded = store.load_tree(state.held, 3 * M)
    assert loaded is not None and loaded.root() == tree.root()
    assert not [p for p in (tmp_path / "vm").iterdir() if ".tmp" in p.name]


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
    state = _state(store, _tree())
    assert state.held is not None
    tree_path = tmp_path / state.held.tree_file
    raw = bytearray(tree_path.read_bytes())
    raw[-1] ^= 1
    tree_path.write_bytes(bytes(raw))
    assert store.load_tree(state.held, 3 * M) is None
    assert store.load_tree(state.held.model_copy(update={"tree_file": "../etc"}), 3 * M) is None
    store.prune_trees(None)
    assert not list(tmp_path.glob("*.tree.*"))
