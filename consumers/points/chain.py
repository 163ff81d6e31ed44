"""The restore points of one replica, in the order a sync must follow (the copier's calls).

Order of effects, for a sync of the replica (``consumers/copier.py`` holds the replica's lock
throughout; the steps in brackets are the copier's own, ``docs/architecture.md``)::

    [lock -> load record -> admit plan]
    -> begin           reconcile the catalogue with the record; the sync is the pending point
                       and the live point gets an undo store (catalogue written, durable)
    -> [mark dirty]
    -> per group of writes: writer.missing -> read those old bytes from the replica
                       -> writer.save_many -> writer.sync (durable) -> [write the group]
    -> [flush target -> save tree -> mark clean]
    -> commit          seal the previous point's store, then the catalogue names the sync as
                       the live point (durable)
    -> prune           drop what the retention policy no longer keeps
    -> [publish -> release snapshot -> commit offset]

A crash before ``begin``'s catalogue write changes nothing. Between ``begin`` and ``commit`` the
replica is dirty and the previous point stays readable (its store holds every overwritten byte,
the replica the rest); the resume (or the full copy the fence allows instead) calls ``begin``
again and goes on saving into the same store, the first saved bytes winning. A crash after
"mark clean" and before ``commit`` finished is finished by the next ``begin`` (the record's
clean sync is the pending point). A crash in ``prune``: :mod:`consumers.points.prune`.
"""

from __future__ import annotations

import contextlib
import uuid
from datetime import datetime
from pathlib import Path

from cbtstream.config import PointsPolicy
from consumers.copy.dirfiles import unlink_synced
from consumers.points import catalogue as cat_mod
from consumers.points.catalogue import Catalogue, Held, Step
from consumers.points.prune import DropReport, collect_garbage, drop_points
from consumers.points.reader import PointReader, ReadLive
from consumers.points.retention import decide
from consumers.points.undo import UndoSealed, UndoStore, UndoWriter, delete_store


