"""A replica's syncs through its session and store, as the copier runs them, with real parts
(nbdkit serving frozen snapshot images, a file replica): the version 2 tree's leaf file and
journal across an interrupted incremental, and the conversion of a version 1 tree that an older
copier recorded. After every sync the replica is compared byte for byte with the snapshot and
its root with one computed from the snapshot's bytes (``tests/copy/treeref.py``)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cbtstream.config import CopierSettings
from cbtstream.extents import Extent
from consumers.copy.engine import CopyFailed, CopyOptions, copy_disk
from consumers.copy.sources import NbdSource
from consumers.copy.targets import FileTarget
from consumers.executor import SyncResult
from consumers.nbd.uri import parse_nbd_uri
from consumers.replica.guard import Action, CopierHost
from consumers.replica.location import ReplicaLocation, TargetResolver
from consumers.replica.session import ReplicaSession
from consumers.replica.state import HeldSync, ReplicaState, ReplicaStatus, WritingSync
from consumers.replica.verify import check_replica, read_local_or_nbd
from schemas import FullReason, ReplicationType, SyncPlanned
from streams.planner import on_commit, on_snapshot
from tests.copy.images import M, apply
from tests.copy.treeref import leaves_of, leaves_of_v1, root_of, root_of_v1
from tests.nbd.nbdkit import nbdkit, needs_nbdkit
from tests.unit.factories import EPOCH_A, T0, commit_for, disk, snap

pytestmark = needs_nbdkit

K = 1024
SIZE = 6 * M + 12288
PIPE = "cbtstream"
HERE = CopierHost("host-a", "default")
#: CBT-like changed areas: 64 KiB blocks (whole leaves) and two small writes (edge leaves).
CHANGES = [(64 * K, 64 * K), (M + 256 * K, 128 * K), (2 * M + 1000, 4096), (3 * M, 64 * K),
           (4 * M + 640 * K, 64 * K), (5 * M + 7000, 100), (SIZE - 4096, 4096)]
OPTS = CopyOptions(request_bytes=M, merge_gap_bytes=0, max_in_flight=1)


def _plans() -> tuple[SyncPlanned, SyncPlanned]:
    """A full plan and the incremental after it, of one disk of SIZE bytes."""
    d = disk(capacity=SIZE)
    s, out = on_snapshot(None, snap(d, f"{EPOCH_A}/1"), T0)
    full = out[0]
    assert isinstance(full, SyncPlanned)
    s, _ = on_commit(s, commit_for(full), T0)
    _, out = on_snapshot(s, snap(d, f"{EPOCH_A}/2", minutes=5, snapshot="snapshot-2"), T0)
    assert isinstance(out[0], SyncPlanned)
    return full, out[0]


@pytest.fixture
def images(tmp_path: Path) -> tuple[bytes, bytes, Path, Path]:
    rng = random.Random(24)
    base = bytearray(rng.randbytes(SIZE))
    base[4 * M : 5 * M] = bytes(M)  # a hole in the base
    new = apply(bytes(base), rng.randbytes(SIZE), CHANGES)
    base_img, new_img = tmp_path / "base.img", tmp_path / "new.img"
    base_img.write_bytes(bytes(base))
    new_img.write_bytes(new)
    return bytes(base), new, base_img, new_img


class FailingSource:
    """A source that fails after ``reads`` reads (a copier killed in the middle of a sync)."""

    def __init__(self, inner: NbdSource, reads: int) -> None:
        self.inner, self.left = inner, reads
        self.size, self.max_request = inner.size, inner.max_request

    async def read_into(self, offset: int, buf: memoryview) -> None:
        if self.left <= 0:
            raise OSError("the source went away")
        self.left -= 1
        await self.inner.read_into(offset, buf)

    async def zero_map(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        return await self.inner.zero_map(offset, length)


@contextlib.asynccontextmanager
async def _session(loc: ReplicaLocation, resolver: TargetResolver, plan: SyncPlanned
                   ) -> AsyncIterator[tuple[ReplicaSession, FileTarget]]:
    """The copier's order: admit, lock, admit again, open the target."""
    await ReplicaSession.begin(loc, plan, PIPE, HERE)
    async with loc.store.lock():
        session = await ReplicaSession.begin(loc, plan, PIPE, HERE)
        try:
            opened = await asyncio.to_thread(resolver.open, loc, SIZE)
            assert isinstance(opened, FileTarget)
            async with opened as target:
                yield session, target
        finally:
            session.close()


