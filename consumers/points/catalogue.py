"""The catalogue of one disk's restore points: which points exist, and which undo store each has.

One file beside the replica's record, ``<name>.points``: JSON with a blake3 checksum of its
body, written atomically (:func:`consumers.copy.dirfiles.write_atomic`), so a crash leaves the
old or the new catalogue. Points are listed oldest first; ids only grow.

* A *complete* point was committed: it has its commit's change ID, time and hash tree root.
* The newest complete point is the *live* one: the replica itself holds it, so failing over to
  it needs no work. It has no undo store, except while a sync runs after it: that sync saves
  the bytes it overwrites into the live point's store before writing them.
* At most one point is *pending*: the sync writing the replica now (or interrupted), always
  last. It becomes complete (and the live one) at its commit, which also seals the previous
  point's store.

The transitions (:func:`begin`, :func:`commit`, :func:`remove`, :func:`reconcile`,
:func:`rolled_back`) are pure:
the caller (:mod:`consumers.points.chain`) orders them with the file writes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Literal

import blake3
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from cbtstream.errors import CbtStreamError
from consumers.copy.dirfiles import open_dir, read_file, write_atomic

#: A catalogue of a few thousand points is a few hundred KiB.
_MAX_CATALOGUE = 16 << 20


class CatalogueCorrupt(CbtStreamError):
    """The catalogue is torn, edited or not ours: its points cannot be trusted."""

    reason = "points_catalogue_corrupt"


class Point(BaseModel):
    """One restore point of a disk."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: int = Field(ge=1)
    sync_id: str
    change_id: str
    #: When the snapshot was taken (None if the plan did not say).
    taken_at: AwareDatetime | None = None
    #: The VM snapshot the sync copied (one per VM and cycle): the points of a VM's disks with
    #: the same snapshot make a point of the VM (None in catalogues written before it).
    vm_snapshot: str | None = None
    #: Set at the commit: the point is complete.
    committed_at: AwareDatetime | None = None
    root_digest: str | None = None
    #: Id of its undo store (:mod:`consumers.points.undo`); None while nothing overwrote it.
    store: str | None = None
    #: Saved bytes in its store, counted when it was sealed.
    undo_bytes: int = Field(default=0, ge=0)
    sealed: bool = False

    @property
    def complete(self) -> bool:
        return self.committed_at is not None


