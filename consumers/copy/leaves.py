"""Leaf entries of a replica's hash tree in a file, and the undo journal that keeps the base's
entries recoverable while a sync rewrites them in place.

File layout (``<replica>.leaves.<generation>``): ``CBTLEAF2``, u64be capacity, u64be leaf size,
then 32 bytes per 64 KiB leaf (:mod:`consumers.copy.digest`; a zero entry is a zero leaf, so a
new file is sparse). 32 bytes per 64 KiB is 0.05% of the disk (2 GiB for 4 TiB), which is why the
entries stay on disk and are read and written in place (``pread``/``pwrite``, a few hundred
bytes per touched piece) instead of being held in memory or copied per sync.

Why a journal: an incremental rewrites the entries of the leaves it touches in place, but until
its clean record names the new tree the record still names the base's, and an interrupted sync
is resumed from that base. So before the first entry is rewritten, :meth:`FileLeaves.protect`
copies the old entries of every leaf the sync rewrites into ``<replica>.leaves.undo`` (durable:
fsync, rename, fsync of the directory), tagged with the base's root. Opening the leaves for the
next sync (``ReplicaStore.open_leaves``) puts them back if the tag is the root the record still
holds, and drops the journal otherwise (the sync that wrote it was recorded clean). Its size is
32 bytes per rewritten leaf (and 16 per run of them): proportional to what changed. Should the
leaf file still disagree with its pieces (lost, damaged), the engine finds it per piece
(``HashTree.consistent``) and proves such a piece whole from the replica before it trusts it.
"""

from __future__ import annotations

import contextlib
import os
import struct
import tempfile
import weakref
from collections.abc import Iterable

from consumers.copy.digest import HASH, LEAF, leaf_count

MAGIC = b"CBTLEAF2"
HEAD = struct.Struct(">8sQQ")
_UNDO_MAGIC = b"CBTUNDO2"
_UNDO_HEAD = struct.Struct(">8sQ")
_RUN = struct.Struct(">QQ")
#: Entries read or journaled per request (2 MiB of entries, 64 GiB of disk).
_BATCH = 1 << 16