async def sync(tmp_path: Path, loc: ReplicaLocation, resolver: TargetResolver,
               plan: SyncPlanned, image: Path, extents: list[tuple[int, int]],
               fail_after: int | None = None) -> tuple[SyncResult, ReplicaSession]:
    with nbdkit(tmp_path, "-r", "file", str(image)) as uri:
        async with NbdSource(parse_nbd_uri(uri)) as src, \
                _session(loc, resolver, plan) as (session, target):
            if session.legacy is not None:
                await session.convert(target.read_into)
            identity = await asyncio.to_thread(loc.identity)
            assert identity is not None
            rtype = session.admission.replication_type
            await session.mark_dirty(rtype, identity)
            tree = await session.base_tree(rtype, SIZE)
            source = src if fail_after is None else FailingSource(src, fail_after)
            if rtype == ReplicationType.FULL:
                extents = [(0, SIZE)]
            result = await copy_disk(source, target, [Extent(*e) for e in extents],
                                     capacity=SIZE, options=OPTS, tree=tree)
            synced = SyncResult(rtype, session.admission.reason, result.bytes_copied,
                                result.bytes_zeroed, result.extents, result.digest,
                                result.duration_s, bytes_read=result.bytes_read,
                                bytes_changed=result.bytes_changed)
            return await session.mark_clean(synced, tree, identity), session


def _resolver(tmp_path: Path) -> tuple[TargetResolver, ReplicaLocation]:
    resolver = TargetResolver(CopierSettings(target_root=tmp_path / "replicas"))
    return resolver, resolver.locate(_plans()[0].disk.key)


async def _verify(loc: ReplicaLocation) -> str:
    return (await check_replica(loc, read_local_or_nbd, mark=False)).result


async def test_an_interrupted_incremental_resumes_on_its_base_tree(
    images: tuple[bytes, bytes, Path, Path], tmp_path: Path,
) -> None:
    """Killed after rewriting some leaves in place, the incremental runs again on its base: the
    journal put the base's entries back, so no piece is found unproven and nothing beyond the
    changed areas is read from the snapshot."""
    base, new, base_img, new_img = images
    resolver, loc = _resolver(tmp_path)
    full, incr = _plans()
    first, _ = await sync(tmp_path, loc, resolver, full, base_img, [])
    assert first.replica_digest == root_of(base) and await _verify(loc) == "equal"
    with pytest.raises(CopyFailed):
        await sync(tmp_path, loc, resolver, incr, new_img, CHANGES, fail_after=4)
    record = loc.store.load()
    assert isinstance(record, ReplicaState) and record.status == ReplicaStatus.DIRTY
    assert (Path(loc.store.directory) / loc.store.journal_name).exists()
    result, session = await sync(tmp_path, loc, resolver, incr, new_img, CHANGES)
    assert session.admission.replication_type == ReplicationType.INCREMENTAL
    assert Path(loc.location).read_bytes() == new  # byte for byte the snapshot
    assert result.replica_digest == root_of(new)
    changed = sum(n for _, n in CHANGES)
    # the one edge leaf the killed run wrote (at 2 MiB + 1000) differs from its base entry and
    # is copied whole again (an interrupted write); everything else is read once
    assert result.bytes_changed == changed
    assert result.bytes_read == changed - 4096 + 64 * K
    leaves = (Path(loc.store.directory) / loc.store.leaves_name(full.generation)).read_bytes()
    assert leaves[24:] == b"".join(leaves_of(new))  # every entry, untouched ones included
    assert not (Path(loc.store.directory) / loc.store.journal_name).exists()
    assert await _verify(loc) == "equal"


def _as_written_by_version_1(loc: ReplicaLocation, data: bytes) -> HeldSync:
    """Rewrite the replica's tree as an older copier left it: ``tree.<gen>``, a version 1 root
    in the record, no pieces or leaf files."""
    record = loc.store.load()
    assert isinstance(record, ReplicaState) and record.held is not None
    loc.store.prune_trees()
    name = f"{loc.store.name}.tree.{record.held.generation}"
    (Path(loc.store.directory) / name).write_bytes(
        struct.pack(">8sQQ", b"CBTTREE1", SIZE, M) + b"".join(leaves_of_v1(data)))
    held = record.held.model_copy(update={"replica_digest": root_of_v1(data), "tree_file": name})
    loc.store.save(record.model_copy(update={"held": held}))
    return held