class Catalogue(BaseModel):
    """Every point of one disk, oldest first (see the module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: Literal[1] = 1
    disk_key: str
    capacity: int = Field(ge=0)
    next_id: int = Field(default=1, ge=1)
    points: tuple[Point, ...] = ()

    @property
    def complete(self) -> tuple[Point, ...]:
        return tuple(p for p in self.points if p.complete)

    @property
    def live(self) -> Point | None:
        """The newest complete point: the replica holds it."""
        done = self.complete
        return done[-1] if done else None

    @property
    def pending(self) -> Point | None:
        return self.points[-1] if self.points and not self.points[-1].complete else None

    def point(self, point_id: int) -> Point:
        for p in self.points:
            if p.id == point_id:
                return p
        raise KeyError(f"no point {point_id}")

    def select(self, at: str) -> Point | None:
        """The complete point ``at`` names (its id, VM snapshot, sync id or change ID; the
        newest if several do), or None."""
        for p in reversed(self.complete):
            if at in (str(p.id), p.vm_snapshot, p.sync_id, p.change_id):
                return p
        return None

    def stores_from(self, point_id: int) -> tuple[str, ...]:
        """The undo stores that serve point ``point_id``, oldest first: those of the complete
        points from it on (the live point's too, while a sync is saving into it)."""
        point = self.point(point_id)
        if not point.complete:
            raise ValueError(f"point {point_id} is not complete")
        return tuple(p.store for p in self.complete if p.id >= point_id and p.store)


@dataclass(frozen=True, slots=True)
class Held:
    """What the replica's record says it holds (its clean sync)."""

    sync_id: str
    change_id: str
    root_digest: str
    committed_at: datetime
    taken_at: datetime | None = None
    vm_snapshot: str | None = None


class Step(StrEnum):
    """What :func:`reconcile` found the catalogue needs before a sync may begin."""

    NONE = "none"
    #: The record was marked clean by the pending sync but its commit here did not finish.
    FINISH = "finish"
    #: The catalogue does not describe the replica: every point is dropped.
    RESET = "reset"


def reconcile(cat: Catalogue, held: Held | None, writing: str | None = None) -> Step:
    """Does the catalogue agree with the record? ``held`` is the record's clean sync and
    ``writing`` the sync the record says is writing the replica (None when it is not dirty).

    * The live point must be the record's clean sync. A pending point that *is* that sync was
      committed in the record but not here (a crash between the two): finish it.
    * A dirty record is only described by a catalogue whose pending point is the writing sync
      (it saved what it overwrote) and whose live point is the clean sync the record still
      names (a full copy's record names none while it runs: its live point stays the one it
      started from). A replica written by a sync the catalogue does not know cannot be read as
      any point: every point is dropped and none is made (a dirty replica is no point).
    * Anything else (no clean sync, another one: the replica was rewritten without the
      catalogue) makes every point unreadable: reset to the record's clean sync alone (also
      what makes a replica's first point when points are enabled)."""
    pending, live = cat.pending, cat.live
    if writing is not None:
        if (pending is not None and pending.sync_id == writing and live is not None
                and (held is None or live.sync_id == held.sync_id)):
            return Step.NONE
        return Step.RESET if cat.points else Step.NONE
    if held is None:
        return Step.RESET if cat.points else Step.NONE
    if pending is not None and pending.sync_id == held.sync_id:
        return Step.FINISH
    if live is None:  # points just enabled on a replica with history: it is the first point
        return Step.RESET
    return Step.NONE if live.sync_id == held.sync_id else Step.RESET


def fresh(disk_key: str, capacity: int, held: Held | None, next_id: int = 1) -> Catalogue:
    """A catalogue whose only point is the replica as the record holds it (or none)."""
    if held is None:
        return Catalogue(disk_key=disk_key, capacity=capacity, next_id=next_id)
    live = Point(id=next_id, sync_id=held.sync_id, change_id=held.change_id,
                 taken_at=held.taken_at, committed_at=held.committed_at,
                 root_digest=held.root_digest, vm_snapshot=held.vm_snapshot)
    return Catalogue(disk_key=disk_key, capacity=capacity, next_id=next_id + 1, points=(live,))


def begin(cat: Catalogue, sync_id: str, change_id: str, taken_at: datetime | None,
          new_store: str, vm_snapshot: str | None = None) -> Catalogue:
    """A sync starts writing the replica: it is the pending point (replacing a pending point of
    another sync, which never committed), and the live point gets store ``new_store`` unless it
    has one (a resumed or replacing sync goes on saving into it: first saved bytes win)."""
    pending = cat.pending
    if pending is not None and pending.sync_id == sync_id:
        return cat
    points = [p for p in cat.points if p.complete]
    if points and points[-1].store is None:
        points[-1] = points[-1].model_copy(update={"store": new_store})
    points.append(Point(id=cat.next_id, sync_id=sync_id, change_id=change_id,
                        taken_at=taken_at, vm_snapshot=vm_snapshot))
    return cat.model_copy(update={"points": tuple(points), "next_id": cat.next_id + 1})


def commit(cat: Catalogue, sync_id: str, root_digest: str, committed_at: datetime,
           undo_bytes: int) -> Catalogue:
    """The pending sync committed: it is the live point; the previous one's store is sealed
    with ``undo_bytes`` saved bytes."""
    pending = cat.pending
    if pending is None or pending.sync_id != sync_id:
        raise ValueError(f"sync {sync_id} is not the pending point")
    points = list(cat.points)
    points[-1] = pending.model_copy(update={"committed_at": committed_at,
                                            "root_digest": root_digest})
    if len(points) > 1:
        points[-2] = points[-2].model_copy(update={"sealed": True, "undo_bytes": undo_bytes})
    return cat.model_copy(update={"points": tuple(points)})


def remove(cat: Catalogue, drop: frozenset[int], stores: dict[int, tuple[str, int]]
           ) -> Catalogue:
    """Drop points ``drop``; ``stores`` gives kept points a new (store id, undo bytes)."""
    points = []
    for p in cat.points:
        if p.id in drop:
            continue
        if p.id in stores:
            store, size = stores[p.id]
            p = p.model_copy(update={"store": store, "undo_bytes": size, "sealed": True})
        points.append(p)
    return cat.model_copy(update={"points": tuple(points)})


def rolled_back(cat: Catalogue, point_id: int) -> Catalogue:
    """The replica was rolled back to complete point ``point_id`` (``failover --at``): it is the
    live point, without an undo store (the replica holds it); every newer point is dropped
    (their bytes were overwritten by the rollback: a reverse incremental keeps no redo data)."""
    point = cat.point(point_id)
    if not point.complete:
        raise ValueError(f"point {point_id} is not complete")
    points = [p for p in cat.complete if p.id < point_id]
    points.append(point.model_copy(update={"store": None, "undo_bytes": 0, "sealed": False}))
    return cat.model_copy(update={"points": tuple(points)})


def file_name(name: str) -> str:
    return f"{name}.points"


def load(directory: Path, name: str) -> Catalogue | None:
    """The catalogue, None if there is none; :class:`CatalogueCorrupt` if it is damaged."""
    try:
        dir_fd = open_dir(directory, create=False)
    except FileNotFoundError:
        return None
    try:
        raw = read_file(dir_fd, file_name(name), _MAX_CATALOGUE)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise CatalogueCorrupt(f"cannot read the points catalogue: {exc}") from exc
    finally:
        os.close(dir_fd)
    try:
        doc = json.loads(raw)
        body = doc["catalogue"]
        canon = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
        if blake3.blake3(canon).hexdigest() != doc["blake3"]:
            raise CatalogueCorrupt("the points catalogue's checksum does not match")
        return Catalogue.model_validate(body)
    except (ValueError, KeyError, TypeError, ValidationError) as exc:
        raise CatalogueCorrupt("the points catalogue does not parse") from exc


def save(directory: Path, name: str, cat: Catalogue) -> None:
    """Replace the catalogue atomically (durable when this returns)."""
    body = cat.model_dump(mode="json")
    canon = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    raw = json.dumps({"catalogue": body, "blake3": blake3.blake3(canon).hexdigest()},
                     sort_keys=True).encode() + b"\n"
    dir_fd = open_dir(directory, create=True)
    try:
        write_atomic(dir_fd, file_name(name), raw)
    finally:
        os.close(dir_fd)
