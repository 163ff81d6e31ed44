"""Rolling a failed-over replica back to one of its restore points (``failover VM --at POINT``).

A restore point is the live replica plus the undo stores of the points from it on
(``consumers/points``); the bytes where it may differ from the replica are exactly those the
stores hold. Rolling back writes the point's bytes there, proves the whole replica against the
point's hash-tree root, and then makes the point the replica's clean state. Order of effects,
under the replica's lock (no sync writes it meanwhile, and none after: it is failed over)::

    load record -> select the point (the catalogue as the record describes it)
    -> record: failed over + mismatch "rolling back to point P" (durable)
    -> for each range the point's stores hold: read the point -> write it to the replica
    -> flush the replica
    -> hash the whole replica into a new tree (leaf file + pieces file, durable)
    -> root != point's root: stop (the record stays mismatch: failback copies in full)
    -> catalogue: P is the live point, newer points and P's store dropped (durable)
    -> record: clean, holds P (its sync, change ID, snapshot, root, the new tree),
       ``rolled_back_from`` the change ID it held (durable) -> old tree files removed

A crash at any step before the last leaves the record ``mismatch``, which no sync trusts
(``failover --undo`` then copies in full); the stores are untouched until the replica is proven,
so running the command again finishes the rollback: reading the point never depends on the
bytes the rollback writes. A crash between the catalogue and the record is finished the same
way (the point is then the live one, with nothing left to write).

The newer points are lost: a reverse incremental keeps the old bytes of each point, not the new
ones (export them first with ``points export`` if they are needed). The held sync has no
recorded outcome, so a redelivered plan of it is not republished but refused by the generation
fence (``consumers/replica/guard.py``); the next sync after failback is incremental from the
point's change ID (``replica_rebased``) while the CBT epoch holds.

File and block-device replicas only: an NBD target is refused (export the point instead).
"""

from __future__ import annotations

import asyncio
import os
import uuid

from consumers.copy import digest as dg
from consumers.points.catalogue import Catalogue, CatalogueCorrupt, Point
from consumers.points.chain import PointChain
from consumers.replica.export import tree_version
from consumers.replica.failover import Handed, busy, unknown
from consumers.replica.points import chain_of, held_of
from consumers.replica.scan import scan
from consumers.replica.state import HeldSync, ReplicaState, ReplicaStatus, TargetKind
from consumers.replica.store import ReplicaBusy
from consumers.replica.verify import Found
from schemas.events import utcnow

#: The start of a record's mismatch detail while a rollback is unfinished.
ROLLING_BACK = "rolling back to restore point"
#: Bytes read from the point and written to the replica at a time.
_CHUNK = 8 << 20


def missing_point(found: Found, at: str) -> str | None:
    """Why the replica of ``found`` has no complete point ``at`` to roll back to (None: it has
    one). Read without the lock, before anything is done: a VM is rolled back whole or not at
    all (its disks must come back to the same VM snapshot)."""
    record = found.record
    if not isinstance(record, ReplicaState):
        return f"{found.disk_key}: its record cannot be read"
    if found.location.kind == TargetKind.NBD:
        return f"{found.disk_key}: an NBD replica is not rolled back (export the point instead)"
    try:
        cat = chain_of(found.location.store, found.disk_key, record.capacity_bytes).load()
    except CatalogueCorrupt as exc:
        return f"{found.disk_key}: {exc}"
    if cat.select(at) is None:
        return f"{found.disk_key}: no complete point {at!r} (points: {_names(cat)})"
    return None


async def roll_back(found: Found, at: str, reason: str, wait_s: float) -> Handed:
    """Roll the replica of ``found`` back to its point ``at`` (a VM snapshot, point id, sync
    id or change ID) and mark it failed over (see the module docstring)."""
    loc = found.location
    if loc.kind == TargetKind.NBD:
        return Handed(found.disk_key, "unsupported", "an NBD replica is not rolled back here: "
                      "export the point (cbtstream points export) instead", location=loc.location)
    try:
        async with loc.store.lock(wait_s=wait_s):
            return await asyncio.to_thread(_roll_back, found, at, reason)
    except ReplicaBusy as exc:
        return busy(found, exc)