async def test_a_version_1_tree_is_converted_by_reading_the_replica_once(
    images: tuple[bytes, bytes, Path, Path], tmp_path: Path,
) -> None:
    base, new, base_img, new_img = images
    resolver, loc = _resolver(tmp_path)
    full, incr = _plans()
    await sync(tmp_path, loc, resolver, full, base_img, [])
    old = _as_written_by_version_1(loc, base)
    assert await _verify(loc) == "equal"  # verify reads version 1 roots
    result, session = await sync(tmp_path, loc, resolver, incr, new_img, CHANGES)
    assert (session.admission.replication_type, session.admission.reason) == (
        ReplicationType.INCREMENTAL, FullReason.PREVIOUS_COMMIT)
    assert Path(loc.location).read_bytes() == new and result.replica_digest == root_of(new)
    assert result.bytes_read == result.bytes_changed  # the snapshot was not read whole
    names = sorted(p.name for p in Path(loc.store.directory).iterdir())
    assert [n for n in names if ".tree." in n or ".undo" in n] == []
    assert f"{loc.store.name}.leaves.{full.generation}" in names  # written by the conversion
    record = loc.store.load()
    assert isinstance(record, ReplicaState) and record.held is not None
    assert record.held.replica_digest == root_of(new) and record.held.converted_from is None
    assert await _verify(loc) == "equal"
    assert old.replica_digest == root_of_v1(base)


async def test_the_converted_record_keeps_the_version_1_root_its_commit_names(
    images: tuple[bytes, bytes, Path, Path], tmp_path: Path,
) -> None:
    base, _, base_img, _ = images
    resolver, loc = _resolver(tmp_path)
    full, incr = _plans()
    await sync(tmp_path, loc, resolver, full, base_img, [])
    _as_written_by_version_1(loc, base)
    async with _session(loc, resolver, incr) as (session, target):
        assert session.legacy is not None
        assert await session.convert(target.read_into)
    record = loc.store.load()
    assert isinstance(record, ReplicaState) and record.held is not None
    assert record.status == ReplicaStatus.CLEAN
    assert record.held.replica_digest == root_of(base)
    assert record.held.converted_from == root_of_v1(base)
    # the latest commit in the log still names the version 1 root: verify accepts it
    check = await check_replica(loc, read_local_or_nbd, latest=(record.held.change_id,
                                                                root_of_v1(base)), mark=False)
    assert check.result == "equal", check.detail


async def test_a_version_1_tree_that_the_replica_does_not_match_means_a_full_copy(
    images: tuple[bytes, bytes, Path, Path], tmp_path: Path,
) -> None:
    base, new, base_img, new_img = images
    resolver, loc = _resolver(tmp_path)
    full, incr = _plans()
    await sync(tmp_path, loc, resolver, full, base_img, [])
    _as_written_by_version_1(loc, base)
    fd = os.open(loc.location, os.O_WRONLY)
    os.pwrite(fd, b"\xff", 5 * M + 10)  # behind the copier's back, where no sync writes
    os.close(fd)
    result, session = await sync(tmp_path, loc, resolver, incr, new_img, CHANGES)
    assert (session.admission.replication_type, session.admission.reason) == (
        ReplicationType.FULL, FullReason.REPLICA_MISMATCH)
    assert "converting the hash tree" in session.admission.detail
    assert Path(loc.location).read_bytes() == new and result.replica_digest == root_of(new)


async def test_a_dirty_replica_with_a_version_1_tree_is_copied_in_full(
    images: tuple[bytes, bytes, Path, Path], tmp_path: Path,
) -> None:
    base, _, base_img, _ = images
    resolver, loc = _resolver(tmp_path)
    full, incr = _plans()
    await sync(tmp_path, loc, resolver, full, base_img, [])
    _as_written_by_version_1(loc, base)
    record = loc.store.load()
    assert isinstance(record, ReplicaState)
    writing = WritingSync(sync_id=incr.sync_id, generation=incr.generation,
                          replication_type=ReplicationType.INCREMENTAL,
                          base_change_id=incr.base_change_id,
                          snapshot_taken_at=incr.snapshot_taken_at)
    loc.store.save(record.dirty(writing, record.target, HERE.host))
    session = await ReplicaSession.begin(loc, incr, PIPE, HERE)
    assert session.admission.action == Action.WRITE and session.legacy is None
    assert (session.admission.replication_type, session.admission.reason) == (
        ReplicationType.FULL, FullReason.REPLICA_STATE_UNKNOWN)