class PointChain:
    """The points of the replica whose record is ``<directory>/<name>.state``."""

    def __init__(self, directory: Path, name: str, disk_key: str, capacity: int) -> None:
        self.directory = directory
        self.name = name
        self.disk_key = disk_key
        self.capacity = capacity

    def load(self) -> Catalogue:
        """The catalogue (empty if there is none yet); ``CatalogueCorrupt`` if damaged."""
        cat = cat_mod.load(self.directory, self.name)
        if cat is None:
            return cat_mod.fresh(self.disk_key, self.capacity, None)
        if cat.disk_key != self.disk_key or cat.capacity != self.capacity:
            return self._reset(cat, None)  # another disk's, or the disk was resized
        return cat

    def _save(self, cat: Catalogue) -> None:
        cat_mod.save(self.directory, self.name, cat)

    def _reset(self, old: Catalogue | None, held: Held | None) -> Catalogue:
        cat = cat_mod.fresh(self.disk_key, self.capacity, held, old.next_id if old else 1)
        self._save(cat)
        collect_garbage(self.directory, self.name, cat)
        return cat

    def recover(self, held: Held | None, writing: str | None = None) -> Catalogue:
        """Bring the catalogue in step with the record (:func:`catalogue.reconcile`; ``writing``:
        the sync a dirty record names): finish an interrupted commit, or drop every point if
        the catalogue does not describe the replica (a dirty replica it does not describe is
        no point either)."""
        base = None if writing is not None else held
        try:
            cat = self.load()
        except cat_mod.CatalogueCorrupt:
            return self._reset(None, base)
        step = cat_mod.reconcile(cat, held, writing)
        if step is Step.FINISH:
            assert held is not None
            return self._finish(cat, held.sync_id, held.root_digest, held.committed_at)
        if step is Step.RESET:
            return self._reset(cat, base)
        return cat

    def begin(self, sync_id: str, change_id: str, taken_at: datetime | None,
              held: Held | None, writing: str | None = None, vm_snapshot: str | None = None
              ) -> UndoWriter | None:
        """A sync is about to write the replica (before "mark dirty"): the writer of the undo
        store of the live point (None for a first copy: there is no earlier point).
        ``writing``: the sync the record says is writing the replica, if it is dirty."""
        cat = self.recover(held, writing)
        new = cat_mod.begin(cat, sync_id, change_id, taken_at, uuid.uuid4().hex, vm_snapshot)
        if new != cat:
            self._save(new)
        live = new.live
        if live is None or live.store is None:
            return None
        return UndoWriter.open(self.directory, self.name, live.store, self.capacity)

    def commit(self, writer: UndoWriter | None, sync_id: str, root_digest: str,
               committed_at: datetime) -> Catalogue:
        """The sync was marked clean: seal the previous point's store, then record the sync
        as the live point. ``writer`` is closed."""
        cat = self.load()
        if writer is not None:
            writer.close()  # the seal reopens the store: one path for a commit and a finish
        return self._finish(cat, sync_id, root_digest, committed_at)

    def _finish(self, cat: Catalogue, sync_id: str, root_digest: str, committed_at: datetime
                ) -> Catalogue:
        pending = cat.pending
        if pending is None or pending.sync_id != sync_id:
            raise ValueError(f"sync {sync_id} is not the pending point")
        previous = cat.live
        undo_bytes = 0
        if previous is not None and previous.store is not None:
            assert previous.root_digest is not None
            try:
                writer = UndoWriter.open(self.directory, self.name, previous.store,
                                         self.capacity)
            except UndoSealed:  # sealed before a crash: the seal holds the figures
                store = UndoStore.open(self.directory, self.name, previous.store,
                                       self.capacity)
                undo_bytes = store.data_bytes
                store.close()
            else:
                try:
                    undo_bytes = writer.seal(previous.root_digest, previous.change_id).data_bytes
                finally:
                    writer.close()
        done = cat_mod.commit(cat, sync_id, root_digest, committed_at, undo_bytes)
        self._save(done)
        return done

    def prune(self, policy: PointsPolicy, now: datetime) -> DropReport:
        """Drop the points ``policy`` no longer keeps (after ``commit``, under the lock)."""
        cat = self.load()
        decision = decide(cat.points, policy, now)
        return drop_points(self.directory, self.name, cat, frozenset(decision.drop))

    def reader(self, point_id: int, read_live: ReadLive) -> PointReader:
        """A reader of complete point ``point_id``; ``read_live`` reads the replica. Close it."""
        cat = self.load()
        stores: list[UndoStore] = []
        try:
            for store in cat.stores_from(point_id):
                stores.append(UndoStore.open(self.directory, self.name, store, self.capacity))
        except BaseException:
            for s in stores:
                s.close()
            raise
        return PointReader(stores, read_live, self.capacity)

    def roll_back(self, point_id: int) -> Catalogue:
        """After the replica was rewritten to point ``point_id`` and proven: it is the live
        point, newer points and its own store are gone (catalogue first, then the files)."""
        cat = cat_mod.rolled_back(self.load(), point_id)
        self._save(cat)
        collect_garbage(self.directory, self.name, cat)
        return cat

    def forget(self) -> None:
        """Remove the catalogue and every store (the replica's record is being forgotten)."""
        cat = cat_mod.load(self.directory, self.name)
        for p in cat.points if cat else ():
            if p.store:
                delete_store(self.directory, self.name, p.store)
        empty = cat_mod.fresh(self.disk_key, self.capacity, None)
        self._save(empty)
        collect_garbage(self.directory, self.name, empty)


def forget_points(directory: Path, name: str) -> None:
    """Remove the catalogue and every undo file of the replica record ``name`` (its record is
    being forgotten: what it held is unknown, so no point of it can be read)."""
    with contextlib.suppress(OSError):
        unlink_synced(directory, cat_mod.file_name(name))
    collect_garbage(directory, name, cat_mod.fresh("", 0, None))
