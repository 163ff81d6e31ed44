"""Re-hash replicas (and optionally their snapshot's NBD export) and compare with what they are
recorded to hold. The I/O half of ``cbtstream verify``; no Kafka here.

The verdict of one replica (:func:`verdict`, pure) compares three digests:

* the root recomputed from the replica's bytes, with the root its record holds (``held``): a
  difference means the bytes changed behind the copier's back (bit rot, an operator's write);
* the record's change ID and root, with the disk's latest commit in the log: a difference means
  the replica is not the one the pipeline committed (a replaced volume, another host's copier);
* with ``--source``, the root of the snapshot's export, with the held root.

A replica found different is marked ``mismatch`` in its record (under the replica's lock), so the
next sync copies it in full with reason ``replica_mismatch``.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from consumers.copy import digest_v1 as v1
from consumers.copy.digest import HASH, PIECE, HashTree, hash_pieces, piece_count
from consumers.copy.digest_v1 import V1Tree
from consumers.copy.sources import NbdSource
from consumers.copy.throttle import Throttle
from consumers.nbd.uri import parse_nbd_uri
from consumers.replica.location import ReplicaLocation, TargetResolver
from consumers.replica.scan import ReadInto, scan
from consumers.replica.state import ReplicaState, ReplicaStatus, TargetKind, Unknown
from consumers.replica.store import ReplicaBusy, ReplicaStore
from schemas.disk import DiskRef
from schemas.events import ReplicaMismatch, ReplicaVerified


@dataclass(frozen=True)
class Found:
    """A replica record found on this host, with where its replica is."""

    disk_key: str
    location: ReplicaLocation
    record: ReplicaState | Unknown


def find_records(targets: TargetResolver) -> Iterator[Found]:
    """Every replica record under ``target_root`` and in the copier's state area.

    A record is used only if the configuration maps its disk to the very location the record
    sits at (a record cannot point the verifier anywhere else).
    """
    seen: set[tuple[str, str]] = set()
    roots = [targets.root, targets.state_root]
    for root in roots:
        if not root.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
            for name in filenames:
                if not name.endswith(".state") or name.startswith("."):
                    continue
                store = ReplicaStore(Path(dirpath), name[: -len(".state")])
                record = store.load()
                if record is None:
                    continue
                key = record.disk_key if isinstance(record, ReplicaState) else None
                if key is None:
                    continue
                try:
                    loc = targets.locate(key)
                except Exception:
                    continue
                if (loc.store.directory, loc.store.name) != (store.directory, store.name):
                    continue
                if (key, loc.location) not in seen:
                    seen.add((key, loc.location))
                    yield Found(key, loc, record)


async def tree_of(read_into: ReadInto, capacity: int,
                  progress: Callable[[int], None] | None = None, version: int = 2
                  ) -> HashTree | V1Tree:
    """The hash tree of ``capacity`` bytes read with ``read_into``, in format ``version`` (the
    one the record's root is in), known by its pieces: leaf entries are folded as they are
    hashed and not kept, so memory is 32 bytes per MiB of disk. Hashing overlaps reads."""
    pieces = bytearray(piece_count(capacity) * HASH)

    def hash_chunk(view: memoryview) -> bytes:
        return v1.hash_pieces(view) if version == 1 else hash_pieces(view)[1]

    def put(offset: int, entries: bytes) -> None:
        j = offset // PIECE * HASH
        pieces[j : j + len(entries)] = entries

    await scan(read_into, capacity, hash_chunk, put, progress=progress, name="cbt-verify")
    return V1Tree(capacity, pieces) if version == 1 else HashTree(capacity, pieces)


@dataclass(frozen=True)
class Verdict:
    ok: bool
    detail: str
    bad_leaves: int = 0
    first_bad_offset: int | None = None


def verdict(state: ReplicaState, actual: HashTree | V1Tree,
            held_tree: HashTree | V1Tree | None, latest_change_id: str | None,
            latest_digest: str | None, source_root: str | None = None) -> Verdict:
    """Compare a replica's recomputed tree with its record and the latest commit (pure).
    Differences are counted by MiB: version 2 pieces, version 1 leaves."""
    held = state.held
    if held is None:
        return Verdict(False, "the replica holds no committed sync")
    bad = 0
    first: int | None = None
    if held_tree is not None and type(held_tree) is type(actual) \
            and held_tree.pieces != actual.pieces:
        a, b = memoryview(actual.pieces), memoryview(held_tree.pieces)
        for j in range(min(len(a), len(b)) // HASH):
            if a[j * HASH : (j + 1) * HASH] != b[j * HASH : (j + 1) * HASH]:
                bad += 1
                first = j * PIECE if first is None else first
    root = actual.root()
    if root != held.replica_digest:
        return Verdict(False, f"replica bytes hash to {root}, its record says "
                       f"{held.replica_digest}", bad, first)
    if latest_change_id is not None and latest_change_id != held.change_id:
        return Verdict(False, f"replica holds {held.change_id!r}, the latest commit is "
                       f"{latest_change_id!r}")
    if latest_digest is not None and latest_digest not in (held.replica_digest,
                                                           held.converted_from):
        return Verdict(False, f"the latest commit names replica digest {latest_digest}, the "
                       f"replica holds {held.replica_digest}")
    if source_root is not None and source_root != held.replica_digest:
        return Verdict(False, f"the snapshot's export hashes to {source_root}, the replica to "
                       f"{root}")
    return Verdict(True, "equal")


def usable(state: ReplicaState | Unknown) -> str | None:
    """Why a record cannot be verified now (None: it can)."""
    if isinstance(state, Unknown):
        return f"record unknown: {state.detail}"
    if state.status == ReplicaStatus.DIRTY:
        return "a sync is writing this replica (or was interrupted): verify after it commits"
    return None


@dataclass(frozen=True)
class Check:
    """The result of re-hashing one replica."""

    result: str  # equal | mismatch | busy | unverifiable
    detail: str
    state: ReplicaState | None = None
    replica_digest: str | None = None
    source_digest: str | None = None
    bad_leaves: int = 0
    first_bad_offset: int | None = None

    @property
    def ok(self) -> bool:
        return self.result == "equal"


async def check_replica(
    loc: ReplicaLocation,
    read_target: Callable[[ReplicaLocation, int, Callable[[int], None] | None, int],
                          Awaitable[HashTree | V1Tree]],
    *,
    latest: tuple[str | None, str | None] | None = None,
    source_root: Callable[[ReplicaState], Awaitable[str | None]] | None = None,
    progress: Callable[[int], None] | None = None,
    mark: bool = True,
    wait_s: float = 5.0,
) -> Check:
    """Re-hash one replica and judge it (:func:`verdict`); the record is read and marked under
    the replica's lock, the hashing runs without it.

    ``latest`` is the disk's latest commit (change ID, replica digest) if the caller knows it;
    ``source_root`` hashes the snapshot's export. With ``mark``, a mismatch is written into the
    record (the next sync is full, ``replica_mismatch``) and an equal replica gets
    ``verified_at``.
    """
    try:
        async with loc.store.lock(wait_s=wait_s):
            record = await asyncio.to_thread(loc.store.load)
        if record is None:
            return Check("unverifiable", "no record")
        why = usable(record)
        if why is not None:
            return Check("unverifiable", why, record if isinstance(record, ReplicaState)
                         else None)
        assert isinstance(record, ReplicaState) and record.held is not None
        capacity = record.capacity_bytes
        version = v1.version_of(record.held.replica_digest)
        if not version:
            return Check("unverifiable", "the record's root is of no known tree format", record)
        # Hash without holding the lock, so a sync is never kept waiting behind a long verify;
        # a sync that started meanwhile changed the record (dirty first), and the result is
        # then thrown away rather than trusted.
        actual = await read_target(loc, capacity, progress, version)
        src = await source_root(record) if source_root is not None else None
        async with loc.store.lock(wait_s=wait_s):
            again = await asyncio.to_thread(loc.store.load)
            if again != record:
                return Check("busy", "a sync wrote the replica while it was being verified; "
                             "verify it again later")
            held_tree = await asyncio.to_thread(loc.store.load_tree, record.held, capacity)
            cid, digest = latest if latest is not None else (None, None)
            v = verdict(record, actual, held_tree, cid, digest, src)
            if mark:
                marked = record.verified() if v.ok else record.mismatched(v.detail)
                await asyncio.to_thread(loc.store.save, marked)
            return Check("equal" if v.ok else "mismatch", v.detail, record, actual.root(), src,
                         v.bad_leaves, v.first_bad_offset)
    except ReplicaBusy as exc:
        return Check("busy", str(exc))


def event_for(check: Check, disk: DiskRef | None = None
              ) -> ReplicaVerified | ReplicaMismatch | None:
    """The event of a finished check (None if it did not get to compare)."""
    state = check.state
    disk = disk or (state.disk if state is not None else None)
    if check.result not in ("equal", "mismatch") or state is None or state.held is None \
            or disk is None:
        return None
    held = state.held
    common: dict[str, object] = dict(
        disk=disk, sync_id=held.sync_id, change_id=held.change_id,
        expected_digest=held.replica_digest, replica_digest=check.replica_digest,
        source_digest=check.source_digest, target=state.target.location[:1024])
    if check.ok:
        return ReplicaVerified(**common)  # type: ignore[arg-type]
    return ReplicaMismatch(**common, detail=check.detail[:4096],  # type: ignore[arg-type]
                           bad_leaves=check.bad_leaves,
                           first_bad_offset=check.first_bad_offset)


async def read_local_or_nbd(loc: ReplicaLocation, capacity: int,
                            progress: Callable[[int], None] | None = None, version: int = 2, *,
                            tls_context: ssl.SSLContext | None = None,
                            throttle: Throttle | None = None) -> HashTree | V1Tree:
    """The tree (format ``version``) of a replica, read from its file or block device, or over
    NBD (one connection: an NBD target may serve one client)."""
    if loc.kind == TargetKind.NBD:
        async with NbdSource(parse_nbd_uri(loc.location), connections=1,
                             tls_context=tls_context) as src:
            return await tree_of(_throttled(src.read_into, throttle), capacity, progress,
                                 version)
    flags = os.O_RDONLY | os.O_CLOEXEC | (os.O_NOFOLLOW if loc.kind == TargetKind.FILE else 0)
    fd = os.open(loc.location, flags)
    try:
        async def read_into(offset: int, buf: memoryview) -> None:
            done = 0
            while done < len(buf):
                n = await asyncio.to_thread(os.preadv, fd, [buf[done:]], offset + done)
                if n == 0:
                    raise OSError(f"{loc.location} ends before {offset + done}")
                done += n

        return await tree_of(_throttled(read_into, throttle), capacity, progress, version)
    finally:
        os.close(fd)


def _throttled(read_into: ReadInto, throttle: Throttle | None) -> ReadInto:
    if throttle is None:
        return read_into

    async def slow(offset: int, buf: memoryview) -> None:
        await throttle.acquire(len(buf))
        await read_into(offset, buf)

    return slow