def _roll_back(found: Found, at: str, reason: str) -> Handed:
    loc = found.location
    record = loc.store.load()
    if not isinstance(record, ReplicaState) or record.held is None:
        return unknown(found)
    unfinished = (record.status == ReplicaStatus.MISMATCH
                  and record.mismatch_detail.startswith(ROLLING_BACK))
    if record.status != ReplicaStatus.CLEAN and not unfinished:
        return Handed(found.disk_key, "not_clean", f"the replica is {record.status.value}: no "
                      "point of it can be read", record.held.change_id, loc.location)
    chain = chain_of(loc.store, found.disk_key, record.capacity_bytes)
    try:
        # a clean record first brings the catalogue in step (an unfinished commit); an
        # unfinished rollback's catalogue is read as it is (the record no longer describes it)
        cat = chain.load() if unfinished else chain.recover(held_of(record))
    except CatalogueCorrupt as exc:
        return Handed(found.disk_key, "no_point", str(exc), record.held.change_id, loc.location)
    point = cat.select(at)
    if point is None or point.root_digest is None:
        return Handed(found.disk_key, "no_point", f"no complete restore point {at!r} (points: "
                      f"{_names(cat)})", record.held.change_id, loc.location)
    if tree_version(point.root_digest) != 2:
        return Handed(found.disk_key, "unsupported", f"point {point.id} predates hash tree "
                      "version 2: export it instead", record.held.change_id, loc.location)
    if not unfinished and str(record.held.sync_id) == point.sync_id:
        if record.failed_over_at is None:
            loc.store.save(record.failed_over(reason))
        return Handed(found.disk_key, "failed_over", f"holds point {point.id} already "
                      f"({point.vm_snapshot or point.change_id}): nothing to roll back",
                      point.change_id, loc.location)
    started = record if record.failed_over_at is not None else record.failed_over(reason)
    started = started.mismatched(f"{ROLLING_BACK} {point.id} ({point.vm_snapshot or '-'}): not "
                                 "finished; run 'cbtstream failover --at' again")
    loc.store.save(started)
    written, root, tree_file = _rewrite(found, chain, point, record)
    if root != point.root_digest:
        loc.store.save(started.mismatched(
            f"rolled back to point {point.id} but the replica hashes to {root}, the point's root "
            f"is {point.root_digest}: written while failed over? failback copies it in full"))
        return Handed(found.disk_key, "mismatch", "the rolled-back replica does not hash to the "
                      "point's root; failback copies it in full", None, loc.location)
    dropped = [p.id for p in cat.complete if p.id > point.id]
    chain.roll_back(point.id)
    held = HeldSync(sync_id=uuid.UUID(point.sync_id), generation=record.held.generation,
                    change_id=point.change_id, vm_snapshot=point.vm_snapshot or "",
                    snapshot_taken_at=point.taken_at, replica_digest=point.root_digest,
                    tree_file=tree_file, result={})
    before = record.rolled_back_from or record.held.change_id
    done = started.model_copy(update={
        "status": ReplicaStatus.CLEAN, "held": held, "writing": None, "mismatch_detail": "",
        "rolled_back_from": before, "verified_at": utcnow(), "updated_at": utcnow()})
    loc.store.save(done)
    loc.store.prune_trees(tree_file, _leaves_of(tree_file))
    return Handed(found.disk_key, "rolled_back",
                  f"holds point {point.id} ({point.vm_snapshot or '-'}): {written} bytes "
                  f"rewritten, proven against its root; {len(dropped)} newer point(s) dropped",
                  point.change_id, loc.location)


def _names(cat: Catalogue) -> str:
    """The complete points of a catalogue as an operator names them (for refusals)."""
    return ", ".join(p.vm_snapshot or str(p.id) for p in cat.complete) or "none"


def _leaves_of(tree_file: str) -> str:
    """``<name>.pieces.<n>`` -> ``<name>.leaves.<n>`` (the leaf file the rollback wrote)."""
    head, _, n = tree_file.rpartition(".pieces.")
    return f"{head}.leaves.{n}"


def _rewrite(found: Found, chain: PointChain, point: Point, record: ReplicaState
             ) -> tuple[int, str, str]:
    """Write the point's bytes into the replica, flush, and hash it whole into a new tree:
    (bytes written, the replica's root, the tree's pieces file)."""
    assert record.held is not None
    loc = found.location
    flags = os.O_RDWR | os.O_CLOEXEC | (os.O_NOFOLLOW if loc.kind == TargetKind.FILE else 0)
    fd = os.open(loc.location, flags)
    try:
        def read_live(offset: int, length: int) -> bytes:
            data = os.pread(fd, length, offset)
            if len(data) != length:
                raise OSError(f"{loc.location} ends before {offset + length}")
            return data

        reader = chain.reader(point.id, read_live)
        written = 0
        try:
            for start, end in reader.differs():
                for off in range(start, end, _CHUNK):
                    data = reader.read(off, min(_CHUNK, end - off))
                    os.pwrite(fd, data, off)
                    written += len(data)
        finally:
            reader.close()
        os.fsync(fd)
        capacity = record.capacity_bytes
        # a file key of its own: the held tree's files stay until the record names the new one
        # (after an earlier rollback the held tree may itself be under generation + 1)
        key = record.held.generation + 1
        while record.held.tree_file.endswith(f".{key}"):
            key += 1
        leaves = loc.store.new_leaves(capacity, key)
        try:
            tree = dg.HashTree(capacity, bytearray(dg.piece_count(capacity) * dg.HASH), leaves)

            async def read_into(offset: int, view: memoryview) -> None:
                got = os.preadv(fd, [view], offset)
                if got != len(view):
                    raise OSError(f"{loc.location} ends before {offset + len(view)}")

            def put(offset: int, hashed: tuple[bytes, bytes]) -> None:
                entries, pieces = hashed
                leaves.write(offset // dg.LEAF, entries)
                j = offset // dg.PIECE * dg.HASH
                tree.pieces[j : j + len(pieces)] = pieces

            asyncio.run(scan(read_into, capacity, dg.hash_pieces, put, name="cbt-rollback"))
            leaves.sync()
        finally:
            leaves.close()
        tree.leaves = None
        name = loc.store.save_tree(tree, key, key)
    finally:
        os.close(fd)
    return written, tree.root(), name
