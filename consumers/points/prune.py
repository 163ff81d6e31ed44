"""Dropping restore points: delete the oldest ones' stores, merge a middle one into the older.

Plan (pure, :func:`plan_drops`): walk the complete points oldest first, in runs of dropped
points. A run at the start of the chain is deleted: no kept point reads its stores. A run after
a kept point ``k`` is merged into ``k``'s store: ``k`` reads its own store first and then theirs
(:mod:`consumers.points.sources`), so ``k``'s new store is its own extents followed by theirs
where nothing earlier covers them (first saved bytes win, as in the writer). Every other kept
point reads the same bytes as before: for a point older than ``k`` the merged store covers a
byte exactly when ``k``'s or a dropped store did, with the same bytes.

Execution (:func:`drop_points`), crash-safe in this order:

1. write each merged store under a new id and seal it (durable: data, index, seal);
2. write the catalogue naming the merged stores and without the dropped points (atomic):
   the commit point of the drop;
3. delete the stores the catalogue no longer names;
4. remove any other undo file the catalogue does not name (:func:`collect_garbage`).

A crash before 2 leaves the old catalogue and a merged store nobody names; after 2, old stores
nobody names. Either is removed by the next garbage collection, which only runs under the
replica's lock (a writer's store is in the catalogue before its first byte is saved).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from consumers.copy.dirfiles import open_dir
from consumers.points import catalogue as cat_mod
from consumers.points.catalogue import Catalogue, Point
from consumers.points.undo import UndoStore, UndoWriter, delete_store, store_of

#: Saved bytes per fsync while a merge copies extents.
_MERGE_SYNC_BYTES = 64 << 20


@dataclass(frozen=True, slots=True)
class Merge:
    """Point ``into`` gets a new store: its own, then ``sources`` (its dropped successors')."""

    into: int
    stores: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class DropPlan:
    """Stores deleted outright and merges to write, for the points dropped."""

    drop: frozenset[int]
    delete: tuple[str, ...]
    merges: tuple[Merge, ...]


@dataclass(frozen=True, slots=True)
class DropReport:
    """What a drop did: points dropped, bytes of undo data reclaimed."""

    dropped: tuple[int, ...]
    reclaimed_bytes: int
    catalogue: Catalogue


def plan_drops(points: Sequence[Point], drop: frozenset[int]) -> DropPlan:
    """The deletes and merges that drop ``drop`` from ``points`` (see the module docstring).
    The live point, a pending point and a point whose store is being written (while a sync
    runs) cannot be dropped."""
    done = [p for p in points if p.complete]
    if done and done[-1].id in drop:
        raise ValueError("the live point cannot be dropped")
    if any(not p.complete for p in points):
        raise ValueError("points are not dropped while a sync writes the replica")
    unknown = drop - {p.id for p in done}
    if unknown:
        raise ValueError(f"no complete points {sorted(unknown)}")
    delete: list[str] = []
    merges: list[Merge] = []
    kept: Point | None = None
    run: list[str] = []

    def close_run() -> None:
        if run and kept is not None:
            own = (kept.store,) if kept.store else ()
            merges.append(Merge(kept.id, (*own, *run)))
            delete.extend(own)  # once the catalogue names the merged store
        delete.extend(run)
        run.clear()

    for p in done:
        if p.id in drop:
            if p.store is not None:
                run.append(p.store)
            continue
        close_run()
        kept = p
    close_run()
    return DropPlan(frozenset(drop), tuple(delete), tuple(merges))


def merge_stores(directory: Path, name: str, capacity: int, stores: Sequence[str],
                 point: Point) -> tuple[str, int]:
    """Write and seal a new store: the extents of ``stores`` in that order, the first saved
    bytes winning; returns (its id, its bytes). Every extent read is checked."""
    assert point.root_digest is not None
    new = uuid.uuid4().hex
    writer = UndoWriter.open(directory, name, new, capacity)
    try:
        unsynced = 0
        for store in stores:
            source = UndoStore.open(directory, name, store, capacity)
            try:
                for offset, data in source.extents():
                    unsynced += writer.save_many([(offset, data)])
                    if unsynced >= _MERGE_SYNC_BYTES:
                        writer.sync()
                        unsynced = 0
            finally:
                source.close()
        seal = writer.seal(point.root_digest, point.change_id)
    finally:
        writer.close()
    return new, seal.data_bytes


def drop_points(directory: Path, name: str, cat: Catalogue, drop: frozenset[int]
                ) -> DropReport:
    """Drop points ``drop`` (order of effects: the module docstring); the catalogue is saved."""
    plan = plan_drops(cat.points, drop)
    before = sum(p.undo_bytes for p in cat.points if p.store)
    new_stores: dict[int, tuple[str, int]] = {}
    for merge in plan.merges:
        new_stores[merge.into] = merge_stores(directory, name, cat.capacity, merge.stores,
                                              cat.point(merge.into))
    after_cat = cat_mod.remove(cat, plan.drop, new_stores)
    cat_mod.save(directory, name, after_cat)
    for store in plan.delete:
        delete_store(directory, name, store)
    collect_garbage(directory, name, after_cat)
    after = sum(p.undo_bytes for p in after_cat.points if p.store)
    return DropReport(tuple(sorted(plan.drop)), before - after, after_cat)


def collect_garbage(directory: Path, name: str, cat: Catalogue) -> list[str]:
    """Remove undo files of ``name`` whose store the catalogue does not name (left by a crash
    during a drop, or by a reset); returns the stores removed. Call under the replica's lock."""
    named = {p.store for p in cat.points if p.store}
    try:
        dir_fd = open_dir(directory, create=False)
    except FileNotFoundError:
        return []
    try:
        orphans = sorted({s for e in os.listdir(dir_fd)
                          if (s := store_of(name, e)) is not None and s not in named})
        for entry in os.listdir(dir_fd):
            if store_of(name, entry) in orphans:
                with contextlib.suppress(OSError):
                    os.unlink(entry, dir_fd=dir_fd)
        if orphans:
            os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return orphans
