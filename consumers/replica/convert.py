"""Converting a replica's version 1 tree (1 MiB leaves) to version 2 (64 KiB leaves in 1 MiB
pieces), once, on its first incremental after the upgrade.

A version 2 leaf entry cannot be derived from a version 1 leaf hash: the bytes must be read. So
the copier reads the whole replica from its target (local or the replica's NBD export, not the
snapshot's source, which is the slow link), computes both trees in one pass, and proves the bytes
against what the record holds: the version 1 root must equal the record's root. Only then is the
version 2 tree saved and the record switched to it (the held sync keeps its change ID; its
``converted_from`` keeps the old root, which the commit in the log names, so ``verify`` accepts
either), and the incremental runs on the proven tree. A difference means the replica is not what
its record says (bit rot, a write behind the copier's back): the record is marked ``mismatch``
and the sync copies in full with ``replica_mismatch``, exactly as after ``cbtstream verify``.

Cost: one sequential read of the replica, hashed twice (about a minute per 100 GiB at local disk
speed), instead of a full copy from the snapshot. A dirty replica with a version 1 tree (an
interrupted sync from before the upgrade) cannot be proven this way: the session copies it in
full with ``replica_state_unknown`` instead.
"""

from __future__ import annotations

import asyncio
import logging
import time

from cbtstream.threads import opened_in_thread
from consumers.copy import digest as dg
from consumers.copy import digest_v1 as v1
from consumers.copy.leaves import FileLeaves
from consumers.replica.scan import ReadInto, scan
from consumers.replica.state import ReplicaState
from consumers.replica.store import ReplicaStore
from schemas.events import utcnow

log = logging.getLogger("cbtstream.copier.replica")


def _hash_both(view: memoryview) -> tuple[bytes, bytes, bytes]:
    """(version 2 leaf entries, version 2 piece entries, version 1 leaves) of a chunk."""
    leaves, pieces = dg.hash_pieces(view)
    return leaves, pieces, v1.hash_pieces(view)


async def both_trees(read_into: ReadInto, capacity: int, leaves: FileLeaves
                     ) -> tuple[dg.HashTree, v1.V1Tree]:
    """Read ``capacity`` bytes once; the version 2 tree (its leaf entries written to
    ``leaves``) and the version 1 tree. Hashing overlaps the reads
    (:func:`consumers.replica.scan.scan`)."""
    tree = dg.HashTree(capacity, bytearray(dg.piece_count(capacity) * dg.HASH), leaves)
    old = v1.V1Tree(capacity, bytearray(dg.piece_count(capacity) * dg.HASH))

    def put(offset: int, hashed: tuple[bytes, bytes, bytes]) -> None:
        entries, pieces, legacy = hashed
        leaves.write(offset // dg.LEAF, entries)
        j = offset // dg.PIECE * dg.HASH
        tree.pieces[j : j + len(pieces)] = pieces
        old.pieces[j : j + len(legacy)] = legacy

    await scan(read_into, capacity, _hash_both, put, name="cbt-convert")
    return tree, old


async def convert(store: ReplicaStore, state: ReplicaState, read_into: ReadInto
                  ) -> tuple[ReplicaState, dg.HashTree] | str:
    """Convert the clean replica ``state`` describes (see the module docstring): the new,
    saved record and its tree, or why the replica's bytes do not prove its record (nothing of
    the conversion is kept then). Call under the replica's lock."""
    held = state.held
    assert held is not None
    capacity = state.capacity_bytes
    t0 = time.monotonic()
    log.info("converting the replica's hash tree to version 2: reading the replica once",
             extra={"replica_digest": held.replica_digest})
    leaves = await opened_in_thread(store.new_leaves, capacity, held.generation,
                                    close=FileLeaves.close)
    try:
        tree, old = await both_trees(read_into, capacity, leaves)
        if old.root() != held.replica_digest:
            await asyncio.to_thread(store.prune_trees, held.tree_file)
            return (f"converting the hash tree: the replica's bytes hash to {old.root()}, its "
                    f"record says {held.replica_digest}")
        await asyncio.to_thread(leaves.sync)
        name = await asyncio.to_thread(store.save_tree, tree, held.generation, held.generation)
        new = state.model_copy(update={"held": held.model_copy(update={
            "replica_digest": tree.root(), "tree_file": name,
            "converted_from": held.replica_digest}), "updated_at": utcnow()})
        await asyncio.to_thread(store.save, new)
        await asyncio.to_thread(store.prune_trees, name, store.leaves_name(held.generation))
    finally:
        leaves.close()
    tree.leaves = None
    log.info("replica hash tree converted to version 2", extra={
        "converted_from": held.replica_digest, "replica_digest": tree.root(),
        "duration_s": round(time.monotonic() - t0, 3)})
    return new, tree