class FileLeaves:
    """A :class:`~consumers.copy.digest.LeafStore` over an open file (the store owns ``fd``)."""

    def __init__(self, fd: int, capacity: int, journal: Journal | None = None) -> None:
        self.fd = fd
        self.count = leaf_count(capacity)
        self.journal = journal
        #: Entries written and not yet in the file: a sync writes one run per item, a few
        #: hundred bytes here and there, and a write per item cost more than hashing it; they
        #: go to the file sorted and joined, before any read and at :meth:`sync`.
        self._pending: list[tuple[int, bytes]] = []
        self._pending_bytes = 0

    @classmethod
    def create(cls, name: str, capacity: int, dir_fd: int) -> FileLeaves:
        """A new all-zero leaf file ``name`` (replacing one left by an interrupted full copy)."""
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o640, dir_fd=dir_fd)
        try:
            os.pwrite(fd, HEAD.pack(MAGIC, capacity, LEAF), 0)
            os.ftruncate(fd, HEAD.size + leaf_count(capacity) * HASH)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, capacity)

    @classmethod
    def open(cls, name: str, capacity: int, dir_fd: int) -> FileLeaves:
        """An existing leaf file for ``capacity`` bytes; ValueError if it is not one."""
        fd = os.open(name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            head = os.pread(fd, HEAD.size, 0)
            if len(head) != HEAD.size or HEAD.unpack(head) != (MAGIC, capacity, LEAF) or \
                    os.fstat(fd).st_size != HEAD.size + leaf_count(capacity) * HASH:
                raise ValueError(f"{name} is not the leaf file of a {capacity}-byte disk")
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, capacity)

    @classmethod
    def temporary(cls, capacity: int) -> FileLeaves:
        """An unnamed all-zero leaf file (a copy that keeps no record: ``cbtstream copy``), so
        memory stays bounded whatever the disk's size."""
        with tempfile.TemporaryFile() as fh:
            fd = os.dup(fh.fileno())
        os.pwrite(fd, HEAD.pack(MAGIC, capacity, LEAF), 0)
        os.ftruncate(fd, HEAD.size + leaf_count(capacity) * HASH)
        leaves = cls(fd, capacity)
        weakref.finalize(leaves, leaves.close)  # it lives as long as the tree using it
        return leaves

    def read(self, first: int, count: int) -> bytes:
        if not 0 <= first <= first + count <= self.count:
            raise ValueError(f"leaves {first}+{count} outside the leaf file")
        self.flush()
        want = count * HASH
        data = os.pread(self.fd, want, HEAD.size + first * HASH)
        if len(data) != want:
            raise ValueError(f"the leaf file ends before leaf {first + count}")
        return data

    def write(self, first: int, entries: bytes | memoryview) -> None:
        if first < 0 or first + len(entries) // HASH > self.count:
            raise ValueError(f"leaves {first}+{len(entries) // HASH} outside the leaf file")
        self._pending.append((first, bytes(entries)))
        self._pending_bytes += len(entries)
        if self._pending_bytes >= _BATCH * HASH:
            self.flush()

    def flush(self) -> None:
        """Write the pending entries to the file (in leaf order, adjacent runs joined)."""
        if not self._pending:
            return
        pending, self._pending, self._pending_bytes = sorted(self._pending), [], 0
        i = 0
        while i < len(pending):
            first, run = pending[i][0], [pending[i][1]]
            end = first + len(run[0]) // HASH
            i += 1
            while i < len(pending) and pending[i][0] == end:
                run.append(pending[i][1])
                end += len(pending[i][1]) // HASH
                i += 1
            view = memoryview(b"".join(run))
            pos = HEAD.size + first * HASH
            while view:
                n = os.pwrite(self.fd, view, pos)
                view, pos = view[n:], pos + n

    def protect(self, old: Iterable[tuple[int, bytes]]) -> None:
        if self.journal is not None:
            self.journal.write(old)
        else:
            for _ in old:  # a full copy's new file: nothing to keep (its base is all zero)
                pass

    def sync(self) -> None:
        self.flush()
        os.fsync(self.fd)

    def close(self) -> None:
        """Close the file; pending entries are dropped (call :meth:`sync` to keep them)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self._pending, self._pending_bytes = [], 0


class Journal:
    """The undo journal of one replica's leaf file (see the module docstring): written once per
    sync, before the first entry is rewritten; ``tag`` is the root of the tree it restores."""

    def __init__(self, directory_fd: int, name: str, tag: str) -> None:
        self.dir_fd = os.dup(directory_fd)
        self.name = name
        self.tag = tag.encode()

    def write(self, runs: Iterable[tuple[int, bytes]]) -> None:
        """Write the journal durably (temp file, fsync, rename, fsync of the directory)."""
        tmp = f".{self.name}.tmp{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o640, dir_fd=self.dir_fd)
        try:
            with os.fdopen(os.dup(fd), "wb") as out:
                out.write(_UNDO_HEAD.pack(_UNDO_MAGIC, len(self.tag)) + self.tag)
                for first, entries in runs:
                    out.write(_RUN.pack(first, len(entries) // HASH))
                    out.write(entries)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, self.name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
        os.fsync(self.dir_fd)

    def close(self) -> None:
        if self.dir_fd >= 0:
            os.close(self.dir_fd)
            self.dir_fd = -1


def undo(name: str, dir_fd: int, leaves: FileLeaves, tag: str) -> bool:
    """Put back the entries journal ``name`` holds if it restores the tree whose root is ``tag``,
    then remove it (also when it belongs to another tree: a sync recorded clean). True if
    entries were put back. A torn journal cannot exist (it is renamed into place whole)."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    applied = False
    with os.fdopen(fd, "rb") as fh:
        magic, n = _UNDO_HEAD.unpack(fh.read(_UNDO_HEAD.size))
        if magic == _UNDO_MAGIC and fh.read(n) == tag.encode():
            while head := fh.read(_RUN.size):
                first, count = _RUN.unpack(head)
                leaves.write(first, fh.read(count * HASH))
            leaves.sync()
            applied = True
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dir_fd)
    os.fsync(dir_fd)
    return applied
